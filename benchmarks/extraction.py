"""Feature extraction throughput on real JPEGs: boatray against the lab's plain PyTorch loop.

    python benchmarks/extraction.py [--images 96] [--size 240x800] [--compile]

One run, one machine, the same images (real MarDCT JPEGs, repeated as needed) and the same
weights (one random-init state dict saved to a file; timings do not depend on the values):

- lab: torchvision ResNet trunk (`children()[:-1]`), a Dataset with the lab's transform,
  DataLoader batch 8, fp32, contiguous tensors, `torch.no_grad()`;
- boatray core, in process: `pipeline.decode_rows` + `pipeline.TrunkRunner` (uint8 decode,
  normalisation on the device, channels_last, inference mode), once in fp32 and once under
  bf16 autocast (`features.amp` false and true; `auto`, the default, picks bf16 on a GPU and
  on a CPU with AMX or AVX512-BF16, which is when the bf16 row is shown on a CPU), with
  `--compile` with `compile=True` (torch.compile, inductor freezing; compile time apart);
- boatray `pipeline.extract`: the real Ray Data pipeline (rows -> decode + trunk actors ->
  features.parquet; `features.amp: auto`), timed as a whole, with the local Ray instance's
  start-up shown apart; with
  `--compile` a second row with `features.compile` on (compiled inside the actor, so its
  compile time is in the row). Each row's features.json splits it into start-up (until the
  first batch: actor start, model shipping, compiling) and the steady-state images/s after it,
  from which follows the ratio projected on the whole lab16 set (5,193 images), where the
  fixed cost is spread over fifty times more images than here.

Where the device computes bf16 natively, the trunk alone is then timed in fp32 and bf16 in
alternation (`alternating_trunk_rates`, 5 rounds on one batch): the median bf16/fp32 ratio,
which a shared machine's changing load leaves alone.

Each row has images/s, the ratio to the lab loop, the fraction of the device's matmul peak
at the trunk's FLOPs per image (counted with torch's FlopCounterMode; the peak is a large
matmul in the row's dtype, float32 or bf16 on a CPU, bf16 on a GPU, measured before and after
the rows, the better kept) and peak memory; the features of every path are compared with the
lab's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from boatray import models, precision
from boatray.config import FeaturesConfig, ModelConfig
from boatray.data.manifest import read_manifest
from boatray.features import featurefile, pipeline
from common import (
    SAMPLE,
    image_tree,
    isolated,
    lab_loader,
    lab_resnet,
    matmul_peak,
    parse_size,
    pick_device,
    print_footer,
    print_header,
    print_table,
    quiet_ray_data,
    ratio,
    start_ray,
    synchronize,
)

DTYPE = {False: "fp32", True: "bf16"}
TARGET_CPU = 1.7
"""Extraction at least 1.7x the lab loop on a 2-core CPU."""
TARGET_FIXED_S = 10.0
"""An eager extraction's fixed cost (all but the steady state) on a 2-core CPU, at most."""
LAB16_IMAGES = 5193
"""MarDCT's lab16 protocol: 3,869 train+valid and 1,324 test images, all extracted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96,
                        help="images per path (real JPEGs, repeated as needed; default 96)")
    parser.add_argument("--size", type=parse_size, default=(240, 800), help="HxW (240x800)")
    parser.add_argument("--model", default="resnet50", help="backbone (resnet50)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="boatray's batch size (the lab loop keeps 8; default 16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the in-process core under torch.compile")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sample", type=Path, default=SAMPLE,
                        help="the real MarDCT sample (raw layout)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data rows")
    return parser


def lab_extract(weights_file: Path, arch: str, manifest: Path, size: tuple[int, int],
                device_type: str) -> tuple[np.ndarray, float]:
    """The lab's loop: (features, seconds)."""
    device = torch.device(device_type)
    frame, classes = read_manifest(manifest)
    model = lab_resnet(arch, len(classes))
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    extractor = nn.Sequential(*list(model.children())[:-1]).to(device).eval()
    loader = lab_loader(frame.path.tolist(), frame.label_idx.tolist(), size, shuffle=False)
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in loader:
            out.append(extractor(inputs.to(device)).flatten(1).cpu())
    synchronize(device)
    return torch.cat(out).numpy(), time.perf_counter() - start


