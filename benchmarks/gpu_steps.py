"""The GPU check's measured steps; `gpu_check.py` runs each in a process of its own.

    python benchmarks/gpu_steps.py STEP SETTINGS_JSON RESULT_JSON

A step reads the settings gpu_check.py wrote, measures, and writes its table rows and facts to
RESULT_JSON. Every row times the GPU work with warm-up first and `synchronize` around the timed
part. Pre-decoded rows start from the same uint8 pixels in host memory (boatray's from its
decoded-image cache, as its loop reads them); `decoding included` rows start from the JPEG
files. Each boatray row has a plain PyTorch row beside it, written the usual way (bf16
autocast and channels_last where boatray's `amp: auto` uses them, the same batch size,
`cudnn.benchmark`, a DataLoader with worker processes for decoding, `loss.item()` per step).

Only `smoke` and `ray_extract` import Ray (and `smoke` PyYAML, for the smoke preset): the
other steps run where neither is installed.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from boatray import freezing, models, precision
from boatray.config import FeaturesConfig, ModelConfig, TrainConfig, from_dict
from boatray.data import images
from boatray.data.manifest import read_manifest
from boatray.features import featurefile, pipeline
from boatray.finetune import engine
from boatray.finetune.loop import loop_config, train_loop
from boatray.finetune.sessions import LocalSession
from common import (
    LabImages,
    cpu_model,
    image_tree,
    lab_optimizer,
    lab_resnet,
    matmul_peak,
    synchronize,
)

WARMUP_BATCHES = 2


# ---------------------------------------------------------------- shared pieces

def settings_device(settings: dict) -> torch.device:
    return torch.device(settings["device"])


def loader_workers() -> int:
    """The DataLoader processes of the decoding rows: the machine's cores, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def gpu_memory_mb(device: torch.device) -> float | None:
    """torch's peak allocated GPU memory since the last reset, in MiB (None on a CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, run: Callable[[], int]) -> tuple[int, float]:
    """(images, seconds) of `run()` (which returns its image count), synchronised."""
    synchronize(device)
    started = time.perf_counter()
    count = run()
    synchronize(device)
    return count, time.perf_counter() - started


def manifest_paths(settings: dict) -> tuple[list[str], list[int], list[str]]:
    """The check's training images (paths, label indices) and its classes."""
    frame, classes = read_manifest(settings["manifest"])
    train = frame[frame.split == "train"]
    return train.path.tolist(), train.label_idx.tolist(), classes


