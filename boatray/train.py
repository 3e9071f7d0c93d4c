"""The training loop: fine-tuning (and the BetterCNN baseline), on one process or DDP ranks.

Three layers (torchvision references/classification + Ray's Train V2 examples):

- plain PyTorch, testable without Ray: `train_one_epoch`, `evaluate`, `outputs`, the samplers,
  optimizers, schedulers and the checkpoint format;
- `train_loop(config, session)`, the loop's `main`: it wires data, model, optimizer and
  scheduler and does not know who it reports to; the session (sessions.py) is this process
  (`train.num_workers` 0), a Ray Tune trial's own process (1: no worker group to start) or
  one rank of a Ray Train worker group (2+: DDP);
- `make_trainer` (2+ workers) and `fit` (one run, on the driver: in process, a one-trial
  Tune experiment, or a TorchTrainer).

Data: a `DataLoader` over `images.ImageDataset` made ready by `prepare_data_loader`, not Ray Data
shards. The manifest is a few thousand paths, which every worker reads in milliseconds; each
rank draws its share of one seeded epoch-wide order (`ShardSampler`), so the class-balanced
sampler works with any number of workers; loader processes decode JPEGs to uint8 (4x less to
copy than float32) and `images.normalize` runs on the device. Ray Data would add a streaming
executor competing for this 2-core machine's CPUs and could not give every rank the same
weighted draw without a global shuffle.

The frozen-prefix cache (prefix_cache.py): when the driver hands the worker a cache, the
datasets are the frozen prefix's cached float16 activations instead of images, fed through
the same sampler and loader path (so cached and uncached runs see the same batches in the same
order), and the (DDP-wrapped) trained and evaluated network is `models.suffix` of the model;
the frozen prefix is not run, and checkpoints hold the whole model.

Gradual unfreezing under DDP (Lightning #20340: a DDP wrapper registers its gradient hooks for
the parameters that require gradients when it is built, so changing `requires_grad` inside it
breaks): the optimizer is built once over every stage's parameters, and at each phase change
the loop unwraps the model, refreezes it and wraps it in a new DDP. Frozen parameters get no
gradient, so the optimizer skips them (no update, no weight decay, no momentum), and a stage
that becomes trainable keeps its place in the optimizer, its learning rate under the scheduler
and, for those that stay trainable, their optimizer state; the optimizer and scheduler state
dicts have the same layout in every phase, so a checkpoint restores into any phase.

Evaluation runs on the unwrapped model (a DDP forward is a collective; ranks hold different
numbers of validation batches), each rank on its share, and the logits are gathered so that
every rank computes the same loss, accuracy and macro F1 over the whole validation split.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from boatray import models, prefix_cache, sessions
from boatray.config import Experiment, TrainConfig, from_dict
from boatray.data import images
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.sessions import CHECKPOINT_PREFIX, META_FILE  # noqa: F401 (checkpoint layout)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
KEEP_CHECKPOINTS = 1
"""Checkpoints kept per run: the latest, which is enough to resume and to predict."""
CONTROLLER_FAILURE_LIMIT = 10
"""Tries to start a worker group (60 s each) before a run fails instead of waiting forever."""

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


# ---------------------------------------------------------------- data

class ShardSampler(Sampler[int]):
    """This rank's share of one seeded, epoch-wide order of a dataset.

    Every rank computes the same order for (seed, epoch) and takes every `world`-th index from
    its `rank`: a shuffle (`shuffle=True`), a weighted draw with replacement of as many items as
    the dataset has (`weights`, e.g. class-balanced), or the dataset's own order. With `pad`,
    the order is extended to a multiple of `world` so that every rank gets as many items (DDP
    needs equal numbers of batches); without it, the ranks' shares cover each item once.
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, *, seed: int = 0,
                 shuffle: bool = True, weights: Sequence[float] | None = None,
                 pad: bool = True) -> None:
        self.size, self.rank, self.world = size, rank, world
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of `epoch` (call before iterating)."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True,
                                     generator=generator)
        if self.shuffle:
            return torch.randperm(self.size, generator=generator)
        return torch.arange(self.size)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad and len(order) % self.world:
            extra = self.world - len(order) % self.world
            order = torch.cat([order, order[:extra]])
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world)
        return len(range(self.rank, self.size, self.world))