def core_extract(weights_file: Path, arch: str, manifest: Path, size: tuple[int, int],
                 batch_size: int, device_type: str, compile_trunk: bool, amp: bool
                 ) -> tuple[np.ndarray, float, float]:
    """boatray's decode + TrunkRunner in this process (as `pipeline.extract` runs it on a
    one-node CPU cluster): (features, seconds, compile seconds)."""
    device = torch.device(device_type)
    frame, classes = read_manifest(manifest)
    trunk = models.trunk(models.build(arch, str(weights_file), len(classes)), "pool")
    runner = pipeline.TrunkRunner(trunk, use_gpu=device.type == "cuda", amp=amp,
                                  channels_last=True, threads=None, dtype="float32",
                                  compile=compile_trunk)
    rows = {c: frame[c].to_numpy() for c in pipeline.COLUMNS}
    batches = [{c: v[i:i + batch_size] for c, v in rows.items()}
               for i in range(0, len(frame), batch_size)]
    compile_seconds = 0.0
    if compile_trunk:  # the first call compiles
        start = time.perf_counter()
        runner(pipeline.decode_rows(batches[0], size))
        synchronize(device)
        compile_seconds = time.perf_counter() - start
    out = []
    start = time.perf_counter()
    for batch in batches:
        out.append(runner(pipeline.decode_rows(batch, size))["features"])
    synchronize(device)
    return np.concatenate(out), time.perf_counter() - start, compile_seconds


def ray_extract(manifest: Path, out: Path, model: ModelConfig, cfg: FeaturesConfig,
                size: tuple[int, int]) -> dict:
    """boatray's `pipeline.extract` on a local Ray instance started here: features, Ray's
    start-up, the wall seconds of the extraction and its features.json stats."""
    import ray

    quiet_ray_data()
    result = {"ray_start": start_ray(address="local", include_dashboard=False,
                                     log_to_driver=False, num_gpus=torch.cuda.device_count())}
    try:
        started = time.perf_counter()
        pipeline.extract(manifest, out, model, cfg, size)
        result["wall"] = time.perf_counter() - started
        result["x"], _ = featurefile.read_features(out)
        result["stats"] = featurefile.feature_info(out)["extraction"]
    finally:
        ray.shutdown()
    return result


def alternating_trunk_rates(weights_file: Path, arch: str, size: tuple[int, int],
                            batch_size: int, device_type: str, rounds: int = 5
                            ) -> list[tuple[float, float]]:
    """The trunk alone (channels_last, inference mode) on one batch of random pixels, fp32 then
    bf16 autocast, alternated for `rounds` rounds after a warm-up of each: (fp32, bf16)
    images/s per round. Alternating keeps a shared machine's changing load out of the ratio."""
    device = torch.device(device_type)
    trunk = models.trunk(models.build(arch, str(weights_file), 16), "pool")
    trunk = trunk.to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch_size, 3, *size, device=device).contiguous(
        memory_format=torch.channels_last)

    def rate(bf16: bool) -> float:
        with torch.inference_mode(), precision.autocast(device, bf16):
            synchronize(device)
            started = time.perf_counter()
            trunk(x)
            synchronize(device)
        return batch_size / (time.perf_counter() - started)

    rate(False), rate(True)
    return [(rate(False), rate(True)) for _ in range(rounds)]


def difference(x: np.ndarray, reference: np.ndarray) -> float:
    """max |x - reference| / max |reference|."""
    return float(np.abs(x - reference).max() / max(np.abs(reference).max(), 1e-30))


