"""The checkpoint format of a training run, and finding a run's latest intact checkpoint.

A checkpoint folder holds model.pt (the unwrapped model's state dict: what trained, and in
model.refs.json the frozen tensors kept once in the results folder's weight store,
weightstore.py), train_state.pt (optimizer, scheduler, finished epochs) and meta.json (classes,
model, image size, freeze spec, seed, epoch and the per-epoch history): enough to resume, to
predict, and to rebuild the model without the experiment config. The checkpoint of a finished
sweep trial keeps no train_state.pt (`finalize`): it never trains again. manifest.json, written
last, records the size and sha256 of every other file in the folder: a checkpoint cut short (a
killed writer, a full disk) or damaged later does not match it, and is never resumed from or
evaluated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pyarrow import fs
from torch import nn

from boatray import models, storage, weightstore
from boatray.errors import BoatrayError

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
KEEP_CHECKPOINTS = 3
"""Checkpoints kept per run while it trains (Tune's and Train's `CheckpointConfig(num_to_keep)`;
a finished sweep keeps each trial's last: tuning.keep_last_checkpoints). Tune forces a
snapshot of its experiment state whenever a trial has written this many checkpoints since the
last one (so that the state never names a deleted checkpoint): with 3, and trials that
checkpoint on the `Cadence` below, that happens only for three checkpoints within one of Tune's
periodic snapshots (every 10 s or more), not after every epoch of every trial."""
Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Scheduler | None, epoch: int, history: list[dict],
                    meta: dict[str, Any], store: str | None = None) -> Path:
    """Write a checkpoint folder: model.pt (the state dict of `model`, unwrapped; what did not
    train goes to the weight store `store`, if given), train_state.pt (optimizer, scheduler,
    epoch) and meta.json (`meta`: classes, model, image size; plus epoch and history, the
    per-epoch metrics).

    `epoch` counts the finished epochs, which is where a resumed run starts.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weightstore.save(model.state_dict(), directory / MODEL_FILE, store,
                     weightstore.untrained(model))
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch}, directory / STATE_FILE)
    record = {**meta, "epoch": epoch, "history": history}
    (directory / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_manifest(directory)
    return directory


def write_manifest(directory: str | Path) -> Path:
    """Record the size and sha256 of every file in a checkpoint folder (whatever it holds) in
    its manifest.json; call it last, once every other file is written."""
    directory = Path(directory)
    files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size,
                                                       "sha256": _sha256(str(path))}
             for path in sorted(directory.rglob("*"))
             if path.is_file() and path.relative_to(directory).as_posix() != MANIFEST_FILE}
    target = directory / MANIFEST_FILE
    target.write_text(json.dumps({"files": files}, indent=2) + "\n")
    return target


def checkpoint_problem(location: str | Path) -> str | None:
    """Why the checkpoint folder at `location` (a local path or a storage URI) cannot be used,
    or None when every file its manifest lists is there with the recorded size and sha256.

    Files in a remote storage are checked by size only (hashing would download them)."""
    return folder_problem(*storage.open_location(location))


def folder_problem(filesystem: fs.FileSystem, base: str) -> str | None:
    """`checkpoint_problem` of a checkpoint folder given as (filesystem, path), as Tune names
    its checkpoints."""
    try:
        with filesystem.open_input_stream(f"{base}/{MANIFEST_FILE}") as stream:
            listed = json.loads(stream.read())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (written last: the checkpoint is incomplete)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST_FILE} cannot be read ({type(exc).__name__})"
    digests = filesystem.type_name == "local"
    for name, expected in listed.items():
        info = filesystem.get_file_info(f"{base}/{name}")
        if info.type != fs.FileType.File:
            return f"{name} is missing"
        if info.size != expected["size"]:
            return f"{name} has {info.size:,} bytes, its manifest says {expected['size']:,}"
        if digests and _sha256(f"{base}/{name}", filesystem) != expected["sha256"]:
            return f"{name} does not match the sha256 in its manifest"
    return None


