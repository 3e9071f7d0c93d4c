"""Feature extraction on Ray Data: a backbone's trunk over every image of a manifest.

Rows (path, label_idx, split) -> decode (uint8, resized) -> an actor pool of `TrunkRunner`s
(one per GPU, or CPU actors that decode their own rows) -> batches of flattened trunk outputs,
streamed in manifest order. A small CPU input runs the same steps in this process. The trunk
may end at any cut point (`pool`: the pooled features; a stage: the frozen-prefix cache's maps).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from boatray import config as config_module
from boatray import export, models, precision, sizing, weightstore
from boatray.config import Experiment, FeaturesConfig, ModelConfig
from boatray.data.images import decode, decode_on, normalize, to_chw
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.features.featurefile import stats_path, write_features
from boatray.results import atomic_write_text

COLUMNS = ("path", "label_idx", "split")


def decode_rows(batch: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """CPU task: decode a batch of rows to uint8 (n, h, w, 3); a failure is kept in `error`
    (such images are listed in the stats file and left out, never silently dropped).
    Each row carries its share of the batch's decoding time (`decode_seconds`)."""
    started = time.perf_counter()
    images = np.zeros((len(batch["path"]), size[0], size[1], 3), dtype=np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = decode(str(path), size)
            errors.append("")
        except BoatrayError as exc:
            errors.append(str(exc))
    share = (time.perf_counter() - started) / max(len(images), 1)
    return {**{c: batch[c] for c in COLUMNS}, "image": images, "error": np.array(errors),
            "decode_seconds": np.full(len(images), share)}


def decode_rows_on(batch: dict[str, np.ndarray], size: tuple[int, int],
                   device: torch.device) -> dict:
    """`decode_rows` on a device (`images.decode_on`: nvJPEG on a GPU): `image` is a uint8
    (n, 3, h, w) tensor there."""
    started = time.perf_counter()
    pixels, errors = decode_on([str(p) for p in batch["path"]], size, device)
    share = (time.perf_counter() - started) / max(len(pixels), 1)
    return {**{c: batch[c] for c in COLUMNS}, "image": pixels, "error": np.array(errors),
            "decode_seconds": np.full(len(pixels), share)}


class TrunkRunner:
    """Actor: the trunk on its device; uint8 images in, flattened features out.

    `trunk` is a one-item list holding the object-store reference of the trunk: the driver
    puts it there once, every actor (and a restarted one) fetches it; or, run in the driver's
    own process (`trunk_batches` on a small input), the trunk itself. With `compile` the trunk
    runs under torch.compile with inductor's `freezing`; if compiling fails (no C++ compiler
    on the node, an unsupported op), the actor says so in one line and goes on eager.

    `amp` is `features.amp` (precision.py decides for this actor's device); with `decode_size`
    the actor decodes its rows itself: on its GPU with `gpu_decode` (nvJPEG), else with PIL.
    On a GPU, a batch that does not fit runs in halves (then quarters...), and later batches
    in parts of the size that fitted: `features.batch_size: auto` (sizing.py).
    """

    def __init__(self, trunk: list | nn.Module, use_gpu: bool, amp: bool | str,
                 channels_last: bool, threads: int | None, dtype: str, compile: bool = False,
                 decode_size: tuple[int, int] | None = None, gpu_decode: bool = False) -> None:
        if isinstance(trunk, list):
            import ray

            trunk = ray.get(trunk[0])
        self.decode_size = decode_size  # rows in: the actor decodes them itself first
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.gpu_decode = gpu_decode and use_gpu
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed image size: the fastest kernels
        self.amp = precision.uses_bf16(amp, self.device)
        self.channels_last = channels_last
        self.part: int | None = None  # images per trunk call, once a batch did not fit
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.eager = trunk.to(self.device, memory_format=memory_format).eval()
        # freezing: the weights become constants, so inductor folds BatchNorm into the convs
        # and prepacks them for oneDNN (inference only; benchmarks/extraction.py --compile)
        self.trunk = torch.compile(self.eager, options={"freezing": True}) if compile else (
            self.eager)
        self.dtype = np.dtype(dtype)
        ray = sys.modules.get("ray")  # not imported: not in a Ray process (the GPU check's core)
        self.node = ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else ""

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), precision.autocast(self.device, self.amp):
            inputs = normalize(images, self.channels_last)
            try:
                return self.trunk(inputs)
            except Exception as exc:  # torch.compile's failures have no common type
                if self.trunk is self.eager or isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                print(f"[features] torch.compile failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running eager",
                      flush=True)
                self.trunk = self.eager
                return self.trunk(inputs)

    def _features(self, images: torch.Tensor) -> np.ndarray:
        """Flattened trunk outputs as `dtype`, in parts that fit the device."""
        while True:
            part = self.part or len(images)
            try:
                return np.concatenate([
                    self._forward(images[i:i + part]).float().flatten(1).cpu().numpy()
                    for i in range(0, len(images), part)]).astype(self.dtype)
            except torch.cuda.OutOfMemoryError:
                if part == 1:
                    raise
                torch.cuda.empty_cache()
                self.part = (part + 1) // 2

    def _pixels(self, pixels: np.ndarray | torch.Tensor, ok: np.ndarray) -> torch.Tensor:
        """The decoded images of the rows in `ok` as uint8 (n, 3, h, w) on this device; no
        copy on the host when every row decoded."""
        if torch.is_tensor(pixels):  # decoded on this device
            return pixels if ok.all() else pixels[torch.from_numpy(ok).to(pixels.device)]
        return to_chw(pixels if ok.all() else pixels[ok]).to(self.device, non_blocking=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Features of a `decode_rows` batch (or of rows, with `decode_size`); each row carries
        its share of the batch's time on the trunk (`trunk_seconds`) beside that of decoding."""
        if self.decode_size is not None:
            batch = (decode_rows_on(batch, self.decode_size, self.device) if self.gpu_decode
                     else decode_rows(batch, self.decode_size))
        started = time.perf_counter()
        ok = batch["error"] == ""
        out = None
        if ok.any():
            out = self._features(self._pixels(batch["image"], ok))
        features = np.zeros((len(ok), out.shape[1] if out is not None else 0), self.dtype)
        if out is not None:
            features[ok] = out
        share = (time.perf_counter() - started) / max(len(ok), 1)
        return {**{c: batch[c] for c in (*COLUMNS, "error", "decode_seconds")},
                "features": features, "trunk_seconds": np.full(len(ok), share),
                "node": np.full(len(ok), self.node)}


def output_shape(trunk: nn.Module, image_size: tuple[int, int]) -> tuple[int, ...]:
    """The trunk's output shape for one image (e.g. (2048,) or (1024, 15, 50))."""
    with torch.inference_mode():
        return tuple(trunk.eval()(torch.zeros(1, 3, *image_size)).shape[1:])


def actor_count(cfg: FeaturesConfig) -> int:
    """`features.num_actors`, else one per GPU of the cluster, else one per CPU node."""
    import ray

    if cfg.num_actors:
        return cfg.num_actors
    if cfg.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise BoatrayError("features.use_gpu is true but the Ray cluster has no GPU")
        return gpus
    return max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))


