"""The training engine in plain PyTorch, testable without Ray (torchvision's
references/classification): samplers, datasets and loaders, one epoch, evaluation, optimisers
and learning-rate schedules.

Data is a `DataLoader` over `images.ImageDataset` (or a frozen-prefix cache), not Ray Data
shards: the manifest is a few thousand paths that every rank reads in milliseconds, and each
rank draws its share of one seeded epoch-wide order (`ShardSampler`), so a class-balanced draw
works with any number of ranks.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from boatray import freezing, precision, sizing
from boatray.config import Experiment, TrainConfig
from boatray.data import decoded, images
from boatray.data.decoded import MappedSplit
from boatray.errors import BoatrayError
from boatray.finetune import prefix_cache
from boatray.finetune.checkpoints import Scheduler

DECODED_ROOT = Path(tempfile.gettempdir()) / "boatray-decoded"
"""Where each node keeps its decoded-image caches (node-local: the cache's lock needs it)."""

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
    """scikit-learn's "balanced" weights, n / (k * n_c) over the k classes present; 0 for a
    class without images."""
    labels = np.asarray(list(labels), dtype=np.int64)
    weights = np.zeros(num_classes)
    present = np.unique(labels)
    if len(present):
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def split_dataset(frame, split: str, size: tuple[int, int], augment: bool = False
                  ) -> images.ImageDataset:
    """The ImageDataset of one split of a manifest frame."""
    rows = frame[frame.split == split]
    return images.ImageDataset(rows.path.tolist(), rows.label_idx.tolist(), size, augment)


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, **args) -> DataLoader:
    """A DataLoader of `sampler`'s order in batches; a memory-mapped cache (frozen-prefix
    activations, decoded images) is read a batch at a time, with the same batches."""
    if isinstance(dataset, MappedSplit):
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                          batch_size=None, **args)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, **args)


class PinnedPrefetch:
    """A loader's batches read one ahead on a background thread into pinned (page-locked)
    memory: reading the next batch overlaps the step on this one, and the copy to the GPU
    (`non_blocking`) does not stall the host. For loaders without worker processes (the
    memory-mapped caches) feeding a GPU; tensors already on a device pass as they are."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)

        def next_pinned() -> list | None:
            batch = next(batches, None)
            return None if batch is None else [
                t.pin_memory() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
                for t in batch]

        with ThreadPoolExecutor(1, thread_name_prefix="boatray-prefetch") as pool:
            pending = pool.submit(next_pinned)
            while (batch := pending.result()) is not None:
                pending = pool.submit(next_pinned)
                yield batch


def run_datasets(exp: Experiment, frame, cache: str | None
                 ) -> tuple[Dataset, Dataset, str | None]:
    """(train set, valid set, cut point) of a run: images and None, or with a frozen-prefix
    cache the cached activations and the cut point they were taken at.

    Images come from the node's decoded-image cache (`train.cache_decoded`, no augmentation):
    each image decoded once per node, not in every epoch of every trial."""
    if cache is None:
        folder = None
        if exp.train.cache_decoded and not exp.data.augment:
            folder = decoded.ensure_decoded(prefix_cache.cached_rows(frame),
                                            exp.data.image_size, DECODED_ROOT)
        if folder is not None:
            return (*(decoded.DecodedImages(folder, split, frame.label_idx[frame.split == split])
                      for split in ("train", "valid")), None)
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


def device_for(use_gpu: bool) -> torch.device:
    """The GPU when asked for (Ray gave this process one), else the CPU; a GPU asked for that
    torch cannot see is one line, never a silent fall back to the CPU."""
    if use_gpu and not torch.cuda.is_available():
        raise BoatrayError("a GPU was asked for but torch sees none (check the driver, "
                           "CUDA_VISIBLE_DEVICES, and that torch is a CUDA build)")
    return torch.device("cuda" if use_gpu else "cpu")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, *,
                    amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """One pass over `loader`; loss, accuracy and images/s over every rank's batches.

    Frozen BatchNorm layers stay in eval mode (`freezing.train_mode`).
    """
    freezing.train_mode(model)
    # running sums stay on the device, read once after the epoch: reading them per step would
    # make the host wait for the GPU at every batch (float64: the same sums as Python floats)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    start = time.perf_counter()
    for batch, labels in loader:
        inputs = to_input(batch, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast(device, amp):
            logits = model(inputs)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = max_over_ranks(time.perf_counter() - start, device)
    loss_sum, correct, count = _sum_over_ranks([loss_sum.item(), correct.item(), count], device)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1),
            "images": int(count), "seconds": seconds,
            "images_per_second": count / seconds if seconds > 0 else 0.0}


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool = False,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and labels (on the CPU) of every batch of `loader`, in order."""
    model.eval()
    logits, labels = [], []
    for batch, target in loader:
        with precision.autocast(device, amp):
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
    logits, labels = predict_logits(model, loader, device, amp=amp, channels_last=channels_last)
    logits, labels = _gather(logits), _gather(labels)
    if not len(labels):
        return {"loss": math.nan, "accuracy": math.nan, "macro_f1": math.nan}
    loss = criterion(logits.to(device), labels.to(device)).item()
    predicted = logits.argmax(1)
    return {"loss": loss, "accuracy": float((predicted == labels).float().mean()),
            "macro_f1": float(f1_score(labels.numpy(), predicted.numpy(), average="macro",
                                       zero_division=0))}


def input_example(dataset: Dataset, image_size: Sequence[int]) -> torch.Tensor:
    """One input of `dataset` as it enters the model, without drawing random numbers: a
    cached row (activations or decoded pixels), or uint8 zeros of an image's shape."""
    if isinstance(dataset, MappedSplit):
        return dataset[[0]][0][0]
    return torch.zeros((3, *image_size), dtype=torch.uint8)


def auto_batch_size(network: nn.Module, module: nn.Module, spec: str, example: torch.Tensor,
                    device: torch.device, *, amp: bool, channels_last: bool) -> int:
    """`train.batch_size: auto` on a GPU (sizing.py): the largest candidate whose trial step
    (forward and backward of `network` on zeros shaped like `example`, `module` frozen at
    `spec`) fits; the smallest over every rank. The model is left as it was: eval mode keeps
    BatchNorm's statistics, the gradients are dropped, no random number is drawn."""
    freezing.freeze(module, spec)
    network.eval()

    def step(size: int) -> None:
        inputs = to_input(torch.zeros((size, *example.shape), dtype=example.dtype), device,
                          channels_last)
        try:
            with precision.autocast(device, amp):
                network(inputs).float().sum().backward()
        finally:
            for param in module.parameters():
                param.grad = None

    size = sizing.largest_fitting(step, device)
    return int(-max_over_ranks(-size, device))


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

    `plateau` is ReduceLROnPlateau on the validation loss (one of the lab's reports stepped it on
    the training loss): the validation loss says when the model stopped generalising better,
    and ASHA stops trials on it, so both look at the same curve.
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
    """The freeze spec in force at 0-based `epoch` of a run (gradual unfreezing: its phase)."""
    return freezing.spec_at(cfg.freeze, epoch, cfg.gradual_every)


def optimizer_over_all_stages(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """An optimizer holding every stage (discriminative lrs); freezing then decides what moves."""
    freezing.freeze(model, "all")
    return make_optimizer(freezing.param_groups(model, cfg.lr, cfg.lr_decay), cfg)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same on every rank: identical initial models)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- the loop


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, so after an epoch each rank holds rank 0's
    statistics updated by its own last batch; this makes every rank evaluate the model that
    rank 0's checkpoint saves.
    """
    if _world() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- the driver side


