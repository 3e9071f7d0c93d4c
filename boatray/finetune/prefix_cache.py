"""The frozen-prefix cache: a frozen prefix's activations computed once, the suffix trained on them.

When a run's freeze spec leaves a prefix frozen (`freezing.frozen_prefix`) and no random
augmentation is on, the prefix computes the same activations in every epoch: `plan` decides
whether a run trains from a cache (only where it pays: `estimated_speedup` against
`train.cache_min_speedup`, and fits on the disk), `ensure` makes a missing one with the
features pipeline (or reads it from a features file of the same trunk), and a `CacheWriter`
fills one from any pass over the images, also the features' own (features.pipeline.extract's
sinks: one pass for the features and every cache). A cache is float16 .npy files that the
loop memory-maps (`CachedActivations`), and the loop trains `models.suffix` alone; checkpoints
still hold the whole model. A cache is named by everything its values depend on
(`cache_key`) and lives in `<storage>/cache/<key>/` with cache.json written last (a folder
without it is unfinished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from boatray import cachedir, freezing, models, precision, storage
from boatray.config import Experiment
from boatray.data.decoded import MappedSplit, allocate, rows_digest
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.results import Layout

INFO_FILE = "cache.json"
SPLITS = ("train", "valid")
"""What a training cache holds; an evaluation cache holds EVALUATED in EVALUATION_DTYPE."""
EVALUATED = ("valid", "test")
EVALUATION_DTYPE = "float32"
"""An evaluation cache's dtype: the selected runs' predictions from it equal those from images."""
FORMAT = 1
"""Part of every key: bump it when what a cache holds changes."""
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
    """The cache's folder name (a timm model's `timm/` becomes `timm-`): readable, then a
    digest of everything its values depend on, the
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
    return f"{exp.model.name.replace('/', '-')}-{stage}-{height}x{width}-{digest}"


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


@dataclass
class Plan:
    """A cache a run can train from: its cut point, why it is used, the rows it holds (train
    and valid, in manifest order), its key and location, one image's activations' shape, the
    manifest's number of classes (the model's head)."""

    exp: Experiment
    stage: str
    why: str
    rows: pd.DataFrame
    key: str
    where: str
    shape: tuple[int, ...]
    classes: int
    splits: tuple[str, ...] = SPLITS
    dtype: str = "float16"

    @property
    def files(self) -> list[str]:
        """Its files, in the order they are written and copied: cache.json (completion) last."""
        return [f"{split}.npy" for split in self.splits] + [INFO_FILE]

    @property
    def run(self) -> str:
        return f"freeze={self.exp.train.freeze} seed={self.exp.train.seed}"

    @property
    def ready(self) -> bool:
        """Whether the cache is there, complete."""
        return storage.is_file(storage.join(self.where, INFO_FILE))

    def same_trunk(self, features: FeaturesSource) -> bool:
        """Whether an extraction of `features` (model, weights, image size, seed) runs the
        same layers as this cache's prefix: one pass can give both."""
        random_init = self.exp.model.weights.lower() == "none"
        return ((features.model, features.image_size) == (
            dataclasses.asdict(self.exp.model), list(self.exp.data.image_size))
            and (not random_init or features.seed == self.exp.train.seed))


@dataclass
class FeaturesSource:
    """What an extraction's activations depend on besides the cut point."""

    model: dict
    image_size: list[int]
    seed: int


def plan(exp: Experiment, manifest: str | Path) -> Plan | None:
    """This run's frozen-prefix cache, or None (with a line saying why) when the run cannot
    use one, one would not pay (`estimated_speedup` below `train.cache_min_speedup`), or a new
    one would not fit on the disk it is written to."""
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
    shape = models.backbone(exp.model.name).output_shape(exp.data.image_size, stage,
                                                         exp.model.pooling)
    found = Plan(exp, stage, why, rows, key, location(exp, key), tuple(shape), len(classes),
                 dtype=DTYPE)
    if found.ready or _fits(found):
        return found
    print(f"[cache] {run}: frozen-prefix cache not used: its {stage} activations need "
          f"{_needed(found) / 2**30:.1f} GiB, {local_folder(found.where).parent} has "
          f"{cachedir.free_space(local_folder(found.where)) / 2**30:.1f} GiB free", flush=True)
    return None


