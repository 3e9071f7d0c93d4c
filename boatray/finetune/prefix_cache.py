"""The frozen-prefix cache: a frozen prefix's activations computed once, the suffix trained on them.

When a run's freeze spec leaves a prefix frozen (`freezing.frozen_prefix`) and no random
augmentation is on, the prefix computes the same activations in every epoch: `prepare` computes
them once with the features pipeline, stores them as float16 .npy files that the loop
memory-maps (`CachedActivations`), and the loop trains `models.suffix` alone. Checkpoints still
hold the whole model. A cache is named by everything its values depend on (`cache_key`), lives
in `<storage>/cache/<key>/` with cache.json written last (a folder without it is unfinished),
and is computed only where it pays (`estimated_speedup` against `train.cache_min_speedup`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from boatray import freezing, models, precision, storage
from boatray.config import Experiment
from boatray.data.decoded import MappedSplit, allocate, rows_digest
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.results import Layout

INFO_FILE = "cache.json"
SPLITS = ("train", "valid")
FILES = tuple(f"{split}.npy" for split in SPLITS) + (INFO_FILE,)
"""A cache's files, in the order they are written and copied: cache.json (completion) last."""
FORMAT = 1
"""Part of every key: bump it when what a cache holds changes."""
FREE_DISK_SHARE = 0.9
"""A new cache may take at most this share of the free space where it is written."""
DTYPE = "float16"
"""What caches store (part of the key; the tests use float32 to show the cached path exact)."""


def cached_stage(exp: Experiment) -> tuple[str | None, str]:
    """(the cut point whose cached activations this run can train from, or None; why)."""
    cfg = exp.train
    if not cfg.cache_prefix:
        return None, "train.cache_prefix is false"
    if exp.data.augment:
        return None, "data.augment is on (random flips change the activations every epoch)"
    stage = freezing.frozen_prefix(exp.model.name, cfg.freeze)
    if stage is None:
        return None, f"freeze {cfg.freeze!r} leaves no stage frozen for the whole run"
    return stage, f"freeze {cfg.freeze!r} leaves everything up to {stage} frozen"