def class_weights(labels: Iterable[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, n / (k * n_c) over the k classes present (scikit-learn's
    "balanced"); 0 for a class without images."""
    counts = np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_classes)
    present = max(int((counts > 0).sum()), 1)
    weights = np.where(counts > 0, counts.sum() / (present * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def split_dataset(frame, split: str, size: tuple[int, int], augment: bool = False
                  ) -> images.ImageDataset:
    """The ImageDataset of one split of a manifest frame."""
    rows = frame[frame.split == split]
    return images.ImageDataset(rows.path.tolist(), rows.label_idx.tolist(), size, augment)


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, **args) -> DataLoader:
    """A DataLoader of `sampler`'s order in batches; a frozen-prefix cache is read a batch at a
    time (`prefix_cache.CachedActivations`), with the same batches."""
    if isinstance(dataset, prefix_cache.CachedActivations):
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                          batch_size=None, **args)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, **args)


def run_datasets(exp: Experiment, frame, cache: str | None
                 ) -> tuple[Dataset, Dataset, str | None]:
    """(train set, valid set, cut point) of a run: images and None, or with a frozen-prefix
    cache the cached activations and the cut point they were taken at."""
    if cache is None:
        return (split_dataset(frame, "train", exp.data.image_size, exp.data.augment),
                split_dataset(frame, "valid", exp.data.image_size), None)
    folder, info = prefix_cache.open_cache(cache)
    train_set, valid_set = (
        prefix_cache.CachedActivations(folder, split, frame.label_idx[frame.split == split])
        for split in ("train", "valid"))
    return train_set, valid_set, info["stage"]


# ---------------------------------------------------------------- epochs

def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch as model input: uint8 images normalised on the device; floats (e.g. cached
    float16 activations) as float32, feature maps channels_last when asked."""
    batch = batch.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        return images.normalize(batch, channels_last)
    batch = batch.float()
    if channels_last and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, *,
                    amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """One pass over `loader`; loss, accuracy and images/s over every rank's batches.

    Frozen BatchNorm layers stay in eval mode (`models.train_mode`).
    """
    models.train_mode(model)
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for batch, labels in loader:
        inputs = to_input(batch, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(inputs)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    seconds = _max_over_ranks(time.perf_counter() - start, device)
    loss_sum, correct, count = _sum_over_ranks([loss_sum, correct, count], device)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1),
            "images": int(count), "seconds": seconds,
            "images_per_second": count / seconds if seconds > 0 else 0.0}


@torch.inference_mode()
def outputs(model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool = False,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and labels (on the CPU) of every batch of `loader`, in order."""
    model.eval()
    logits, labels = [], []
    for batch, target in loader:
        with _autocast(device, amp):
            logits.append(model(to_input(batch, device, channels_last)).float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order (the tensor itself without DDP)."""
    if _world() == 1:
        return tensor
    parts: list[Any] = [None] * _world()
    dist.all_gather_object(parts, tensor)
    return torch.cat([p for p in parts if p.numel()])


def evaluate(model: nn.Module, loader: Iterable, criterion: nn.Module, device: torch.device, *,
             amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Loss (the training criterion), accuracy and macro F1 over every rank's share of `loader`.

    Pass the unwrapped model: ranks may hold different numbers of batches.
    """
    logits, labels = outputs(model, loader, device, amp=amp, channels_last=channels_last)
    logits, labels = _gather(logits), _gather(labels)
    if not len(labels):
        return {"loss": math.nan, "accuracy": math.nan, "macro_f1": math.nan}
    loss = criterion(logits.to(device), labels.to(device)).item()
    predicted = logits.argmax(1)
    return {"loss": loss, "accuracy": float((predicted == labels).float().mean()),
            "macro_f1": float(f1_score(labels.numpy(), predicted.numpy(), average="macro",
                                       zero_division=0))}


# ---------------------------------------------------------------- optimisation

def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over parameter groups, as the config says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Scheduler | None:
    """The epoch-wise learning-rate schedule: none, plateau, cosine or step.

    `plateau` is ReduceLROnPlateau on the validation loss. Seed 003 stepped it on the training
    loss; the validation loss is what says the model stopped generalising better, and it is the
    signal ASHA stops trials on, so both look at the same curve.
    """
    lr = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        return lr.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                    patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        return lr.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return lr.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def step_scheduler(scheduler: Scheduler | None, valid_loss: float) -> None:
    """Advance the schedule by one epoch."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(valid_loss)
    elif scheduler is not None:
        scheduler.step()


def freeze_spec_at(cfg: TrainConfig, epoch: int) -> str:
    """The freeze spec in force at 0-based `epoch` (gradual unfreezing follows its schedule)."""
    if cfg.freeze == "gradual":
        return models.gradual_schedule(epoch, cfg.gradual_every)
    return cfg.freeze


def optimizer_over_all_stages(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """An optimizer holding every stage (discriminative lrs); freezing then decides what moves."""
    models.freeze(model, "all")
    return make_optimizer(models.param_groups(model, cfg.lr, cfg.lr_decay), cfg)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same on every rank: identical initial models)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Scheduler | None, epoch: int, history: list[dict],
                    meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder: model.pt (the state dict of `model`, unwrapped),
    train_state.pt (optimizer, scheduler, epoch) and meta.json (`meta`: classes, model, image
    size; plus epoch and history, the per-epoch metrics).

    `epoch` counts the finished epochs, which is where a resumed run starts.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
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
    model.load_state_dict(
        torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
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


# ---------------------------------------------------------------- the loop

def loop_config(exp: Experiment, manifest: str | Path, cache: str | None) -> dict:
    """What the training loop is handed: the experiment (as a dict), the manifest's absolute
    path and the location of the run's frozen-prefix cache (None: train on images)."""
    return {"experiment": exp.to_dict(), "manifest": str(Path(manifest).resolve()),
            "prefix_cache": cache}


def train_loop(config: dict, session: sessions.Session) -> None:
    """One fine-tuning run, on every rank: `config` is `loop_config`'s; `session` says where
    the run is (this process, a Tune trial, a Train worker) and takes its reports: after every
    epoch, metrics and a checkpoint (every rank reports; rank 0's checkpoint is kept).
    """
    exp = from_dict(config["experiment"])
    cfg = exp.train
    rank, world, device = session.rank, session.world, session.device
    seed_everything(cfg.seed)
    frame, classes = read_manifest(config["manifest"])
    # Built right after seeding: every rank, and prefix_cache.prefix_model, draw the same init.
    module = models.build(exp.model.name, exp.model.weights, len(classes), exp.model.pooling)
    on_gpu = device.type == "cuda"
    amp, channels_last = cfg.amp and on_gpu, cfg.channels_last and on_gpu

    train_set, valid_set, cut = run_datasets(exp, frame, config.get("prefix_cache"))
    weights = class_weights(train_set.labels, len(classes))
    train_sampler = ShardSampler(
        len(train_set), rank, world, seed=cfg.seed,
        weights=weights[train_set.labels].tolist() if cfg.balanced_sampler else None)
    valid_sampler = ShardSampler(len(valid_set), rank, world, shuffle=False, pad=False)
    # a cache is read a memory-mapped batch at a time: on a CPU, loader processes would only
    # add their start-up (seconds each) and take cores from the training step
    workers = 0 if cut is not None and not on_gpu else cfg.loader_workers
    loader_args = {"num_workers": workers, "persistent_workers": workers > 0,
                   "pin_memory": on_gpu}
    train_loader, valid_loader = (session.prepare_loader(
        make_loader(dataset, sampler, cfg.batch_size, **loader_args))
        for dataset, sampler in ((train_set, train_sampler), (valid_set, valid_sampler)))

    module = module.to(device, memory_format=torch.channels_last if channels_last
                       else torch.preserve_format)
    network = module if cut is None else models.suffix(module, cut)  # what runs on the data
    optimizer = optimizer_over_all_stages(module, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if cfg.class_weighted_loss
                                    else None)
    start, history = 0, []
    with session.resume_from() as directory:
        if directory is not None:
            start, history = restore_checkpoint(directory, module, optimizer, scheduler)
    meta = {"classes": classes, "image_size": list(exp.data.image_size),
            "model": {"name": exp.model.name, "pooling": exp.model.pooling,
                      "weights": exp.model.weights},
            "freeze": cfg.freeze, "seed": cfg.seed, "prefix_cache": config.get("prefix_cache")}

    phase, model = None, module
    for epoch in range(start, cfg.epochs):
        spec = freeze_spec_at(cfg, epoch)
        if spec != phase:  # first epoch or a gradual phase change: refreeze, new DDP wrapper
            phase = spec
            models.freeze(module, phase)
            model = session.wrap(network)
            model = torch.compile(model) if cfg.compile else model
        train_sampler.set_epoch(epoch)
        lr = max(group["lr"] for group in optimizer.param_groups)
        began = time.perf_counter()
        trained = train_one_epoch(model, train_loader, criterion, optimizer, device, amp=amp,
                                  channels_last=channels_last)
        _broadcast_buffers(module)
        valid = evaluate(network, valid_loader, criterion, device, amp=amp,
                         channels_last=channels_last)
        step_scheduler(scheduler, valid["loss"])
        metrics = {"epoch": epoch + 1, "train_loss": trained["loss"],
                   "train_accuracy": trained["accuracy"], "valid_loss": valid["loss"],
                   "valid_accuracy": valid["accuracy"], "valid_macro_f1": valid["macro_f1"],
                   "lr": lr, "images_per_second": trained["images_per_second"],
                   "epoch_seconds": _max_over_ranks(time.perf_counter() - began, device),
                   "trainable_parameters": sum(p.numel() for p in module.parameters()
                                               if p.requires_grad)}
        history.append(metrics)
        session.report(metrics, lambda directory, done=epoch + 1: save_checkpoint(
            directory, module, optimizer, scheduler, done, history, meta))
    if history and start >= cfg.epochs:
        # restored after its last epoch (e.g. the driver was killed right then): report the
        # final metrics again, so that a Tune trial gets its metric
        session.report(history[-1], lambda directory: save_checkpoint(
            directory, module, optimizer, scheduler, start, history, meta))


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (runs with 2+ workers): the loop on one DDP rank."""
    train_loop(config, sessions.WorkerSession())


def device_for(use_gpu: bool) -> torch.device:
    """The device of a run outside Ray Train: the GPU Ray gave the process, else the CPU."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def train_in_trial(config: dict, earlier: str | None = None) -> None:
    """The loop inside a Ray Tune trial's own process (1 worker): `config` is `loop_config`'s;
    `earlier`: the checkpoint of an earlier run of the same name to resume from when Tune
    holds none for this trial."""
    use_gpu = from_dict(config["experiment"]).train.use_gpu
    train_loop(config, sessions.TrialSession(device_for(use_gpu), earlier))


def _single_run_trial(_: dict, loop: dict, earlier: str | None) -> None:
    """The Tune function of a single run (`fit` with 1 worker); Tune's own config is empty."""
    train_in_trial(loop, earlier)


def _broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, so after an epoch each rank holds rank 0's
    statistics updated by its own last batch; this makes every rank evaluate the model that
    rank 0's checkpoint saves.
    """
    if _world() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- the driver side

def check_inputs(exp: Experiment, manifest: str | Path) -> None:
    """Fail fast on the driver, before any worker starts: the manifest has train and valid
    images, a weights file loads into the model, and the model takes the freeze spec."""
    frame, classes = read_manifest(manifest)
    for split in ("train", "valid"):
        if not (frame.split == split).any():
            raise BoatrayError(f"manifest {manifest} has no {split} images (a valid split is "
                               "needed: set data.valid_fraction > 0 or add a valid/ folder)")
    weights = str(exp.model.weights)
    # a weights file (its path made absolute by the config) is read here, so a bad one is one
    # line now rather than a failure in every worker; torchvision weights are left to them
    probe = models.build(exp.model.name, weights if Path(weights).is_absolute() else "none",
                         len(classes), exp.model.pooling)
    models.freeze(probe, freeze_spec_at(exp.train, 0))


def make_trainer(exp: Experiment, manifest: Path, name: str, storage_path: str,
                 callbacks: Sequence = (), cache: str | None = None):
    """The TorchTrainer of one run with 2+ workers, from exp.train: workers, GPUs, CPUs per
    worker, failures.

    Reusing `name` under `storage_path` resumes that run from its last checkpoint.
    `cache`: the location of the run's frozen-prefix cache (prefix_cache.prepare), or None to
    train on images.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = exp.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(exp, manifest, cache),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What a trial that trains in its own process asks Tune for: one worker's CPUs and GPU."""
    return {"cpu": cfg.cpus_per_worker, "gpu": 1.0 if cfg.use_gpu else 0.0}


@dataclass
class FitResult:
    """A finished run: its last reported metrics and its final checkpoint."""

    metrics: dict
    checkpoint: Any  # ray.train.Checkpoint


def fit(exp: Experiment, manifest: str | Path, run_dir: str | Path) -> FitResult:
    """Train one run into `run_dir` (its checkpoints land there) and return its FitResult.

    Where it trains: with `train.num_workers` 0 in this process (no Ray), with 1 in a Ray Tune
    trial's own process, with 2 or more in a Ray Train worker group (DDP).
    The run's frozen-prefix cache is computed first when it can use one and has none yet.
    With a remote storage_path, `run_dir` is in the driver's staging folder
    (exp.results_dir) and the checkpoints go to the same place under exp.storage_uri. A run
    folder that already holds a run is resumed from its last checkpoint. A user-facing error
    in the run (e.g. a corrupt image) comes back as that BoatrayError.
    """
    from ray.train import Checkpoint, WorkerGroupError

    check_inputs(exp, manifest)
    config = loop_config(exp, manifest, prefix_cache.prepare(exp, manifest))
    run_dir = Path(run_dir).resolve()
    if exp.train.num_workers == 0:
        session = sessions.LocalSession(device_for(exp.train.use_gpu), run_dir)
        train_loop(config, session)
        checkpoint = session.checkpoint and Checkpoint(str(session.checkpoint))
        return FitResult(session.metrics, checkpoint)
    storage = str(run_dir.parent)
    if exp.remote_storage:
        relative = run_dir.parent.relative_to(exp.results_dir.resolve()).as_posix()
        storage = f"{exp.storage_uri}/{relative}"
    if exp.train.num_workers == 1:
        return _fit_in_trial(exp, config, f"{storage}/{run_dir.name}")
    trainer = make_trainer(exp, Path(manifest), run_dir.name, storage, cache=config["prefix_cache"])
    try:
        result = trainer.fit()
    except WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            _raise_boatray_cause(failure)
        raise
    return FitResult(result.metrics, result.checkpoint)


def _fit_in_trial(exp: Experiment, config: dict, run_path: str) -> FitResult:
    """One run as a one-trial Tune experiment at `run_path`; an earlier run there is resumed
    from its latest checkpoint (with more epochs, if the config now asks for more)."""
    from ray import tune
    from ray.train import Checkpoint

    earlier = sessions.latest_checkpoint(run_path)
    storage, name = run_path.rsplit("/", 1)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_single_run_trial, loop=config,
                                                 earlier=earlier),
                            trial_resources(exp.train)),
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    result = tuner.fit()[0]
    if result.error is not None:
        _raise_boatray_cause(result.error)
        raise result.error
    checkpoint = result.checkpoint or (earlier and Checkpoint(earlier))
    return FitResult(result.metrics or {}, checkpoint)


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