def evaluation_plan(found: Plan, frame: pd.DataFrame) -> Plan | None:
    """The evaluation cache beside a training cache: the same cut point's valid and test
    activations in float32, from which the selected runs predict (`evaluation_cache`); None
    where it would not fit on the disk."""
    rows = frame[frame.split.isin(EVALUATED)].reset_index(drop=True)
    key = f"{cache_key(found.exp, rows, found.stage)}-evaluation"
    evaluation = dataclasses.replace(found, rows=rows, key=key, where=location(found.exp, key),
                                     splits=EVALUATED, dtype=EVALUATION_DTYPE)
    return evaluation if evaluation.ready or _fits(evaluation) else None


def evaluation_cache(exp: Experiment, frame: pd.DataFrame) -> str | None:
    """Where the evaluation cache of a run that trains from a cache is, if it was made."""
    stage = cached_stage(exp)[0]
    if stage is None:
        return None
    rows = frame[frame.split.isin(EVALUATED)].reset_index(drop=True)
    where = location(exp, f"{cache_key(exp, rows, stage)}-evaluation")
    return where if storage.is_file(storage.join(where, INFO_FILE)) else None


def _fits(found: Plan) -> bool:
    """Whether a new cache fits where it goes (cachedir.fits)."""
    return cachedir.fits(_needed(found), local_folder(found.where))


def _needed(found: Plan) -> int:
    return len(found.rows) * int(np.prod(found.shape)) * np.dtype(found.dtype).itemsize


def ensure(found: Plan, features: Path | None = None) -> str:
    """The plan's cache location, computed first where it is missing: read from `features`
    (a features file of the same trunk and cut point) where there is one, else by a pass of
    the prefix over its rows. Prints what it did."""
    if found.ready:
        print(f"[cache] {found.run}: training from cached {found.stage} activations "
              f"({found.why}): {found.where}", flush=True)
        return found.where
    source = features if _in_features(found, features) else None
    print(f"[cache] {found.run}: {'reading' if source else 'computing'} the {found.stage} "
          f"activations of {len(found.rows)} images{f' from {source}' if source else ''}",
          flush=True)
    info = _compute(found, source)
    made = "read from the features (their extraction included)" if source else "computed"
    print(f"[cache] {found.run}: training from cached {found.stage} activations ({found.why}):"
          f" {made}: {sum(info['images'].values())} images in {info['seconds']:.1f} s "
          f"({info['bytes'] / 2**20:.1f} MiB): {found.where}", flush=True)
    return found.where


def prepare(exp: Experiment, manifest: str | Path, features: Path | None = None) -> str | None:
    """The location of this run's frozen-prefix cache (`plan`), computed first when there is
    none (`ensure`); None when the run does not train from one."""
    found = plan(exp, manifest)
    return None if found is None else ensure(found, features)


def _in_features(found: Plan, features: Path | None) -> bool:
    """Whether a features file holds this cache's activations of every row: the same trunk
    (`Plan.same_trunk`), cut point and rows."""
    if features is None or not features.is_file():
        return False
    info = featurefile.feature_info(features)
    source = FeaturesSource(info["model"], info["image_size"], info.get("seed"))
    if info["stage"] != found.stage or not found.same_trunk(source):
        return False
    paths = featurefile.read_columns(features, ["path", "split"])
    return paths[paths.split.isin(SPLITS)].path.tolist() == found.rows.path.tolist()


def _batches_from(features: Path) -> tuple[list[dict[str, np.ndarray]], dict]:
    """A features file's train and valid rows as one batch of `trunk_batches`' kind."""
    x, table = featurefile.read_features(features)
    keep = table.split.isin(SPLITS).to_numpy()
    batch = {"split": table.split.to_numpy()[keep], "error": np.full(int(keep.sum()), ""),
             "features": x[keep].reshape(int(keep.sum()), -1)}
    stats = featurefile.feature_info(features)["extraction"]
    return [batch], {"from_features": str(features), "extraction_seconds": stats.get("seconds")}


