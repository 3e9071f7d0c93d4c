"""The frozen-prefix cache: a frozen prefix's activations computed once, the suffix trained on them.

When a run's freeze spec leaves a prefix of the network frozen (`models.frozen_prefix`: `head`
-> the pooled features, `last1` -> the maps before the last stage, ...) and no random
augmentation is on, that prefix computes the same activations for an image in every epoch.
`prepare` computes them once with the features pipeline (`features.trunk_batches`: Ray Data,
one model actor per GPU or CPU actors), stores them as float16, and the worker loop (train.py)
trains only `models.suffix` from them. Its checkpoints still hold the whole model (frozen
prefix + trained suffix), so prediction and the report work on images as before. `head` then
trains a linear head on cached feature vectors.

A cache is computed only where it pays (`estimated_speedup`, `train.cache_min_speedup`): an
uncached epoch runs the frozen prefix forward and the suffix forward and backward (about three
times its forward), a cached one the suffix alone. On ResNet50 at 240x800 that is about 10^5x
for `head`, 2.3x for `last1`, 1.3x for `last2` and 1.1x for `last3`; the last two would
store 12 and 24 GB of activations of MarDCT's lab16 train+valid images to save a fifth of an
epoch or less, so the default 1.5 caches `head` and `last1` only.

A cache is named by what its values depend on (`cache_key`): backbone, weights (a file by its
content), cut point, pooling, image size, the manifest's train and valid rows (path, label,
split, file size) and, for random weights (`none`), the run's seed: the prefix is then the
seeded initialisation the run itself draws (the worker builds its model right after
`torch.manual_seed(train.seed)`, as `prefix_model` does).

Layout: `<exp.storage_uri>/cache/<key>/` with `train.npy` and `valid.npy`, float16 arrays of
shape (images, *activation shape) in manifest order, and `cache.json`, written last: a folder
without it is unfinished and never read. Why .npy: the worker memory-maps them
(`np.load(mmap_mode="r")`) and the OS pages rows in as batches are read, so a layer3 cache of
MarDCT (1024x15x50 per image at 240x800: 1.5 MB, about 7 GB in all) is never held in RAM at
once, and every loader process shares the same page cache. The pooled features (4 KB per
image) use the same format; features.parquet is a table for the SVM, read whole, whose rows
cannot be memory-mapped.

Writing is atomic: the files go to a temporary folder renamed into place (a writer that loses a
race drops its copy). With a remote storage_path (s3://...) they are computed in a node-local
folder and uploaded, cache.json last, and each node that reads them downloads one local copy.
The sweep computes every cache its trials need on the driver before the first trial starts
(tuning.run_sweep) and hands each trial its location, so no two trials compute the same cache.
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
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from pyarrow import fs
from torch import nn

from boatray import models
from boatray.config import Experiment
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError

CACHE_DIR = "cache"
"""Caches live in <exp.storage_uri>/cache/<key>/."""
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
    if cfg.freeze == "gradual":
        return None, "gradual unfreezing changes the frozen prefix during the run"
    stage = models.frozen_prefix(exp.model.name, cfg.freeze)
    if stage is None:
        return None, f"freeze {cfg.freeze!r} leaves no stage frozen"
    return stage, f"freeze {cfg.freeze!r} leaves everything up to {stage} frozen"


def cached_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows a cache holds, in its order: the train and valid splits."""
    return frame[frame.split.isin(SPLITS)].reset_index(drop=True)