class ActivationSink(Protocol):
    """What else an extraction fills in the same pass: a cut point's activations of every row
    (a frozen-prefix cache, prefix_cache.CacheWriter)."""

    stage: str

    def add(self, splits: np.ndarray, errors: np.ndarray, values: np.ndarray) -> None:
        """The next rows in manifest order: split, decoding error ('' if none), flattened
        activations at `stage`."""


class CutPoints(nn.Module):
    """A network's layers up to the last of several cut points, run once: every cut point's
    output, flattened, side by side in one row per image (`widths` apart, in `cuts` order)."""

    def __init__(self, network: nn.Module, cuts: Sequence[str]) -> None:
        super().__init__()
        trunks = {cut: list(models.trunk(network, cut)) for cut in cuts}
        self.cuts = sorted(trunks, key=lambda cut: len(trunks[cut]))  # input to output
        parts, done = [], []
        for cut in self.cuts:
            layers = trunks[cut]
            if any(a is not b for a, b in zip(layers, done)):
                raise BoatrayError(f"the trunk up to {cut} does not extend the one before it")
            parts.append(nn.Sequential(*layers[len(done):]))
            done = layers
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for part in self.parts:
            x = part(x)
            outputs.append(x.flatten(1))
        return torch.cat(outputs, 1)


