"""Who a training run reports to: the one training loop (loop.train_loop) talks only to these.

- `LocalSession`: the calling process or a Ray task (`train.num_workers` 0, and 1 outside a
  sweep); checkpoints go straight into the run folder, local or on a storage.
- `TrialSession`: a sweep trial's own process (`num_workers: 1`): `ray.tune.report` and
  `ray.tune.get_checkpoint`; Tune's FailureConfig retries the trial from its last checkpoint
  and `reuse_actors` keeps the process (torch imported) for the next trial.
- `WorkerSession`: one rank of a Ray Train worker group (`num_workers >= 2`): DDP through
  `prepare_model`/`prepare_data_loader`, `ray.train.report` with rank 0's checkpoint.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from boatray import storage
from boatray.finetune.checkpoints import (
    CHECKPOINT_PREFIX,
    MANIFEST_FILE,
    checkpoint_name,
    latest_checkpoint,
    resume_point,
)

WriteCheckpoint = Callable[[Path], object]
"""Writes the run's checkpoint (model, optimizer, scheduler, meta) into the folder given."""


class Session(abc.ABC):
    """One rank's view of a run: its device, how loaders and the model are prepared, where the
    checkpoint to resume from is, where metrics and checkpoints go. Rank 0 of 1 by default."""

    rank, world = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def wrap(self, module: nn.Module) -> nn.Module:
        """The model to train (a DDP wrapper over the current trainable set with 2+ ranks)."""
        return module

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        """The checkpoint folder to resume from, or None, for the `with` block."""
        yield None

    @abc.abstractmethod
    def report(self, metrics: dict, write: WriteCheckpoint | None) -> None:
        """Hand one epoch's metrics onward, with a checkpoint (`write` fills its folder) unless
        `write` is None."""

    def placement(self, module: nn.Module) -> dict:
        """Where an epoch trained, for its metrics: nothing outside Ray."""
        return {}


def node_id() -> str:
    """The Ray node this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def weights_digest(module: nn.Module) -> str:
    """A digest of every parameter's values, in the module's order."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _open(location: str | None) -> contextlib.AbstractContextManager:
    """A stored checkpoint (path or URI) as a local folder for a `with` block."""
    if location is None:
        return contextlib.nullcontext(None)
    from ray.train import Checkpoint

    return Checkpoint(location).as_directory()


def _resume(checkpoint, storage_path: str, earlier: str | None = None
            ) -> contextlib.AbstractContextManager:
    """Ray's checkpoint to resume from (else `earlier`, a location) as a local folder for a
    `with` block, or the newest intact one beside it where it is damaged
    (checkpoints.resume_point), or None. `storage_path`: the experiment's, whose kind (and a
    URI's query, e.g. its endpoint) the checkpoint's location takes."""
    location = earlier if checkpoint is None else storage.same_kind(storage_path,
                                                                    checkpoint.path)
    return _open(resume_point(location))


class LocalSession(Session):
    """In the calling process (or a Ray task): the latest checkpoint is kept in the run folder,
    a local path or a storage URI, and an earlier one there is resumed from."""

    def __init__(self, device: torch.device, run_location: str | Path) -> None:
        super().__init__(device)
        self.location = str(run_location)
        self.metrics: dict = {}
        self.checkpoint: str | None = None

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        self.checkpoint = latest_checkpoint(self.location)
        with _open(self.checkpoint) as directory:
            yield None if directory is None else Path(directory)

    def report(self, metrics: dict, write: WriteCheckpoint | None) -> None:
        self.metrics = metrics
        if write is None:
            return
        name = checkpoint_name(metrics["epoch"])
        if storage.is_remote(self.location):
            self.checkpoint = self._upload(name, write)
        else:
            self.checkpoint = str(self._write_here(Path(self.location), name, write))

    @staticmethod
    def _write_here(run_dir: Path, name: str, write: WriteCheckpoint) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / name
        partial = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
        write(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for older in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if older != target:
                shutil.rmtree(older)
        return target

    def _upload(self, name: str, write: WriteCheckpoint) -> str:
        """The checkpoint written locally, copied to the storage with manifest.json (which marks
        it complete: `latest_checkpoint`) last, then the earlier ones removed."""
        target = storage.join(self.location, name)
        with tempfile.TemporaryDirectory() as directory:
            write(Path(directory))
            files = sorted(Path(directory).iterdir(), key=lambda path: path.name == MANIFEST_FILE)
            storage.copy((path, storage.join(target, path.name)) for path in files)
        older = {relative.parts[0] for _, relative in storage.files_under(self.location)
                 if relative.parts[0].startswith(CHECKPOINT_PREFIX)} - {name}
        for folder in older:
            storage.delete(storage.join(self.location, folder))
        return target


class TrialSession(Session):
    """Inside a Ray Tune trial's process: Tune stores the checkpoints and restarts from them.

    `resume_from`: a checkpoint of an earlier run of the same name (a single run resumed),
    used when Tune has none for this trial. `storage_path`: the experiment's.
    """

    def __init__(self, device: torch.device, storage_path: str,
                 earlier: str | None = None) -> None:
        super().__init__(device)
        self.storage_path, self.earlier = storage_path, earlier

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        from ray import tune

        with _resume(tune.get_checkpoint(), self.storage_path, self.earlier) as directory:
            yield None if directory is None else Path(directory)

    def report(self, metrics: dict, write: WriteCheckpoint | None) -> None:
        from ray import tune

        if write is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            write(Path(directory))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    def placement(self, module: nn.Module) -> dict:
        """`node`: the Ray node the trial's process trained on."""
        return {"node": node_id()}


class WorkerSession(Session):
    """One rank of a Ray Train worker group (DDP); rank 0 saves the checkpoint.
    `storage_path`: the experiment's."""

    def __init__(self, storage_path: str) -> None:
        import ray.train
        import ray.train.torch

        super().__init__(ray.train.torch.get_device())
        self.storage_path = storage_path
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def wrap(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False)

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        import ray.train

        with _resume(ray.train.get_checkpoint(), self.storage_path) as directory:
            yield None if directory is None else Path(directory)

    def report(self, metrics: dict, write: WriteCheckpoint | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0 and write is not None:
                write(Path(directory))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=checkpoint_name(metrics["epoch"]))

    def placement(self, module: nn.Module) -> dict:
        """`node`: every rank's Ray node, in rank order, comma-separated; `ranks_equal`:
        whether every rank holds the same weights (DDP keeps them so)."""
        import torch.distributed as dist

        ranks: list = [None] * self.world
        dist.all_gather_object(ranks, (node_id(), weights_digest(module)))
        return {"node": ",".join(node for node, _ in ranks),
                "ranks_equal": len({digest for _, digest in ranks}) == 1}