def cached_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows a cache holds, in its order: the train and valid splits."""
    return frame[frame.split.isin(SPLITS)].reset_index(drop=True)


def cache_key(exp: Experiment, rows: pd.DataFrame, stage: str) -> str:
    """The cache's name: readable, then a digest of everything its values depend on, the
    device type and compute dtype that extract it included (a cache made in fp32 on a CPU is
    not reused by a bf16 run on a GPU, nor the reverse)."""
    device = "cuda" if exp.features.use_gpu else "cpu"  # as the features pipeline places it
    weights = exp.model.weights
    random_init = weights.lower() == "none"
    digest = models.weights_source(exp.model.name, weights).get("sha256")
    inputs = {"format": FORMAT, "model": exp.model.name, "pooling": exp.model.pooling,
              "weights": f"sha256:{digest}" if digest else weights,
              "stage": stage, "image_size": list(exp.data.image_size), "dtype": DTYPE,
              "seed": exp.train.seed if random_init else None, "rows": rows_digest(rows),
              "device": device, "compute": precision.compute_dtype(exp.features.amp, device)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    height, width = exp.data.image_size
    return f"{exp.model.name}-{stage}-{height}x{width}-{digest}"


def location(exp: Experiment, key: str) -> str:
    """Where the cache `key` of this experiment lives: a folder, or a storage URI."""
    return storage.join(exp.storage_uri, Layout.CACHE, key)


def local_folder(where: str) -> Path:
    """The folder this node reads a cache from: the cache itself, or for a remote one a
    node-local copy."""
    if not storage.is_remote(where):
        return Path(where)
    return Path(tempfile.gettempdir()) / "boatray-cache" / storage.name(where)


def prefix_model(exp: Experiment, num_classes: int) -> nn.Module:
    """The run's initial model, as the worker builds it: right after torch.manual_seed(seed)
    (the caller's random state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(exp.train.seed)
        return models.build(exp.model.name, exp.model.weights, num_classes, exp.model.pooling)


def estimated_speedup(exp: Experiment, stage: str, num_classes: int) -> float:
    """How much faster an epoch of `exp` trains from `stage`'s cached activations, by FLOPs
    (the Backbone's, no network built): (prefix + 3 x suffix) / (3 x suffix), the suffix's
    backward counted as twice its forward. Reading the cache is not counted."""
    backbone, size = models.backbone(exp.model.name), exp.data.image_size
    prefix = backbone.flops(size, num_classes, exp.model.pooling, upto=stage)
    suffix = max(backbone.flops(size, num_classes, exp.model.pooling) - prefix, 1)
    return (prefix + 3 * suffix) / (3 * suffix)


def prepare(exp: Experiment, manifest: str | Path, features: Path | None = None) -> str | None:
    """The location of this run's frozen-prefix cache, computed first when there is none; None
    when the run cannot use one, one would not pay (`estimated_speedup` below
    `train.cache_min_speedup`), or a new one would not fit on the disk it is written to.
    Prints a line saying which, and why. A pooled cache is read from `features`, a features
    file of the same trunk, where there is one: one trunk pass serves both."""
    stage, why = cached_stage(exp)
    run = f"freeze={exp.train.freeze} seed={exp.train.seed}"
    if stage is None:
        print(f"[cache] {run}: frozen-prefix cache not used: {why}", flush=True)
        return None
    frame, classes = read_manifest(manifest)
    speedup = estimated_speedup(exp, stage, len(classes))
    if speedup < exp.train.cache_min_speedup:
        print(f"[cache] {run}: frozen-prefix cache not used: training from {stage}'s "
              f"activations would make an epoch about {speedup:.2f}x faster (by FLOPs), below "
              f"train.cache_min_speedup={exp.train.cache_min_speedup:g}", flush=True)
        return None
    why += (", over 100x fewer FLOPs per epoch" if speedup > 100 else
            f", about {speedup:.1f}x fewer FLOPs per epoch")
    rows = cached_rows(frame)
    key = cache_key(exp, rows, stage)
    where = location(exp, key)
    if storage.is_file(storage.join(where, INFO_FILE)):
        print(f"[cache] {run}: training from cached {stage} activations ({why}): {where}",
              flush=True)
        return where
    shape = models.backbone(exp.model.name).output_shape(exp.data.image_size, stage,
                                                         exp.model.pooling)
    folder = local_folder(where)
    needed = len(rows) * int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    free = shutil.disk_usage(_existing(folder)).free
    if needed > FREE_DISK_SHARE * free:
        print(f"[cache] {run}: frozen-prefix cache not used: its {stage} activations need "
              f"{needed / 2**30:.1f} GiB, {folder.parent} has {free / 2**30:.1f} GiB free",
              flush=True)
        return None
    source = features if _same_trunk(exp, rows, stage, features) else None
    print(f"[cache] {run}: {'reading' if source else 'computing'} the {stage} activations of "
          f"{len(rows)} images{f' from {source}' if source else ''}", flush=True)
    trunk = None if source else models.trunk(prefix_model(exp, len(classes)), stage)
    info = _compute(exp, rows, stage, trunk, shape, folder, source)
    if storage.is_remote(where):  # the data files first, cache.json (completion) last
        storage.copy((folder / name, storage.join(where, name)) for name in FILES)
    made = "read from the features (their extraction included)" if source else "computed"
    print(f"[cache] {run}: training from cached {stage} activations ({why}): {made}: "
          f"{sum(info['images'].values())} images in {info['seconds']:.1f} s "
          f"({info['bytes'] / 2**20:.1f} MiB): {where}", flush=True)
    return where


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _same_trunk(exp: Experiment, rows: pd.DataFrame, stage: str, features: Path | None
                ) -> bool:
    """Whether a features file holds this run's `stage` activations of every row: the same
    model, weights (and seed, for random ones), image size and cut point."""
    if features is None or not features.is_file():
        return False
    info = featurefile.feature_info(features)
    same_init = exp.model.weights.lower() != "none" or info.get("seed") == exp.train.seed
    if (info["stage"], info["image_size"], info["model"]) != (
            stage, list(exp.data.image_size), dataclasses.asdict(exp.model)) or not same_init:
        return False
    paths = featurefile.read_columns(features, ["path", "split"])
    return paths[paths.split.isin(SPLITS)].path.tolist() == rows.path.tolist()


def _batches_from(features: Path) -> tuple[list[dict[str, np.ndarray]], dict]:
    """A features file's train and valid rows as one batch of `trunk_batches`' kind."""
    x, table = featurefile.read_features(features)
    keep = table.split.isin(SPLITS).to_numpy()
    batch = {"split": table.split.to_numpy()[keep], "error": np.full(int(keep.sum()), ""),
             "features": x[keep].reshape(int(keep.sum()), -1)}
    stats = featurefile.feature_info(features)["extraction"]
    return [batch], {"from_features": str(features), "extraction_seconds": stats.get("seconds")}


def _compute(exp: Experiment, rows: pd.DataFrame, stage: str, trunk: nn.Module | None,
             shape: tuple[int, ...], folder: Path, features: Path | None = None) -> dict:
    """Run `trunk`, the prefix up to `stage`, over `rows` with the features pipeline (or read
    its activations from `features`; `trunk` is then None) into `folder` (the cache, or its
    node-local copy); return its cache.json record."""
    from boatray.features.pipeline import trunk_batches

    cfg = dataclasses.replace(exp.features, stage=stage, dtype=DTYPE)
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir(parents=True)
    try:
        counts = rows.split.value_counts()
        arrays = {split: allocate(temporary / f"{split}.npy",
                                  (int(counts.get(split, 0)), *shape), DTYPE)
                  for split in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        started = time.monotonic()
        batches, settings = (_batches_from(features) if features is not None
                             else trunk_batches(rows, trunk, cfg, exp.data.image_size))
        for batch in batches:
            errors = batch["error"][batch["error"] != ""]
            if len(errors):
                raise BoatrayError(f"cannot compute the frozen-prefix cache: {errors[0]} "
                                   "(or set train.cache_prefix=false)")
            for split in SPLITS:
                values = batch["features"][batch["split"] == split]
                arrays[split][filled[split]:filled[split] + len(values)] = (
                    values.reshape(len(values), *shape))
                filled[split] += len(values)
        seconds = time.monotonic() - started
        for array in arrays.values():
            array.flush()
        info = {"key": folder.name, "stage": stage, "shape": list(shape), "dtype": DTYPE,
                "images": filled, "seconds": seconds + (settings.get("extraction_seconds") or 0),
                "bytes": sum(a.nbytes for a in arrays.values()),
                "model": dataclasses.asdict(exp.model), "image_size": list(exp.data.image_size),
                "seed": exp.train.seed, **settings}
        del arrays
        (temporary / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _publish(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return info


def _publish(temporary: Path, folder: Path) -> None:
    """Rename a finished temporary folder into place; if another writer got there first, its
    (equal) cache stays and ours is dropped by the caller."""
    try:
        os.rename(temporary, folder)
    except OSError:
        if not (folder / INFO_FILE).is_file():
            raise


def open_cache(where: str) -> tuple[Path, dict]:
    """(the local folder to read a cache from, its cache.json record); a remote cache is
    downloaded to this node once."""
    folder = local_folder(where)
    if not (folder / INFO_FILE).is_file():
        if not storage.is_remote(where):
            raise BoatrayError(f"frozen-prefix cache {where} not found on this node (a "
                               "multi-node cluster needs a shared storage_path)")
        temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        temporary.mkdir(parents=True)
        try:
            storage.copy((storage.join(where, name), temporary / name) for name in FILES)
            _publish(temporary, folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return folder, json.loads((folder / INFO_FILE).read_text())


class CachedActivations(MappedSplit):
    """(float16 activations, label index) of one split of a cache. Indexed by a list of indices
    (a `BatchSampler`'s batch, with `DataLoader(batch_size=None)`), it returns the whole batch,
    (n, *shape) and (n,), read at once: stacking 1.5 MB items one by one costs more than the
    read."""

    what = "frozen-prefix cache"

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.array(self._array()[index])  # a copy: a row, or the batch's rows
        return torch.from_numpy(rows), torch.as_tensor(self.labels[index])
