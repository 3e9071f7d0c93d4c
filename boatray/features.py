"""Ray Data feature extraction: the backbone trunk over every image of a manifest.

The pipeline: the manifest's rows (path, label_idx, split), repartitioned so that several
actors get work -> CPU tasks decode and resize with `boatray.data.images.decode` (uint8) ->
an actor pool of `TrunkRunner`s, each holding the trunk (one actor per GPU, `num_gpus=1`, or
CPU actors), normalising on its device (`images.normalize`), channels_last, bf16 autocast on
GPU, inference mode -> the driver streams the rows into ONE parquet file.

features.parquet: `path`, `label_idx`, `split` and `features`, a fixed-size list (float32, or
float16: `features.dtype`) of the flattened trunk output; the schema metadata holds
the classes, the output shape and the backbone. `features.json` beside it holds the
extraction's seconds, images/s and the images that failed to decode (listed and left out,
never silently dropped). `trunk` may end at any cut point of `boatray.models` (`pool`: the
2,048-d vectors of resnet50; `layer3`: the maps the `layer4` freeze spec's suffix consumes).
`trunk_batches` is the pipeline alone; the frozen-prefix cache (prefix_cache.py) writes its
batches to memory-mappable .npy files instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch import nn

from boatray import config as config_module
from boatray import models
from boatray.config import Experiment, FeaturesConfig, ModelConfig
from boatray.data.images import decode, normalize, to_chw
from boatray.data.manifest import ensure_manifest, read_manifest
from boatray.errors import BoatrayError, cli
from boatray.results import atomic_write_text

METADATA_KEY = b"boatray"
COLUMNS = ("path", "label_idx", "split")


def decode_rows(batch: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """CPU task: decode a batch of rows to uint8 (n, h, w, 3); a failure is kept in `error`."""
    images = np.zeros((len(batch["path"]), size[0], size[1], 3), dtype=np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = decode(str(path), size)
            errors.append("")
        except BoatrayError as exc:
            errors.append(str(exc))
    return {**{c: batch[c] for c in COLUMNS}, "image": images, "error": np.array(errors)}


class TrunkRunner:
    """Actor: the trunk on its device; uint8 images in, flattened features out.

    `trunk` is a one-item list holding the object-store reference of the trunk: the driver
    puts it there once, every actor (and a restarted one) fetches it.
    """

    def __init__(self, trunk: list, use_gpu: bool, amp: bool, channels_last: bool,
                 threads: int | None, dtype: str) -> None:
        trunk = ray.get(trunk[0])
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.amp = amp and use_gpu
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.trunk = trunk.to(self.device, memory_format=memory_format).eval()
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        out = None
        if ok.any():
            images = to_chw(batch["image"][ok]).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16,
                                                        enabled=self.amp):
                result = self.trunk(normalize(images, self.channels_last))
            out = result.float().flatten(1).cpu().numpy().astype(self.dtype)
        features = np.zeros((len(ok), out.shape[1] if out is not None else 0), self.dtype)
        if out is not None:
            features[ok] = out
        return {**{c: batch[c] for c in COLUMNS}, "error": batch["error"], "features": features}


def output_shape(trunk: nn.Module, image_size: tuple[int, int]) -> tuple[int, ...]:
    """The trunk's output shape for one image (e.g. (2048,) or (1024, 15, 50))."""
    with torch.inference_mode():
        return tuple(trunk.eval()(torch.zeros(1, 3, *image_size)).shape[1:])


def actor_count(cfg: FeaturesConfig) -> int:
    """`features.num_actors`, else one per GPU of the cluster, else one per CPU node."""
    if cfg.num_actors:
        return cfg.num_actors
    if cfg.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise BoatrayError("features.use_gpu is true but the Ray cluster has no GPU")
        return gpus
    return max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))


def extract(manifest_path: str | Path, out_path: str | Path, model: ModelConfig,
            cfg: FeaturesConfig, image_size: tuple[int, int]) -> Path:
    """Run the trunk of `model` (up to `cfg.stage`) over every manifest image with Ray Data;
    write `out_path` (features.parquet) and `features.json` beside it; return `out_path`."""
    frame, classes = read_manifest(manifest_path)
    network = models.build(model.name, model.weights, len(classes), model.pooling)
    trunk = models.trunk(network, cfg.stage)
    shape = output_shape(trunk, image_size)
    meta = {"classes": classes, "shape": list(shape), "stage": cfg.stage, "dtype": cfg.dtype,
            "image_size": list(image_size), "model": config_module.to_dict(model)}
    out_path = Path(out_path)
    batches, settings = trunk_batches(frame, trunk, cfg, image_size)  # lazy: runs below
    started = time.monotonic()
    written, failed = write_features(batches, out_path, meta)
    seconds = time.monotonic() - started
    stats = {"images": written, "failed": failed, "seconds": seconds,
             "images_per_second": written / seconds if seconds > 0 else None,
             "use_gpu": cfg.use_gpu, "batch_size": cfg.batch_size, **settings}
    atomic_write_text(stats_path(out_path), json.dumps(stats, indent=2) + "\n")
    print(f"[features] {written} images -> {out_path} in {seconds:.1f} s "
          f"({stats['images_per_second'] or 0:.1f} images/s, {settings['actors']} actor(s))",
          flush=True)
    if failed:
        print(f"[features] {len(failed)} image(s) could not be decoded and are left out "
              f"(listed in {stats_path(out_path)}): "
              + "; ".join(f["path"] for f in failed[:5]) + (" ..." if len(failed) > 5 else ""),
              flush=True)
    return out_path