def cache_key(exp: Experiment, rows: pd.DataFrame, stage: str) -> str:
    """The cache's name: readable, then a digest of everything its values depend on."""
    weights = exp.model.weights
    random_init = weights.lower() == "none"
    digest = models.weights_source(exp.model.name, weights).get("sha256")
    inputs = {"format": FORMAT, "model": exp.model.name, "pooling": exp.model.pooling,
              "weights": f"sha256:{digest}" if digest else weights,
              "stage": stage, "image_size": list(exp.data.image_size), "dtype": DTYPE,
              "seed": exp.train.seed if random_init else None, "rows": _rows_digest(rows)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    height, width = exp.data.image_size
    return f"{exp.model.name}-{stage}-{height}x{width}-{digest}"


def _rows_digest(rows: pd.DataFrame) -> str:
    """The rows' paths, labels, splits and image file sizes (a replaced image of another size
    changes the digest; sizes, unlike modification times, survive copying the data)."""
    digest = hashlib.sha256()
    for path, label, split in zip(rows.path, rows.label_idx, rows.split):
        size = os.stat(path).st_size if os.path.exists(path) else -1
        digest.update(f"{path}\t{label}\t{split}\t{size}\n".encode())
    return digest.hexdigest()


def location(exp: Experiment, key: str) -> str:
    """Where the cache `key` of this experiment lives: a folder, or a URI (s3://...)."""
    return f"{exp.storage_uri}/{CACHE_DIR}/{key}"


def local_folder(where: str) -> Path:
    """The folder this node reads a cache from: the cache itself, or for a remote one a
    node-local copy."""
    if "://" not in where:
        return Path(where)
    return Path(tempfile.gettempdir()) / "boatray-cache" / PurePosixPath(where).name


def _finished(where: str) -> bool:
    if "://" not in where:
        return (Path(where) / INFO_FILE).is_file()
    remote, base = fs.FileSystem.from_uri(where)
    return remote.get_file_info(f"{base}/{INFO_FILE}").type == fs.FileType.File


def prefix_model(exp: Experiment, num_classes: int) -> nn.Module:
    """The run's initial model, as the worker builds it: right after torch.manual_seed(seed)
    (the caller's random state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(exp.train.seed)
        return models.build(exp.model.name, exp.model.weights, num_classes, exp.model.pooling)


def estimated_speedup(network: nn.Module, stage: str, image_size: Sequence[int]) -> float:
    """How much faster an epoch trains from `stage`'s cached activations, by FLOPs:
    (prefix + 3 x suffix) / (3 x suffix), the suffix's backward counted as twice its forward.
    Reading the cache is not counted."""
    prefix = models.forward_flops(models.trunk(network, stage), image_size)
    suffix = max(models.forward_flops(network, image_size) - prefix, 1)
    return (prefix + 3 * suffix) / (3 * suffix)


def prepare(exp: Experiment, manifest: str | Path) -> str | None:
    """The location of this run's frozen-prefix cache, computed first when there is none; None
    when the run cannot use one, one would not pay (`estimated_speedup` below
    `train.cache_min_speedup`), or a new one would not fit on the disk it is written to.
    Prints a line saying which, and why."""
    stage, why = cached_stage(exp)
    run = f"freeze={exp.train.freeze} seed={exp.train.seed}"
    if stage is None:
        print(f"[cache] {run}: frozen-prefix cache not used: {why}", flush=True)
        return None
    frame, classes = read_manifest(manifest)
    network = prefix_model(exp, len(classes))
    speedup = estimated_speedup(network, stage, exp.data.image_size)
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
    if _finished(where):
        print(f"[cache] {run}: training from cached {stage} activations ({why}): {where}",
              flush=True)
        return where
    from boatray import features

    trunk = models.trunk(network, stage)
    shape = features.output_shape(trunk, exp.data.image_size)
    folder = local_folder(where)
    needed = len(rows) * int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    free = shutil.disk_usage(_existing(folder)).free
    if needed > FREE_DISK_SHARE * free:
        print(f"[cache] {run}: frozen-prefix cache not used: its {stage} activations need "
              f"{needed / 2**30:.1f} GiB, {folder.parent} has {free / 2**30:.1f} GiB free",
              flush=True)
        return None
    print(f"[cache] {run}: computing the {stage} activations of {len(rows)} images",
          flush=True)
    info = _compute(exp, rows, stage, trunk, shape, folder)
    if "://" in where:
        _copy_files(folder, where, upload=True)
    print(f"[cache] {run}: training from cached {stage} activations ({why}): computed "
          f"{sum(info['images'].values())} images in {info['seconds']:.1f} s "
          f"({info['bytes'] / 2**20:.1f} MiB): {where}", flush=True)
    return where


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _compute(exp: Experiment, rows: pd.DataFrame, stage: str, trunk: nn.Module,
             shape: tuple[int, ...], folder: Path) -> dict:
    """Run `trunk`, the prefix up to `stage`, over `rows` with the features pipeline into
    `folder` (the cache, or its node-local copy); return its cache.json record."""
    from boatray import features

    cfg = dataclasses.replace(exp.features, stage=stage, dtype=DTYPE)
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir(parents=True)
    try:
        counts = rows.split.value_counts()
        arrays = {split: np.lib.format.open_memmap(
            temporary / f"{split}.npy", mode="w+", dtype=DTYPE,
            shape=(int(counts.get(split, 0)), *shape)) for split in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        batches, settings = features.trunk_batches(rows, trunk, cfg, exp.data.image_size)
        started = time.monotonic()
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
                "images": filled, "seconds": seconds,
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


def _copy_files(folder: Path, where: str, upload: bool) -> None:
    """Copy a cache's files between a local folder and a remote URI, cache.json last."""
    remote, base = fs.FileSystem.from_uri(where)
    local = fs.LocalFileSystem()
    if upload:
        remote.create_dir(base, recursive=True)
    for name in FILES:
        pair = (str(folder / name), f"{base}/{name}")
        source, target = pair if upload else pair[::-1]
        fs.copy_files(source, target, *((local, remote) if upload else (remote, local)))


def open_cache(where: str) -> tuple[Path, dict]:
    """(the local folder to read a cache from, its cache.json record); a remote cache is
    downloaded to this node once."""
    folder = local_folder(where)
    if not (folder / INFO_FILE).is_file():
        if "://" not in where:
            raise BoatrayError(f"frozen-prefix cache {where} not found on this node (a "
                               "multi-node cluster needs a shared storage_path)")
        temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        temporary.mkdir(parents=True)
        try:
            _copy_files(temporary, where, upload=False)
            _publish(temporary, folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return folder, json.loads((folder / INFO_FILE).read_text())


class CachedActivations(torch.utils.data.Dataset):
    """(float16 activations, label index) of one split of a cache, read from its memory-mapped
    .npy; each loader process opens its own map.

    Indexed by a list of indices (a `BatchSampler`'s batch, with `DataLoader(batch_size=None)`),
    it returns the whole batch, (n, *shape) and (n,), read at once: stacking 1.5 MB items one by
    one in the default collate costs more than the read.
    """

    def __init__(self, folder: str | Path, split: str, labels: Sequence[int]) -> None:
        self.file = Path(folder) / f"{split}.npy"
        self.labels = np.asarray(labels, dtype=np.int64)
        self._rows: np.ndarray | None = None
        if len(self._array()) != len(self.labels):
            raise BoatrayError(f"frozen-prefix cache {self.file} holds {len(self._array())} "
                               f"images, the manifest's {split} split {len(self.labels)}")

    def _array(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.file, mmap_mode="r")
        return self._rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}  # pickle the path, not the mapped data

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.array(self._array()[index])  # a copy: a row, or the batch's rows
        return torch.from_numpy(rows), torch.as_tensor(self.labels[index])