def main() -> None:
    args = build_parser().parse_args()
    device = pick_device(args.device)
    print_header(f"feature extraction, {args.model} at {args.size[0]}x{args.size[1]}, "
                 f"{args.images} real JPEGs, device {device}")
    work = Path(tempfile.mkdtemp(prefix="boatray-bench-extraction-"))
    manifest = image_tree(work / "images", {"train": args.images}, args.sample)
    _, classes = read_manifest(manifest)
    torch.manual_seed(0)
    network = models.build(args.model, "none", len(classes))
    weights_file = work / "weights.pt"
    torch.save(network.state_dict(), weights_file)
    gflop = models.forward_flops(models.trunk(network, "pool"), args.size) / 1e9
    # fp32 and bf16 autocast (amp: auto's choice on a GPU and on CPUs with native bf16)
    amps = (False, True) if precision.uses_bf16("auto", device) else (False,)
    peak_dtypes = [torch.bfloat16] if device.type == "cuda" else [
        torch.float32, *([torch.bfloat16] if True in amps else [])]
    first_peaks = {dtype: matmul_peak(device, dtype) for dtype in peak_dtypes}

    rows, found, dtypes = [], {}, {}

    def add(path: str, x: np.ndarray, seconds: float, memory: dict, bf16: bool = False,
            **extra) -> None:
        rate = len(x) / seconds
        found[path] = x
        dtypes[path] = torch.bfloat16 if bf16 else torch.float32
        rows.append({"path": path, "images": len(x), "seconds": seconds, "images/s": rate,
                     "vs lab": ratio(rate, rows[0]["images/s"] if rows else rate),
                     "% of peak": rate * gflop, **extra, **memory})  # divided below

    common_args = (weights_file, args.model, manifest, args.size)
    (x, seconds), memory = isolated(lab_extract, *common_args, device.type, device=device)
    add("lab loop (batch 8, fp32, eager)", x, seconds, memory)
    for amp in amps:
        (x, seconds, _), memory = isolated(core_extract, *common_args, args.batch_size,
                                           device.type, False, amp, device=device)
        add(f"boatray core in-process (batch {args.batch_size}, {DTYPE[amp]})", x, seconds,
            memory, bf16=amp)
    if args.compile:
        amp = amps[-1]
        (x, seconds, compiling), memory = isolated(core_extract, *common_args, args.batch_size,
                                                   device.type, True, amp, device=device)
        add(f"boatray core + compile (freezing, {DTYPE[amp]})", x, seconds, memory, bf16=amp,
            **{"compile s": compiling})
    pipelines = []
    if not args.no_ray:
        model = ModelConfig(name=args.model, weights=str(weights_file), pooling="avg")
        for compiled in (False, True) if args.compile else (False,):
            cfg = FeaturesConfig(batch_size=args.batch_size, use_gpu=device.type == "cuda",
                                 compile=compiled)
            name = (f"boatray pipeline.extract ({precision.compute_dtype(cfg.amp, device)})"
                    + (" + features.compile" if compiled else ""))
            try:
                result, memory = isolated(ray_extract, manifest,
                                          work / f"ray-compile-{compiled}.parquet", model, cfg,
                                          args.size, device=device)
            except Exception as exc:  # the other rows still stand
                print(f"ray     : the {name} row failed: {type(exc).__name__}: {exc}")
                continue
            stats = result["stats"]
            where = "in process" if stats.get("in_process") else "Ray Data"
            add(f"{name} ({where}, {stats['actors']} actor)", result["x"], result["wall"],
                memory, bf16=precision.uses_bf16(cfg.amp, device),
                **{"steady images/s": stats["steady_images_per_second"]})
            pipelines.append((name, result))

    peaks = {dtype: max(first, matmul_peak(device, dtype)) for dtype, first in first_peaks.items()}
    for row in rows:  # against the peak of the row's dtype where measured (a GPU: bf16's)
        row["% of peak"] = 100 * row["% of peak"] / peaks.get(dtypes[row["path"]],
                                                              peaks[peak_dtypes[0]])
    print(f"trunk   : {gflop:.1f} GFLOP per image (forward); matmul peak " + ", ".join(
        f"{peak:.0f} GFLOP/s {str(dtype).removeprefix('torch.')} (bound "
        f"{peak / gflop:.2f} images/s)" for dtype, peak in peaks.items())
        + " (the better of a measurement before and one after the rows)")
    print_table(rows)
    cores = {r["path"]: r["images/s"] for r in rows if r["path"].startswith("boatray core in")}
    if len(cores) == 2:
        fp32, bf16 = cores.values()
        print(f"bf16    : the core under bf16 autocast runs {bf16 / fp32:.2f}x its fp32 rate "
              f"(both channels_last; this CPU: {precision.cpu_bf16() or 'no native bf16'})")
    elif device.type == "cpu":
        print("bf16    : no bf16 row: this CPU has no AMX or AVX512-BF16 (amp: auto is fp32 "
              "here)")
    if True in amps:
        rounds, _ = isolated(alternating_trunk_rates, weights_file, args.model, args.size,
                             args.batch_size, device.type, device=device)
        ratios = sorted(bf16 / fp32 for fp32, bf16 in rounds)
        print(f"bf16    : the trunk alone, batch {args.batch_size}, fp32 and bf16 alternated "
              f"{len(rounds)} times: bf16/fp32 median {ratios[len(ratios) // 2]:.2f}x (rounds "
              + ", ".join(f"{r:.2f}" for r in ratios) + "; fp32 "
              + ", ".join(f"{f:.2f}" for f, _ in rounds) + " img/s)")
    reference = rows[0]["path"]
    for path, x in found.items():
        if path != reference:
            print(f"features: {path}: max |difference| / max |lab| = "
                  f"{difference(x, found[reference]):.1e}")
    lab_rate = rows[0]["images/s"]
    projected = {name: explain_ray(name, result, lab_rate) for name, result in pipelines}
    if device.type == "cpu":
        best = {"in-process core": max(r["vs lab"] for r in rows
                                       if r["path"].startswith("boatray core"))}
        best.update({f"{name} on lab16 (projected)": value
                     for name, value in projected.items() if value})
        print(f"target  : >= {TARGET_CPU}x the lab loop; " + "; ".join(
            f"{name}: {value:.2f}x ({'met' if value >= TARGET_CPU else 'NOT met'})"
            for name, value in best.items()))
    print_footer()