def _compute(found: Plan, features: Path | None = None) -> dict:
    """Run the prefix up to the plan's cut point over its rows with the features pipeline (or
    read its activations from `features`) into the cache; return its cache.json record."""
    from boatray.features.pipeline import trunk_batches

    exp = found.exp
    writer = CacheWriter(found)
    try:
        started = time.monotonic()
        if features is not None:
            batches, settings = _batches_from(features)
        else:
            trunk = models.trunk(prefix_model(exp, found.classes), found.stage)
            cfg = dataclasses.replace(exp.features, stage=found.stage, dtype=found.dtype)
            batches, settings = trunk_batches(found.rows, trunk, cfg, exp.data.image_size)
        for batch in batches:
            writer.add(batch["split"], batch["error"], batch["features"])
        seconds = time.monotonic() - started + (settings.pop("extraction_seconds", 0) or 0)
        return writer.publish(seconds, settings)
    finally:
        writer.discard()


class CacheWriter:
    """A cache being filled, batch by batch in manifest order, in a temporary folder beside it:
    its splits' memory-mapped float16 arrays. `publish` writes cache.json and moves it into
    place (and onto a remote storage); an image that could not be decoded fails it."""

    def __init__(self, found: Plan) -> None:
        self.plan, self.stage = found, found.stage
        self.folder = local_folder(found.where)
        self.temporary = cachedir.temporary_beside(self.folder)
        counts = found.rows.split.value_counts()
        self.arrays = {split: allocate(self.temporary / f"{split}.npy",
                                       (int(counts.get(split, 0)), *found.shape), found.dtype)
                       for split in found.splits}
        self.filled = dict.fromkeys(found.splits, 0)
        self.error = ""

    def add(self, splits: np.ndarray, errors: np.ndarray, values: np.ndarray) -> None:
        """The next rows in manifest order (any split; those of other splits are skipped):
        their split, decoding error ('' if none) and flattened activations."""
        ours = np.isin(splits, self.plan.splits)
        failed = errors[ours & (errors != "")]
        self.error = self.error or (str(failed[0]) if len(failed) else "")
        for split in self.plan.splits:
            rows = values[splits == split]
            begin = self.filled[split]
            self.arrays[split][begin:begin + len(rows)] = rows.reshape(len(rows), *self.plan.shape)
            self.filled[split] += len(rows)

    def publish(self, seconds: float, settings: dict) -> dict:
        """Finish the cache (cache.json last, moved into place, copied to a remote storage):
        its cache.json record; a BoatrayError if an image could not be decoded."""
        if self.error:
            raise BoatrayError(f"cannot compute the frozen-prefix cache: {self.error} "
                               "(or set train.cache_prefix=false)")
        exp = self.plan.exp
        for array in self.arrays.values():
            array.flush()
        info = {"key": self.folder.name, "stage": self.stage, "shape": list(self.plan.shape),
                "dtype": self.plan.dtype, "images": self.filled, "seconds": seconds,
                "bytes": sum(a.nbytes for a in self.arrays.values()),
                "model": dataclasses.asdict(exp.model), "image_size": list(exp.data.image_size),
                "seed": exp.train.seed, **settings}
        self.arrays = {}
        (self.temporary / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        cachedir.publish(self.temporary, self.folder, INFO_FILE)
        if storage.is_remote(self.plan.where):  # the data files first, cache.json last
            storage.copy((self.folder / name, storage.join(self.plan.where, name))
                         for name in self.plan.files)
        return info

    def discard(self) -> None:
        """Drop what is left of the temporary folder (all of it, unless published)."""
        self.arrays = {}
        shutil.rmtree(self.temporary, ignore_errors=True)


def open_cache(where: str) -> tuple[Path, dict]:
    """(the local folder to read a cache from, its cache.json record); a remote cache is
    downloaded to this node once."""
    folder = local_folder(where)
    if not (folder / INFO_FILE).is_file():
        if not storage.is_remote(where):
            raise BoatrayError(f"frozen-prefix cache {where} not found on this node (a "
                               "multi-node cluster needs a shared storage_path)")
        temporary = cachedir.temporary_beside(folder)
        try:
            info = storage.read_bytes(storage.join(where, INFO_FILE))
            storage.copy((storage.join(where, f"{split}.npy"), temporary / f"{split}.npy")
                         for split in json.loads(info)["images"])
            (temporary / INFO_FILE).write_bytes(info)  # last: the copy is complete
            cachedir.publish(temporary, folder, INFO_FILE)
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
