"""Disk space: what a run will store, checked against the free space before it starts, and a
full disk during the run said in one line.

The estimate adds up, from the model's size and the manifest's counts, in the results folder:
the tensors that do not train, once (weightstore.py: once per seed for a randomly initialised
network); every trial's last checkpoint (what its freeze spec trains) and, until the sweep ends,
its KEEP_CHECKPOINTS checkpoints with their optimizer states, plus the next one each concurrent
trial writes; the exported models;
the features; the baseline; the report and logs. In the temporary folders: the checkpoint each
concurrent trial writes first, and Ray's object spilling. The frozen-prefix and decoded-image
caches are counted apart: where one does not fit it is skipped (the run then trains from
images), so they never stop a run. Folders on one filesystem share its free space. With a
remote storage_path only what the driver stages locally is counted.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from boatray import approaches, cachedir, freezing, models
from boatray.config import Experiment
from boatray.errors import BoatrayError
from boatray.finetune import prefix_cache
from boatray.finetune.checkpoints import KEEP_CHECKPOINTS

FULL = (errno.ENOSPC, errno.EDQUOT)
REPORT_AND_LOGS = 5 * 2**20
TRIALS_LAST = "each trial's last checkpoint"
WHILE_SWEEPING = "earlier checkpoints and optimizer states while the sweep runs"
"""The report (figures, tables, HTML), Ray's logs and the small JSON files: a few MB."""


@dataclass
class Need:
    """Bytes a run stores in one folder: what it must have, and caches it can do without."""

    folder: Path
    what: str  # "results", "temporary files", "Ray's object spilling"
    required: dict[str, int] = field(default_factory=dict)
    optional: dict[str, int] = field(default_factory=dict)


def needs(exp: Experiment, manifest: pd.DataFrame) -> list[Need]:
    """What the run of `exp` on `manifest` stores where (an estimate: see the module)."""
    classes = int(manifest.loc[manifest.split == "train", "label"].nunique())
    images = len(manifest)
    cached_rows = int(manifest.split.isin(("train", "valid")).sum())
    backbone = models.backbone(exp.model.name)
    network = _on_meta(exp.model.name, classes, exp.model.pooling)
    seeds = exp.sweep.repeats if str(exp.model.weights).lower() == "none" else 1
    results = Need(exp.results_dir, "results", {
        "report and logs": REPORT_AND_LOGS, "frozen tensors, once": _bytes(network) * seeds})
    temporary = Need(Path(tempfile.gettempdir()), "temporary files")
    spill = Need(_spill_dir(), "Ray's object spilling")
    if exp.sweep.enabled:
        trained = {spec: _trained(network, spec) for spec in exp.sweep.freeze}
        slots = {"adam": 2, "adamw": 2}.get(exp.train.optimizer,
                                            1 if exp.train.momentum > 0 else 0)
        concurrent = max(trained.values()) * (1 + slots) * exp.sweep.max_concurrent_trials
        if exp.sweep.search == "grid":
            last = sum(size * len(exp.sweep.rates(spec)) for spec, size in trained.items()) * (
                len(exp.sweep.scheduler) * exp.sweep.repeats)
        else:
            last = max(trained.values()) * exp.sweep.num_samples * exp.sweep.repeats
        results.required[TRIALS_LAST] = last
        results.required[WHILE_SWEEPING] = last * ((1 + slots) * KEEP_CHECKPOINTS - 1) + concurrent
        results.required["exported fine-tunes"] = sum(trained.values()) * exp.sweep.repeats
        temporary.required["checkpoints being written"] = concurrent
        results.optional["frozen-prefix caches"] = _prefix_caches(exp, classes, cached_rows)
    temporary.optional["decoded images"] = _decoded(exp, cached_rows)
    heads = [a for a in approaches.enabled(exp.to_dict()) if a.uses_features]
    if heads or exp.sweep.enabled and exp.features.enabled:
        width = _elements(backbone, exp, exp.features.stage)
        features = images * width * (2 if exp.features.dtype == "float16" else 4)
        results.required["features"] = features
        spill.required["the trunk and features in Ray's object store"] = features + _bytes(
            models.trunk(network, exp.features.stage))
        # a head's export: its trunk in the store, at most a float64 row per training image
        results.required["exported heads on features"] = len(heads) * 8 * width * cached_rows
    if exp.baseline.enabled:
        base = _bytes(_on_meta("bettercnn", classes, "avg"))
        results.required["baseline checkpoints and exports"] = 3 * base * exp.sweep.repeats
        temporary.required["checkpoints being written"] = max(
            temporary.required.get("checkpoints being written", 0), 3 * base)
    if exp.remote_storage:  # Tune, Train, the caches and the store write to the storage itself
        for kept_there in (TRIALS_LAST, WHILE_SWEEPING, "frozen tensors, once"):
            results.required.pop(kept_there, None)
        results.optional.pop("frozen-prefix caches", None)
    return [need for need in (results, temporary, spill) if need.required or need.optional]