def explain_ray(name: str, result: dict, lab_rate: float) -> float | None:
    """Print where a Ray Data row's time goes (start-up, fixed cost, steady state); return the
    ratio to the lab loop it projects on the whole lab16 set."""
    stats = result["stats"]
    steady, first = stats["steady_images_per_second"], stats["first_batch_images"]
    if not steady:
        print(f"{name}: one batch only, no steady state to measure (use more --images)")
        return None
    fixed = result["wall"] - stats["images"] / steady  # beyond the steady state's time
    projected = LAB16_IMAGES / (fixed + LAB16_IMAGES / steady)
    print(f"{name}: local Ray start {result['ray_start']:.1f} s (not in the row); the first "
          f"batch ({first} images) came after {stats['startup_seconds']:.1f} s (actor start, "
          f"model shipping, compiling); steady state {steady:.2f} images/s (median batch, "
          f"{ratio(steady, lab_rate):.2f}x the lab loop); whole call {result['wall']:.1f} s, "
          f"of which {fixed:.1f} s fixed; on the {LAB16_IMAGES:,} lab16 images: "
          f"{ratio(projected, lab_rate):.2f}x the lab loop (projected)")
    if not stats.get("compile"):
        print(f"{name}: fixed cost {fixed:.1f} s (target <= {TARGET_FIXED_S:.0f} s eager: "
              f"{'met' if fixed <= TARGET_FIXED_S else 'NOT met'})")
    return ratio(projected, lab_rate)


if __name__ == "__main__":
    main()
