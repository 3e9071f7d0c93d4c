"""Where one training run trains, from the driver: in this process or a Ray task (one worker:
no worker group to start, no Tune experiment), or on a Ray Train worker group (DDP).

`fit` is a single run's entry; `make_trainer` builds the TorchTrainer that a sweep trial with
2+ workers drives; a user-facing error inside Ray comes back as its `BoatrayError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boatray import models
from boatray.cluster import only_this_node
from boatray.config import Experiment, TrainConfig
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.finetune import prefix_cache, sessions
from boatray.finetune.checkpoints import KEEP_CHECKPOINTS
from boatray.finetune.engine import device_for, freeze_spec_at
from boatray.finetune.loop import loop_config, train_loop, train_loop_per_worker
from boatray.storage import join

CONTROLLER_FAILURE_LIMIT = 10
"""Tries to start a worker group (60 s each) before a run fails instead of waiting forever."""


def check_inputs(exp: Experiment, manifest: str | Path) -> None:
    """Fail fast on the driver, before any worker starts: the manifest has train and valid
    images, a weights file loads into the model, and the model takes the freeze spec."""
    frame, _ = read_manifest(manifest)
    for split in ("train", "valid"):
        if not (frame.split == split).any():
            raise BoatrayError(f"manifest {manifest} has no {split} images (a valid split is "
                               "needed: set data.valid_fraction > 0 or add a valid/ folder)")
    backbone = models.backbone(exp.model.name)
    # a weights file (its path made absolute by the config) is read and checked against the
    # network's shapes here (no network built), so a bad one is one line now rather than a
    # failure in every worker
    backbone.check_weights(exp.model.weights)
    backbone.trains(freeze_spec_at(exp.train, 0))


def make_trainer(exp: Experiment, manifest: Path, name: str, storage_path: str,
                 callbacks: Sequence = (), cache: str | None = None, stops: Sequence[int] = ()):
    """The TorchTrainer of one run with 2+ workers, from exp.train: workers, GPUs, CPUs per
    worker, failures.

    Reusing `name` under `storage_path` resumes that run from its last checkpoint.
    `cache`: the location of the run's frozen-prefix cache (prefix_cache.prepare), or None to
    train on images; `stops`: the epochs where a scheduler may stop it (loop.loop_config).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = exp.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(exp, manifest, cache, stops),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))


def worker_resources(cfg: TrainConfig, gpu_share: float = 1.0) -> dict[str, float]:
    """What one training worker asks for: its CPUs and GPU (Ray's resource names; Tune takes
    them for a trial that trains in its own process; `gpu_share` of a GPU: trials on cached
    features share one)."""
    return {"CPU": cfg.cpus_per_worker, "GPU": gpu_share if cfg.use_gpu else 0.0}


@dataclass
class FitResult:
    """A finished run: its last reported metrics and its final checkpoint."""

    metrics: dict
    checkpoint: Any  # ray.train.Checkpoint


def fit(exp: Experiment, manifest: str | Path, run_dir: str | Path) -> FitResult:
    """Train one run into `run_dir` (its checkpoints land there) and return its FitResult.

    Where it trains: with `train.num_workers` 0 in this process; with 1 like one sweep trial
    but with no Tune experiment of its own: in this process where Ray has no node but this one
    and no GPU is asked for (a Ray worker would start only to do the same work on the same
    cores), else in a Ray task with one worker's resources that Ray retries
    (`train.max_failures`) from the last checkpoint; with 2 or more in a Ray Train worker group
    (DDP).
    The run's frozen-prefix cache is computed first when it can use one and has none yet.
    With a remote storage_path, `run_dir` is in the driver's staging folder
    (exp.results_dir) and the checkpoints go to the same place under exp.storage_uri. A run
    folder that already holds a run is resumed from its last checkpoint (with more epochs, if
    the config now asks for more). A user-facing error in the run (e.g. a corrupt image) comes
    back as that BoatrayError.
    """
    from ray.train import Checkpoint, WorkerGroupError

    check_inputs(exp, manifest)
    config = loop_config(exp, manifest, prefix_cache.prepare(exp, manifest))
    run_dir = Path(run_dir).resolve()
    if exp.train.num_workers == 0 or (exp.train.num_workers == 1 and not exp.train.use_gpu
                                      and only_this_node()):
        metrics, location = _fit_here(config, exp.train.use_gpu, str(run_dir))
        return FitResult(metrics, location and Checkpoint(location))
    storage = str(run_dir.parent)
    if exp.remote_storage:
        relative = run_dir.parent.relative_to(exp.results_dir.resolve()).as_posix()
        storage = join(exp.storage_uri, relative)
    if exp.train.num_workers == 1:
        import ray

        resources = worker_resources(exp.train)
        task = ray.remote(_fit_here).options(max_retries=exp.train.max_failures,
                                             num_cpus=resources["CPU"], num_gpus=resources["GPU"])
        try:
            metrics, location = ray.get(task.remote(config, exp.train.use_gpu,
                                                    join(storage, run_dir.name)))
        except ray.exceptions.RayTaskError as exc:
            _raise_boatray_cause(exc)
            raise
        return FitResult(metrics, location and Checkpoint(location))
    trainer = make_trainer(exp, Path(manifest), run_dir.name, storage, cache=config["prefix_cache"])
    try:
        result = trainer.fit()
    except WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            _raise_boatray_cause(failure)
        raise
    return FitResult(result.metrics, result.checkpoint)


def _fit_here(config: dict, use_gpu: bool, run_location: str) -> tuple[dict, str | None]:
    """The loop in this process, checkpoints in the run's folder (a path or a storage URI);
    (the last metrics, the last checkpoint's location) or (.., None) when it saved none."""
    session = sessions.LocalSession(device_for(use_gpu), run_location)
    train_loop(config, session)
    return session.metrics, session.checkpoint


def _raise_boatray_cause(error: BaseException | None) -> None:
    """Raise the BoatrayError behind a Ray error, if there is one."""
    cause = _boatray_cause(error)
    if cause is not None:
        raise BoatrayError(str(cause)) from None


def _boatray_cause(error: BaseException | None) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BoatrayError):
            return error
        seen.add(id(error))
        error = error.__cause__ or getattr(error, "cause", None)
    return None