def decoded_pool(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """uint8 (n, h, w, 3) pixels of `paths`, decoded once (PIL, one thread per core)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return np.stack(list(pool.map(lambda p: images.decode(p, size), paths)))


def pinned_chw(pool: np.ndarray, device: torch.device) -> torch.Tensor:
    """The pool as a uint8 (n, 3, h, w) tensor, in pinned memory when feeding a GPU."""
    tensor = torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()
    return tensor.pin_memory() if device.type == "cuda" else tensor


def slices(total: int, batch: int, pool: int) -> list[slice]:
    """`total // batch` batch slices cycling over a pool of `pool` rows (a multiple of batch)."""
    per_pool = pool // batch
    return [slice((k % per_pool) * batch, (k % per_pool + 1) * batch)
            for k in range(max(1, total // batch))]


def train_flops(network: nn.Module, spec: str, size: tuple[int, int]) -> float:
    """FLOPs of one image's training step (forward and backward) at a freeze spec, counted by
    FlopCounterMode on a meta-device copy."""
    meta = copy.deepcopy(network).to("meta")
    freezing.freeze(meta, spec)
    freezing.train_mode(meta)
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.zeros(1, 3, *size, device="meta")).sum().backward()
    return float(counter.get_total_flops())


def compute(settings: dict) -> tuple[bool, str]:
    """(bf16 autocast?, its description): boatray's `amp: auto` on this device; the plain
    loops use the same."""
    device = settings_device(settings)
    amp = precision.uses_bf16("auto", device)
    return amp, ("bf16 autocast" if amp else "fp32") + " + channels_last"


def row(name: str, images_count: int, seconds: float, *, batch: int | None, flops: float,
        memory: float | None, pair: str, kind: str, note: str = "") -> dict:
    """One table row: `pair` joins a boatray row with its plain PyTorch row, `kind` says
    which it is (`boatray` or `plain`)."""
    return {"row": name, "batch": batch, "images": images_count, "seconds": seconds,
            "images_per_second": images_count / seconds if seconds > 0 else None,
            "flops_per_image": flops, "peak_gpu_mb": memory, "pair": pair, "kind": kind,
            "note": note}


# ---------------------------------------------------------------- environment

def environment(settings: dict) -> dict:
    """Versions, the device, whether Ray and PyYAML import, the image tree and manifest the
    other steps read, and the matmul peak of the device."""
    import platform

    import torchvision

    device = settings_device(settings)
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "device": str(device), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "cpu_bf16": precision.cpu_bf16() or "none",
            "compute": compute(settings)[1]}
    for module in ("ray", "yaml", "sklearn", "pandas", "pyarrow"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "absent"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                       f"{torch.cuda.device_count()} GPU(s)")
    images_root = Path(settings["work"]) / "images"
    info["manifest"] = str(image_tree(images_root, {"train": settings["images"],
                                                    "valid": settings["valid"]},
                                      Path(settings["sample"])))
    dtype = torch.bfloat16 if precision.uses_bf16("auto", device) else torch.float32
    size = 8192 if device.type == "cuda" else settings["matmul_size"]
    peak = matmul_peak(device, dtype, size=size, seconds=1.0 if settings["tiny"] else 3.0)
    info["peak_flops"] = peak * 1e9
    info["peak_what"] = f"{str(dtype).removeprefix('torch.')} matmul {size}^3"
    return {"info": info, "rows": [{"row": f"matmul peak ({info['peak_what']})",
                                    "note": f"{peak:,.0f} GFLOP/s"}]}


# ---------------------------------------------------------------- extraction

def plain_trunk(network: nn.Module, arch: str, classes: int) -> nn.Module:
    """The usual PyTorch feature extractor: a torchvision ResNet's children but the head."""
    model = lab_resnet(arch, classes)
    model.load_state_dict(network.state_dict())
    return nn.Sequential(*list(model.children())[:-1])


def plain_extract_batches(model: nn.Module, batches, device: torch.device, amp: bool) -> int:
    """The usual inference loop over (uint8 or float) batches; features back on the host."""
    mean = torch.tensor(images.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(images.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    count = 0
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        for x in batches:
            x = x.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = (x.float() / 255 - mean) / std
            x = x.contiguous(memory_format=torch.channels_last)
            model(x).float().flatten(1).cpu()
            count += len(x)
    return count


def extraction(settings: dict) -> dict:
    """ResNet50 (or --model) features at the check's size: boatray's extraction core
    (`pipeline.TrunkRunner`, as each Ray Data actor runs it) against the usual loop, on
    pre-decoded pixels and with decoding included (boatray: nvJPEG on a GPU, PIL on a CPU;
    plain: PIL in DataLoader processes)."""
    device = settings_device(settings)
    size, batch, arch = tuple(settings["size"]), settings["extract_batch"], settings["model"]
    paths, labels, classes = manifest_paths(settings)
    torch.manual_seed(0)
    network = models.build(arch, "none", len(classes))
    trunk = models.trunk(network, "pool")
    flops = float(models.forward_flops(trunk, size))
    amp, how = compute(settings)
    torch.backends.cudnn.benchmark = True
    pool = decoded_pool(paths[:settings["pool"]], size)
    rows = []

    runner = pipeline.TrunkRunner(trunk, device.type == "cuda", "auto", True, None, "float32")
    parts = slices(settings["images"], batch, len(pool))
    columns = {"label_idx": np.zeros(batch, np.int64), "split": np.full(batch, "train"),
               "path": np.full(batch, ""), "error": np.full(batch, ""),
               "decode_seconds": np.zeros(batch)}

    def boatray_core(chosen: list[slice]) -> int:
        return sum(len(runner({**columns, "image": pool[part]})["features"])
                   for part in chosen)

    boatray_core(parts[:WARMUP_BATCHES])
    reset_memory(device)
    count, seconds = timed(device, lambda: boatray_core(parts))
    rows.append(row(f"boatray extraction core (TrunkRunner), pre-decoded, {how}", count,
                    seconds, batch=batch, flops=flops, memory=gpu_memory_mb(device),
                    pair="extract pre-decoded", kind="boatray"))

    plain = plain_trunk(network, arch, len(classes)).to(
        device, memory_format=torch.channels_last).eval()
    tensors = pinned_chw(pool, device)
    plain_extract_batches(plain, (tensors[p] for p in parts[:WARMUP_BATCHES]), device, amp)
    reset_memory(device)
    count, seconds = timed(device, lambda: plain_extract_batches(
        plain, (tensors[p] for p in parts), device, amp))
    rows.append(row(f"plain PyTorch extraction, pre-decoded, {how}", count, seconds,
                    batch=batch, flops=flops, memory=gpu_memory_mb(device),
                    pair="extract pre-decoded", kind="plain"))

    rows += extraction_with_decoding(settings, trunk, plain, paths, labels, flops)
    return {"rows": rows}


def extraction_with_decoding(settings: dict, trunk: nn.Module, plain: nn.Module,
                             paths: list[str], labels: list[int], flops: float) -> list[dict]:
    """The extraction rows that start from the JPEG files."""
    device = settings_device(settings)
    size, batch = tuple(settings["size"]), settings["extract_batch"]
    amp, how = compute(settings)
    gpu = device.type == "cuda"
    decoder = "nvJPEG" if gpu else "PIL"
    runner = pipeline.TrunkRunner(trunk, gpu, "auto", True, None, "float32",
                                  decode_size=size, gpu_decode=True)
    row_batches = [{"path": np.array(paths[i:i + batch]),
                    "label_idx": np.array(labels[i:i + batch]),
                    "split": np.full(len(paths[i:i + batch]), "train")}
                   for i in range(0, len(paths), batch)]
    runner(row_batches[0])  # warm-up (the decoder's start-up too)
    reset_memory(device)
    count, seconds = timed(device, lambda: sum(
        len(runner(rows)["features"]) for rows in row_batches[1:]))
    out = [row(f"boatray extraction core, decoding included ({decoder}), {how}", count,
               seconds, batch=batch, flops=flops, memory=gpu_memory_mb(device),
               pair="extract decoding", kind="boatray")]

    loader = torch.utils.data.DataLoader(
        LabImages(paths, labels, size), batch_size=batch, num_workers=loader_workers(),
        pin_memory=gpu)
    batches = iter(loader)
    plain_extract_batches(plain, [next(batches)[0]], device, amp)  # warm-up: workers start
    reset_memory(device)
    count, seconds = timed(device, lambda: plain_extract_batches(
        plain, (x for x, _ in batches), device, amp))
    out.append(row(f"plain PyTorch extraction, decoding included (PIL, DataLoader "
                   f"{loader_workers()} workers), {how}", count, seconds, batch=batch,
                   flops=flops, memory=gpu_memory_mb(device), pair="extract decoding",
                   kind="plain"))
    return out


# ---------------------------------------------------------------- fine-tuning

def boatray_fit(settings: dict, freeze: str, decoded: bool, weights: Path) -> tuple[dict, float]:
    """boatray's training loop in this process (`LocalSession`), 2 epochs: the last epoch's
    metrics (the first warms up) and the GPU's peak memory."""
    device = settings_device(settings)
    name = f"{freeze}-decoded-{decoded}"
    exp = from_dict({
        "name": name, "storage_path": str(Path(settings["work"]) / "finetune"),
        "model": {"name": settings["model"], "weights": str(weights)},
        "data": {"image_size": list(settings["size"]), "augment": False},
        "train": {"epochs": 2, "batch_size": settings["train_batch"], "freeze": freeze,
                  "lr": 1e-3, "cache_prefix": False, "cache_decoded": decoded,
                  "loader_workers": loader_workers(), "num_workers": 0,
                  "use_gpu": device.type == "cuda", "max_failures": 0}})
    session = LocalSession(device, exp.results_dir / "run")
    reset_memory(device)
    train_loop(loop_config(exp, settings["manifest"], None), session)
    return session.metrics, gpu_memory_mb(device)


def plain_train_epoch(model: nn.Module, batches, optimizer, device: torch.device,
                      amp: bool) -> int:
    """The usual training loop: copy, normalise, autocast forward, backward, step, and the
    running loss read with `loss.item()` at every step."""
    mean = torch.tensor(images.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(images.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    criterion = nn.CrossEntropyLoss()
    model.train()
    count, running = 0, 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = (x.float() / 255 - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()
        count += len(y)
    return count


def finetune(settings: dict, freeze: str) -> dict:
    """One freeze spec: boatray's loop against the usual loop, pre-decoded (boatray: its
    decoded-image cache) and with decoding included (both: PIL in DataLoader processes)."""
    device = settings_device(settings)
    size, batch, arch = tuple(settings["size"]), settings["train_batch"], settings["model"]
    paths, labels, classes = manifest_paths(settings)
    torch.manual_seed(0)
    network = models.build(arch, "none", len(classes))
    weights = Path(settings["work"]) / "weights.pt"
    torch.save(network.state_dict(), weights)
    flops = train_flops(network, freeze, size)
    amp, how = compute(settings)
    torch.backends.cudnn.benchmark = True
    rows = []
    for decoded in (True, False):
        metrics, memory = boatray_fit(settings, freeze, decoded, weights)
        data = "pre-decoded (decoded-image cache)" if decoded else (
            f"decoding included (PIL, {loader_workers()} loader workers)")
        count = settings["images"]
        rows.append(row(f"boatray loop (LocalSession), {freeze}, {data}, {how}", count,
                        count / metrics["images_per_second"], batch=metrics["batch_size"],
                        flops=flops, memory=memory,
                        pair=f"{freeze} {'pre-decoded' if decoded else 'decoding'}",
                        kind="boatray"))

    model = lab_resnet(arch, len(classes), freeze)
    model.load_state_dict(network.state_dict())
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = lab_optimizer(model, 1e-3)
    pool = pinned_chw(decoded_pool(paths[:settings["pool"]], size), device)
    targets = torch.tensor(labels[:settings["pool"]])
    parts = slices(settings["images"], batch, len(pool))
    plain_train_epoch(model, [(pool[p], targets[p]) for p in parts[:WARMUP_BATCHES]],
                      optimizer, device, amp)
    reset_memory(device)
    count, seconds = timed(device, lambda: plain_train_epoch(
        model, ((pool[p], targets[p]) for p in parts), optimizer, device, amp))
    rows.append(row(f"plain PyTorch loop, {freeze}, pre-decoded, {how}", count, seconds,
                    batch=batch, flops=flops, memory=gpu_memory_mb(device),
                    pair=f"{freeze} pre-decoded", kind="plain"))
    loader = torch.utils.data.DataLoader(
        LabImages(paths, labels, size), batch_size=batch, shuffle=True,
        num_workers=loader_workers(), pin_memory=device.type == "cuda")
    batches = iter(loader)
    plain_train_epoch(model, [next(batches)], optimizer, device, amp)  # workers start
    reset_memory(device)
    count, seconds = timed(device, lambda: plain_train_epoch(model, batches, optimizer,
                                                              device, amp))
    rows.append(row(f"plain PyTorch loop, {freeze}, decoding included (PIL, DataLoader "
                    f"{loader_workers()} workers)", count, seconds, batch=batch, flops=flops,
                    memory=gpu_memory_mb(device), pair=f"{freeze} decoding", kind="plain"))
    return {"rows": rows}


def finetune_all(settings: dict) -> dict:
    return finetune(settings, "all")


def finetune_last1(settings: dict) -> dict:
    return finetune(settings, "last1")


# ---------------------------------------------------------------- batch sizes

def batch_sweep(settings: dict) -> dict:
    """boatray's extraction core and training step (freeze `all`) at each batch size of the
    sweep, with the GPU's peak memory; then what `train.batch_size: auto` picks."""
    device = settings_device(settings)
    size, arch = tuple(settings["size"]), settings["model"]
    paths, labels, classes = manifest_paths(settings)
    torch.manual_seed(0)
    network = models.build(arch, "none", len(classes))
    trunk_flops = float(models.forward_flops(models.trunk(network, "pool"), size))
    step_flops = train_flops(network, "all", size)
    amp, _ = compute(settings)
    torch.backends.cudnn.benchmark = True
    largest = max(settings["sweep_batches"])
    pool = decoded_pool((paths * largest)[:largest], size)
    targets = torch.tensor((labels * largest)[:largest])
    module = network.to(device, memory_format=torch.channels_last if amp or device.type == "cuda"
                        else torch.preserve_format)
    channels_last = device.type == "cuda" or amp
    optimizer = engine.optimizer_over_all_stages(module, TrainConfig(freeze="all"))
    freezing.freeze(module, "all")
    criterion = nn.CrossEntropyLoss()
    rows = []
    for batch in settings["sweep_batches"]:
        rows.append(sweep_row(f"sweep: boatray extraction core, batch {batch}", batch,
                              trunk_flops, device, lambda n, b=batch: extract_steps(
                                  module, pool[:b], device, n)))
        tensors = torch.from_numpy(pool[:batch]).permute(0, 3, 1, 2)
        tensors = tensors.pin_memory() if device.type == "cuda" else tensors
        rows.append(sweep_row(f"sweep: boatray training step (all), batch {batch}", batch,
                              step_flops, device, lambda n, t=tensors, y=targets[:batch]:
                              engine.train_one_epoch(module, [(t, y)] * n, criterion,
                                                     optimizer, device, amp=amp,
                                                     channels_last=channels_last)["images"]))
    if device.type == "cuda":
        picked = engine.auto_batch_size(module, module, "all",
                                        torch.zeros((3, *size), dtype=torch.uint8), device,
                                        amp=amp, channels_last=channels_last)
        note = f"train.batch_size: auto picks {picked} (freeze all)"
    else:
        note = "train.batch_size: auto is 32 on CPUs (no trial step)"
    rows.append({"row": "sweep: train.batch_size auto (sizing.largest_fitting)", "note": note})
    return {"rows": rows}


def extract_steps(module: nn.Module, pool: np.ndarray, device: torch.device, n: int) -> int:
    """`n` extraction batches of `pool` through boatray's core (the model's trunk)."""
    runner = pipeline.TrunkRunner(models.trunk(module, "pool"), device.type == "cuda", "auto",
                                  True, None, "float32")
    batch = {"label_idx": np.zeros(len(pool), np.int64), "split": np.full(len(pool), "train"),
             "path": np.full(len(pool), ""), "error": np.full(len(pool), ""),
             "decode_seconds": np.zeros(len(pool)), "image": pool}
    return sum(len(runner(batch)["features"]) for _ in range(n))


def sweep_row(name: str, batch: int, flops: float, device: torch.device,
              run: Callable[[int], int]) -> dict:
    """One batch size's row: warm-up, then the timed steps; out of memory is a row too."""
    steps = 2 if device.type == "cpu" else max(4, 1024 // batch)
    try:
        run(WARMUP_BATCHES)
        reset_memory(device)
        count, seconds = timed(device, lambda: run(steps))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"row": name, "batch": batch, "note": "out of memory"}
    return row(name, count, seconds, batch=batch, flops=flops, memory=gpu_memory_mb(device),
               pair="", kind="boatray")


# ---------------------------------------------------------------- Ray steps

def smoke(settings: dict) -> dict:
    """The smoke main job (`python -m boatray.sweep`, built-in smoke experiment) on this
    device, on a fresh local Ray instance: wall time (its exit code is the step's)."""
    from boatray import sweep

    gpu = str(settings["device"] == "cuda").lower()
    started = time.perf_counter()
    code = sweep.main(["--set", f"storage_path={Path(settings['work']) / 'smoke'}",
                       "--set", f"train.use_gpu={gpu}", "--set", f"features.use_gpu={gpu}"])
    if code != 0:
        raise SystemExit(code)
    return {"rows": [{"row": "smoke main job (python -m boatray.sweep)",
                      "seconds": time.perf_counter() - started, "note": "exit code 0"}]}


def ray_extract(settings: dict) -> dict:
    """`pipeline.extract` on a local Ray instance: Ray Data, one actor per GPU (decoding on
    it), the check's images at its size and extraction batch."""
    import ray

    from boatray.cluster import start_ray

    device = settings_device(settings)
    start_ray(log_to_driver=False)
    try:
        cfg = FeaturesConfig(batch_size=settings["extract_batch"],
                             use_gpu=device.type == "cuda", num_actors=1)
        model = ModelConfig(name=settings["model"], weights="none")
        out = Path(settings["work"]) / "ray-features.parquet"
        started = time.perf_counter()
        pipeline.extract(settings["manifest"], out, model, cfg, tuple(settings["size"]))
        wall = time.perf_counter() - started
        stats = featurefile.feature_info(out)["extraction"]
    finally:
        ray.shutdown()
    flops = float(models.forward_flops(models.trunk(models.build(
        settings["model"], "none", 2), "pool"), tuple(settings["size"])))
    steady = stats.get("steady_images_per_second")
    return {"rows": [row("boatray pipeline.extract (Ray Data, whole call)", stats["images"],
                         wall, batch=settings["extract_batch"], flops=flops, memory=None,
                         pair="", kind="boatray",
                         note=f"steady state {steady:.0f} img/s" if steady else "")]}


STEPS = {"environment": environment, "extraction": extraction, "finetune_all": finetune_all,
         "finetune_last1": finetune_last1, "batch_sweep": batch_sweep, "smoke": smoke,
         "ray_extract": ray_extract}


def main() -> None:
    step, settings_file, result_file = sys.argv[1:4]
    settings = json.loads(Path(settings_file).read_text())
    if settings["device"] == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = STEPS[step](settings)
    Path(result_file).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
