"""The checkpoint format of a training run, and finding a run's latest checkpoint.

A checkpoint folder holds model.pt (the unwrapped model's state dict: what trained, and in
model.refs.json the frozen tensors kept once in the results folder's weight store,
weightstore.py), train_state.pt (optimizer, scheduler, finished epochs) and meta.json (classes,
model, image size, freeze spec, seed, epoch and the per-epoch history): enough to resume, to
predict, and to rebuild the model without the experiment config. The checkpoint of a finished
sweep trial keeps no train_state.pt (`finalize`): it never trains again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from boatray import models, storage, weightstore
from boatray.errors import BoatrayError

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
KEEP_CHECKPOINTS = 1
"""Checkpoints kept per run: the latest, which is enough to resume and to predict."""

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
    return directory


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
    or URI): it never trains again, and Adam's state is twice the size of what trained."""
    storage.delete(storage.join(checkpoint, STATE_FILE))


def checkpoint_name(epoch: int) -> str:
    """The folder name of the checkpoint taken after `epoch` finished epochs."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def latest_checkpoint(folder: str | Path) -> str | None:
    """The checkpoint with the most finished epochs anywhere under a run folder (a local path
    or a storage URI), as the same kind of location; None where there is none.

    A run folder holds its checkpoints directly (LocalSession, Ray Train) or one level down in
    a Tune trial folder (TrialSession).
    """
    best: tuple[int, str] | None = None
    for location, relative in storage.files_under(folder):
        parts = relative.parts
        if relative.name != META_FILE or len(parts) > 3 or any(p.startswith(".") for p in parts):
            continue  # not a checkpoint's, or one being written
        epoch = int(json.loads(storage.read_bytes(location)).get("epoch", 0))
        if best is None or (epoch, location) > best:
            best = (epoch, storage.parent(location))
    return None if best is None else best[1]