def check(exp: Experiment, manifest: pd.DataFrame) -> None:
    """Refuse, in one line with both figures, a run whose required storage does not fit in
    the free space of its folders (counting what an earlier run of it already stored)."""
    for device, group in _by_filesystem(needs(exp, manifest)).items():
        wanted = sum(_still_needed(need) for need in group)
        free = shutil.disk_usage(device).free
        if wanted > free:
            names = " and ".join(f"{need.what} ({need.folder})" for need in group)
            raise BoatrayError(
                f"not enough disk space: this run needs about {_size(wanted)} for its "
                f"{names}, and {device} has {_size(free)} free: free space there, or move "
                + ("the results with --set storage_path=..." if group[0].what == "results"
                   else "them with TMPDIR=... (and Ray's with its temp folder)"))


def plan_line(exp: Experiment, manifest: pd.DataFrame) -> str:
    """The plan's storage line: per folder, what the run stores and the free space there."""
    parts = []
    for need in needs(exp, manifest):
        detail = ", ".join(f"{what} {_size(size)}" for what, size in need.required.items()
                           if size)
        optional = ", ".join(f"{what} {_size(size)}" for what, size in need.optional.items()
                             if size)
        free = cachedir.free_space(need.folder)
        parts.append(f"{need.what} {need.folder}: about {_size(sum(need.required.values()))}"
                     f" ({detail}{'; if they fit, ' + optional if optional else ''}); "
                     f"{_size(free)} free")
    return "storage: " + " | ".join(parts)


def is_full(exc: BaseException) -> bool:
    """Whether an error is a full disk (or quota)."""
    return isinstance(exc, OSError) and (
        exc.errno in FULL or os.strerror(errno.ENOSPC) in str(exc))


def full_disk_line(exc: OSError, folders: list[Path]) -> str:
    """A full disk in one line naming the folder (the file's, else the fullest of `folders`:
    the results and temporary folders) and its free space."""
    if exc.filename:
        written = Path(exc.filename)
        folder = cachedir.nearest_existing(written if written.is_dir() else written.parent)
    else:
        folder = min((cachedir.nearest_existing(f) for f in folders), key=cachedir.free_space)
    return (f"no space left on device in {folder} ({_size(cachedir.free_space(folder))} "
            f"free there)")


def _still_needed(need: Need) -> int:
    """A folder's required bytes less what an earlier run of the experiment already stored."""
    wanted = sum(need.required.values())
    if need.what != "results" or not need.folder.is_dir():
        return wanted
    stored = sum(path.stat().st_size for path in need.folder.rglob("*") if path.is_file())
    return max(0, wanted - stored)


def _by_filesystem(found: list[Need]) -> dict[Path, list[Need]]:
    groups: dict[int, list[Need]] = {}
    for need in found:
        groups.setdefault(cachedir.nearest_existing(need.folder).stat().st_dev, []).append(need)
    return {cachedir.nearest_existing(group[0].folder): group for group in groups.values()}




def _spill_dir() -> Path:
    """Where this node's Ray spills objects: its configured folder, else the session's."""
    try:
        from ray._private import worker

        node = worker._global_node
        config = json.loads(node._object_spilling_config or "{}")
        where = config.get("params", {}).get("directory_path")
        return Path(where[0] if isinstance(where, list) else where or node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - no local Ray node, or another Ray: its temp folder
        return Path(tempfile.gettempdir()) / "ray"


def _on_meta(name: str, classes: int, pooling: str) -> nn.Module:
    """The network on the meta device: its shapes without its weights."""
    with torch.device("meta"):
        return models.build(name, "none", classes, pooling)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _trained(network: nn.Module, spec: str) -> int:
    """Bytes of what `spec` trains (`gradual`: all of it by its end)."""
    freezing.freeze(network, "all" if spec == "gradual" else spec)
    return sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)


def _elements(backbone, exp: Experiment, stage: str) -> int:
    """Activations of one image at the cut point `stage`."""
    return math.prod(backbone.output_shape(exp.data.image_size, stage, exp.model.pooling))


def _prefix_caches(exp: Experiment, classes: int, rows: int) -> int:
    """The frozen-prefix caches the sweep's freeze specs train from (one per seed): where a
    prefix stays frozen and caching it pays (`train.cache_min_speedup`)."""
    backbone = models.backbone(exp.model.name)
    stages = {stage for spec in exp.sweep.freeze
              if (stage := prefix_cache.cached_stage(_with_freeze(exp, spec))[0]) is not None
              and prefix_cache.estimated_speedup(exp, stage, classes)
              >= exp.train.cache_min_speedup}
    return sum(_elements(backbone, exp, stage) for stage in stages) * rows * 2 * exp.sweep.repeats


def _decoded(exp: Experiment, rows: int) -> int:
    """The decoded-image caches: the sweep's, when a trial trains from pixels, and the
    baseline's at its size (neither with augmentation)."""
    if not exp.train.cache_decoded or exp.data.augment:
        return 0
    sizes = [tuple(exp.baseline.image_size)] if exp.baseline.enabled else []
    if exp.sweep.enabled and any(prefix_cache.cached_stage(_with_freeze(exp, spec))[0] is None
                                 for spec in exp.sweep.freeze):
        sizes.append(tuple(exp.data.image_size))
    return sum(rows * height * width * 3 for height, width in sizes)


def _with_freeze(exp: Experiment, spec: str) -> Experiment:
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, freeze=spec))


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"