def _sha256(path: str, filesystem: fs.FileSystem | None = None) -> str:
    digest = hashlib.sha256()
    with (filesystem or fs.LocalFileSystem()).open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def restore_checkpoint(directory: str | Path, model: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       scheduler: Scheduler | None) -> tuple[int, list[dict]]:
    """Load a checkpoint folder into the (unwrapped) model, optimizer and scheduler;
    return (finished epochs, history)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise BoatrayError(f"checkpoint {directory} is a finished trial's ({STATE_FILE} dropped "
                           "after the sweep): it predicts but cannot train on")
    model.load_state_dict(weightstore.load(directory / MODEL_FILE))
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(read_meta(directory)["history"])


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json (classes, model, image_size, epoch, history)."""
    path = Path(directory) / META_FILE
    if not path.is_file() or not (Path(directory) / MODEL_FILE).is_file():
        raise BoatrayError(f"{directory} is not a boatray checkpoint ({META_FILE} and "
                           f"{MODEL_FILE} expected)")
    return json.loads(path.read_text())


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint folder (on the CPU, eval mode) and its meta.json.

    Rebuilt from the checkpoint alone: no experiment config or pretrained weights needed.
    """
    meta = read_meta(directory)
    spec = meta["model"]
    model = models.build(spec["name"], str(Path(directory) / MODEL_FILE),
                         len(meta["classes"]), spec["pooling"])
    return model.eval(), meta


def finalize(checkpoint: str) -> None:
    """Drop the optimizer state (train_state.pt) of a finished trial's checkpoint (a local path
    or URI): it never trains again, and Adam's state is twice the size of what trained. Its
    manifest stops listing the file first, so that a stop in between leaves it intact."""
    manifest = storage.join(checkpoint, MANIFEST_FILE)
    if storage.is_file(manifest):
        listed = json.loads(storage.read_bytes(manifest))
        if listed["files"].pop(STATE_FILE, None) is not None:
            storage.write_bytes(manifest, (json.dumps(listed, indent=2) + "\n").encode())
    storage.delete(storage.join(checkpoint, STATE_FILE))


class Cadence:
    """Which epochs of a run end with a checkpoint: its last, every one where a scheduler may
    stop it (`stops`: ASHA's rungs), and otherwise one at most every `every_s` seconds
    (`train.checkpoint_every_s`: a crash loses at most about that much of its training). An
    epoch that ends without one still reports its metrics."""

    def __init__(self, epochs: int, stops: Iterable[int] = (), every_s: float = 60.0) -> None:
        self.must, self.every_s = {epochs, *stops}, every_s
        self.last = time.monotonic()

    def due(self, done: int) -> bool:
        """Whether the epoch that made `done` finished epochs ends with a checkpoint."""
        now = time.monotonic()
        if done in self.must or now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def checkpoint_name(epoch: int) -> str:
    """The folder name of the checkpoint taken after `epoch` finished epochs."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoints_under(folder: str | Path) -> list[tuple[int, str]]:
    """(finished epochs, location) of every checkpoint anywhere under a run folder (a local
    path or a storage URI), newest first; the epochs of one whose meta.json cannot be read
    are -1 (it is damaged: `checkpoint_problem` says how).

    A run folder holds its checkpoints directly (LocalSession, Ray Train) or one level down in
    a Tune trial folder (TrialSession).
    """
    found = []
    for location, relative in storage.files_under(folder):
        parts = relative.parts
        if relative.name not in (META_FILE, MANIFEST_FILE) or len(parts) > 3 or any(
                p.startswith(".") for p in parts):
            continue  # not a checkpoint's, or one being written
        checkpoint = storage.parent(location)
        if any(c == checkpoint for _, c in found):
            continue
        try:
            epoch = int(json.loads(storage.read_bytes(storage.join(checkpoint, META_FILE)))[
                "epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            epoch = -1
        found.append((epoch, checkpoint))
    return sorted(found, reverse=True)


def latest_checkpoint(folder: str | Path) -> str | None:
    """The intact checkpoint with the most finished epochs anywhere under a run folder (a local
    path or a storage URI), as the same kind of location; None where there is none. A damaged
    one is passed over, with a line saying so."""
    for _, location in checkpoints_under(folder):
        problem = checkpoint_problem(location)
        if problem is None:
            return location
        print(f"[checkpoint] {location} is damaged ({problem}): not used", flush=True)
    return None


def intact_or_beside(location: str) -> tuple[str | None, str | None]:
    """(the checkpoint to use, why `location` is not it): `location` when it is intact, else
    the newest intact checkpoint in the same folder (an earlier epoch of the same run), else
    None."""
    problem = checkpoint_problem(location)
    if problem is None:
        return location, None
    folder = storage.parent(location)
    for _, other in checkpoints_under(folder):
        if other != location and checkpoint_problem(other) is None:
            return other, problem
    return None, problem


def resume_point(location: str | None) -> str | None:
    """Where a run resumes when it was told to resume from the checkpoint at `location`: that
    checkpoint when it is intact, else the newest intact one beside it, else None (it starts
    again from epoch 1); a line says which when `location` is damaged."""
    if location is None:
        return None
    usable, problem = intact_or_beside(location)
    if problem is not None:
        instead = f"resuming from {usable}" if usable else "training again from epoch 1"
        print(f"[checkpoint] {location} is damaged ({problem}): {instead}", flush=True)
    return usable