def extract(manifest_path: str | Path, out_path: str | Path, model: ModelConfig,
            cfg: FeaturesConfig, image_size: tuple[int, int], seed: int = 0,
            store: str | None = None, sinks: Sequence[ActivationSink] = ()) -> Path:
    """Run the trunk of `model` (up to `cfg.stage`) over every manifest image with Ray Data;
    write `out_path` (a features file, featurefile.py) and its stats beside it; return it.

    `seed` draws the trunk's weights when `model.weights` is `none` (same seed, same features).
    `store`: the weight store that keeps the trunk's tensors (weightstore.py), else trunk.pt.
    `sinks` get, from the same pass over the images, their own cut points' activations.
    """
    frame, classes = read_manifest(manifest_path)
    torch.manual_seed(seed)
    network = models.build(model.name, model.weights, len(classes), model.pooling)
    trunk = models.trunk(network, cfg.stage)
    export.save_trunk(trunk, out_path, store)
    shape = output_shape(trunk, image_size)
    meta = {"classes": classes, "shape": list(shape), "stage": cfg.stage, "dtype": cfg.dtype,
            "seed": seed,
            "image_size": list(image_size), "model": config_module.to_dict(model)}
    out_path = Path(out_path)
    runner = CutPoints(network, {cfg.stage, *(sink.stage for sink in sinks)}) if sinks else trunk
    batches, settings = trunk_batches(frame, runner, cfg, image_size)  # lazy: runs below
    timing = PipelineTiming(settings["fused_decode"], settings["actors"])
    nodes: Counter[str] = Counter()
    if sinks:
        widths = {cut: int(np.prod(output_shape(models.trunk(network, cut), image_size)))
                  for cut in runner.cuts}
        batches = _fill_sinks(batches, widths, cfg.stage, sinks)
    started = time.monotonic()
    written, failed = write_features(timing.watch(_count_nodes(batches, nodes)), out_path, meta)
    seconds = time.monotonic() - started
    stats = {"images": written, "failed": failed, "seconds": seconds,
             "images_per_second": written / seconds if seconds > 0 else None,
             **timing.summary(started), "use_gpu": cfg.use_gpu, "batch_size": cfg.batch_size,
             "also_emitted": sorted({sink.stage for sink in sinks}), **settings,
             "images_per_node": dict(nodes)}
    atomic_write_text(stats_path(out_path), json.dumps(stats, indent=2) + "\n")
    rates = f"{stats['images_per_second'] or 0:.2f} images/s"
    if stats["steady_images_per_second"]:
        rates += (f"; the first batch after {stats['startup_seconds']:.1f} s (actor start, "
                  f"model shipping{', compiling' if cfg.compile else ''}), steady state "
                  f"{stats['steady_images_per_second']:.2f} images/s")
    print(f"[features] {written} images -> {out_path} in {seconds:.1f} s ({rates}; "
          f"{settings['actors']} actor(s))", flush=True)
    if failed:
        print(f"[features] {len(failed)} image(s) could not be decoded and are left out "
              f"(listed in {stats_path(out_path)}): "
              + "; ".join(f["path"] for f in failed[:5]) + (" ..." if len(failed) > 5 else ""),
              flush=True)
    return out_path


def _count_nodes(batches: Iterator[dict[str, np.ndarray]], counts: Counter[str]
                 ) -> Iterator[dict[str, np.ndarray]]:
    """`batches`, passed through, their rows counted by the Ray node that ran the trunk on
    them ('' without Ray)."""
    for batch in batches:
        counts.update(batch["node"].tolist())
        yield batch


def _fill_sinks(batches: Iterator[dict[str, np.ndarray]], widths: dict[str, int], stage: str,
                sinks: Sequence[ActivationSink]) -> Iterator[dict[str, np.ndarray]]:
    """`CutPoints` batches split by cut point: each sink gets its own, the batch passed on
    holds `stage`'s as its features."""
    offsets = dict(zip(widths, np.cumsum([0, *widths.values()])))
    for batch in batches:
        def at(cut: str, values=batch["features"]) -> np.ndarray:
            return values[:, offsets[cut]:offsets[cut] + widths[cut]]

        for sink in sinks:
            sink.add(batch["split"], batch["error"], at(sink.stage))
        yield {**batch, "features": at(stage)}