def trunk_batches(frame: pd.DataFrame, trunk: nn.Module, cfg: FeaturesConfig,
                  image_size: tuple[int, int]) -> tuple[Iterator[dict[str, np.ndarray]], dict]:
    """The Ray Data pipeline: `trunk` over every row of `frame` (path, label_idx, split).

    Returns the batches, in the frame's order, each with those columns, `error` ('' or why the
    image could not be decoded) and `features` (the flattened trunk output as `cfg.dtype`), and
    the pipeline's settings (`actors`, `threads_per_actor`).
    """
    if not ray.is_initialized():
        ray.init()
    actors = actor_count(cfg)
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"]))
    threads = cfg.threads_per_actor or (
        None if cfg.use_gpu else max(1, (os.cpu_count() or 1) // math.ceil(actors / nodes)))
    dataset = ray.data.from_pandas(frame[list(COLUMNS)])
    dataset.context.execution_options.preserve_order = True
    blocks = max(actors, min(math.ceil(len(frame) / cfg.batch_size), 8 * actors))
    dataset = dataset.repartition(blocks).map_batches(
        decode_rows, fn_kwargs={"size": tuple(image_size)}, batch_size=cfg.batch_size,
        batch_format="numpy")
    gpu = {"num_gpus": 1} if cfg.use_gpu else {}
    dataset = dataset.map_batches(
        TrunkRunner, fn_constructor_kwargs={
            "trunk": [ray.put(trunk)], "use_gpu": cfg.use_gpu, "amp": cfg.amp,
            "channels_last": cfg.channels_last, "threads": threads, "dtype": cfg.dtype},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=cfg.batch_size,
        batch_format="numpy", num_cpus=cfg.cpus_per_actor, **gpu)
    return (dataset.iter_batches(batch_size=None, batch_format="numpy"),
            {"actors": actors, "threads_per_actor": threads})


def write_features(batches, out_path: Path, meta: dict) -> tuple[int, list[dict]]:
    """Stream batches into one parquet file (atomically); return (rows written, failures)."""
    width = int(np.prod(meta["shape"]))
    value_type = pa.float16() if meta["dtype"] == "float16" else pa.float32()
    schema = pa.schema([("path", pa.string()), ("label_idx", pa.int64()), ("split", pa.string()),
                        ("features", pa.list_(value_type, width))],
                       metadata={METADATA_KEY: json.dumps(meta).encode()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    written, failed = 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                bad = batch["error"] != ""
                failed += [{"path": str(p), "error": str(e)}
                           for p, e in zip(batch["path"][bad], batch["error"][bad])]
                good = ~bad
                values = np.ascontiguousarray(batch["features"][good]).reshape(-1)
                writer.write_table(pa.table({
                    "path": pa.array(batch["path"][good].astype(str)),
                    "label_idx": pa.array(batch["label_idx"][good].astype(np.int64)),
                    "split": pa.array(batch["split"][good].astype(str)),
                    "features": pa.FixedSizeListArray.from_arrays(
                        pa.array(values, type=value_type), width)}, schema=schema))
                written += int(good.sum())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return written, failed


def stats_path(features_path: str | Path) -> Path:
    """features.json beside features.parquet."""
    return Path(features_path).with_suffix(".json")


def feature_info(path: str | Path) -> dict:
    """A features file's metadata (classes, shape, stage, model) plus `extraction` stats."""
    path = Path(path)
    if not path.is_file():
        raise BoatrayError(f"features file not found: {path}")
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise BoatrayError(f"cannot read features file {path}: {exc}") from None
    if METADATA_KEY not in raw:
        raise BoatrayError(f"{path} is not a boatray features file (no metadata)")
    info = json.loads(raw[METADATA_KEY])
    stats = stats_path(path)
    info["extraction"] = json.loads(stats.read_text()) if stats.is_file() else {}
    return info


def read_features(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(X of shape (n, *shape), frame with path, label_idx, split) of a features file."""
    path = Path(path)
    info = feature_info(path)
    table = pq.read_table(path)
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(table.num_rows, *info["shape"])
    return x, table.drop_columns(["features"]).to_pandas()


def extract_for(exp: Experiment, manifest: str | Path, out_path: str | Path) -> Path:
    """The sweep's features stage, first half: `extract` with the experiment's settings."""
    return extract(manifest, out_path, exp.model, exp.features, exp.data.image_size)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.features`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.features",
        description="Extract backbone features of every manifest image with Ray Data.")
    config_module.add_arguments(parser)
    parser.add_argument("--manifest", help="manifest.parquet (default: the experiment's, "
                                           "prepared when needed)")
    parser.add_argument("--out", help="output features.parquet (default: "
                                      "results/<experiment>/features/features.parquet)")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """`python -m boatray.features [--config F] [--set k=v] [--data D] [--manifest P] [--out P]`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    manifest = args.manifest or ensure_manifest(exp)
    out = args.out or exp.results_dir / "features" / "features.parquet"
    extract_for(exp, manifest, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