class PipelineTiming:
    """Where an extraction's time went, from the batches as they arrive: the start-up (until
    the first batch) and the steady state.

    The steady state comes from the rows' own time shares (`decode_seconds`, `trunk_seconds`):
    an actor's rate on a batch is its rows over the seconds it spent on them (decoding included
    where decoding is fused into the actors, on CPUs), and the pipeline's is the actors' count
    times the median over batches, which leaves out a first batch that compiles or warms up.
    Arrival times would not do: Ray Data hands batches over in bursts.
    """

    def __init__(self, fused_decode: bool, actors: int) -> None:
        self.fused_decode, self.actors = fused_decode, actors
        self.first_at: float | None = None
        self.first_rows = 0
        self.actor_rates: list[float] = []
        self.decode_rates: list[float] = []

    def watch(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """`batches`, passed through, timed."""
        for batch in batches:
            rows = len(batch["path"])
            if self.first_at is None:
                self.first_at, self.first_rows = time.monotonic(), rows
            decode = float(batch["decode_seconds"].sum())
            trunk = float(batch["trunk_seconds"].sum())
            busy = trunk + decode if self.fused_decode else trunk
            if rows and busy > 0:
                self.actor_rates.append(rows / busy)
            if rows and decode > 0:
                self.decode_rates.append(rows / decode)
            yield batch

    def summary(self, started: float) -> dict:
        """`startup_seconds` (from `started`, monotonic), `first_batch_images`,
        `steady_images_per_second` and `decode_images_per_second_per_cpu` (None if unknown)."""
        def median(rates: list[float]) -> float | None:
            return float(np.median(rates)) if rates else None

        actor = median(self.actor_rates)
        return {"startup_seconds": None if self.first_at is None else self.first_at - started,
                "first_batch_images": self.first_rows,
                "steady_images_per_second": actor * self.actors if actor else None,
                "decode_images_per_second_per_cpu": median(self.decode_rates)}


SMALL_INPUT = 256
"""Images up to which a CPU extraction with one actor runs in the calling process on any
cluster: for so few, starting an actor and shipping it the model costs more than the work."""


def runs_here(rows: int, cfg: FeaturesConfig) -> bool:
    """Whether an extraction runs in the calling process: on CPUs with one actor, for a small
    input or where Ray has no node but this one (or is not running), if this node takes work
    (a head kept for drivers does not). An actor would do the same work on the same cores after
    starting and receiving the model (about 20 s with 2 cores)."""
    from boatray.cluster import only_this_node, works_here

    if cfg.use_gpu or cfg.num_actors not in (None, 1):
        return False
    return (rows <= SMALL_INPUT and works_here()) or only_this_node()


def trunk_batches(frame: pd.DataFrame, trunk: nn.Module, cfg: FeaturesConfig,
                  image_size: tuple[int, int]) -> tuple[Iterator[dict[str, np.ndarray]], dict]:
    """The Ray Data pipeline: `trunk` over every row of `frame` (path, label_idx, split), or
    the same decode and trunk steps in this process (`runs_here`).

    Returns the batches, in the frame's order, each with those columns, `error` ('' or why the
    image could not be decoded) and `features` (the flattened trunk output as `cfg.dtype`), and
    the pipeline's settings (`actors`, `threads_per_actor`, `compile`, `fused_decode`,
    `in_process`).
    """
    cfg = sizing.resolved_features(cfg)  # `auto`: the rows per batch for this device
    if runs_here(len(frame), cfg):
        return _batches_here(frame, trunk, cfg, image_size), {
            "actors": 1, "threads_per_actor": torch.get_num_threads(), "compile": cfg.compile,
            "fused_decode": True, "in_process": True}
    import ray  # here: the in-process steps above run where Ray is not installed

    from boatray.cluster import start_ray

    start_ray()
    actors = actor_count(cfg)
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"]))
    threads = cfg.threads_per_actor or (
        None if cfg.use_gpu else max(1, (os.cpu_count() or 1) // math.ceil(actors / nodes)))
    # the rows as several blocks from the start (no repartition stage), so that every actor
    # gets work; in order, since the writers fill arrays in manifest order. Built here: no
    # metadata tasks that would wait for a node with CPUs before the actors ask for one
    blocks = max(actors, min(math.ceil(len(frame) / cfg.batch_size), 8 * actors))
    rows = frame[list(COLUMNS)].reset_index(drop=True)
    dataset = ray.data.from_items(rows.to_dict("records"), override_num_blocks=blocks)
    dataset.context.execution_options.preserve_order = True
    # on CPUs each actor decodes its own rows (no second operator to hold CPUs), as does a
    # GPU actor on its GPU (features.gpu_decode); else CPU tasks decode for the GPU actors
    fused_decode = not cfg.use_gpu or cfg.gpu_decode
    if not fused_decode:
        dataset = dataset.map_batches(decode_rows, fn_kwargs={"size": tuple(image_size)},
                                      batch_size=cfg.batch_size, batch_format="numpy",
                                      num_cpus=1)
    gpu = {"num_gpus": 1} if cfg.use_gpu else {}
    # Ray Data's actors restart when they are lost (a node lost with them): Ray starts a new
    # one, which fetches the trunk from the driver's object store, and retries its batches
    dataset = dataset.map_batches(
        TrunkRunner, fn_constructor_kwargs={
            "trunk": [ray.put(trunk)], "use_gpu": cfg.use_gpu, "amp": cfg.amp,
            "channels_last": cfg.channels_last, "threads": threads, "dtype": cfg.dtype,
            "compile": cfg.compile, "gpu_decode": cfg.gpu_decode,
            "decode_size": tuple(image_size) if fused_decode else None},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=cfg.batch_size,
        batch_format="numpy", num_cpus=cfg.cpus_per_actor, **gpu)
    return (_actors_started_quietly(dataset.iter_batches(batch_size=None, batch_format="numpy")),
            {"actors": actors, "threads_per_actor": threads, "compile": cfg.compile,
             "fused_decode": fused_decode, "in_process": False})


def _actors_started_quietly(batches: Iterator[dict[str, np.ndarray]]
                            ) -> Iterator[dict[str, np.ndarray]]:
    """`batches`, with this process's stderr sent to Ray's log folder until the first one
    arrives: creating an actor that may restart with its arguments in the object store (Ray
    Data's actors hold their function there) makes Ray's core log an ERROR line on the driver's
    stderr (ray-project/ray#53727), which a restart from the driver's own object store does
    not concern."""
    from boatray import console  # Ray's: imported where Ray runs

    batches = iter(batches)
    logs = console.ray_logs_dir()
    quiet = contextlib.nullcontext() if logs is None else _stderr_to(logs / "driver-ray.err")
    with quiet:
        first = next(batches, None)
    if first is None:
        return
    yield first
    yield from batches


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ core writes) redirected to `path` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _batches_here(frame: pd.DataFrame, trunk: nn.Module, cfg: FeaturesConfig,
                  image_size: tuple[int, int]) -> Iterator[dict[str, np.ndarray]]:
    """`trunk_batches`' batches computed in this process, decoding included."""
    runner = TrunkRunner(trunk, False, cfg.amp, cfg.channels_last, None, cfg.dtype,
                         cfg.compile)
    rows = frame[list(COLUMNS)].reset_index(drop=True)
    for begin in range(0, len(rows), cfg.batch_size):
        part = rows.iloc[begin:begin + cfg.batch_size]
        yield runner(decode_rows({c: part[c].to_numpy() for c in COLUMNS}, tuple(image_size)))


def extract_experiment(exp: Experiment, manifest: str | Path, out_path: str | Path,
                       sinks: Sequence[ActivationSink] = ()) -> Path:
    """`extract` with an experiment's model, features settings, image size and seed."""
    return extract(manifest, out_path, exp.model, exp.features, exp.data.image_size, exp.seed,
                   weightstore.location(exp.storage_uri), sinks)
