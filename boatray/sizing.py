"""Batch sizes for the device a stage runs on: a number from the config, or `auto`.

- `features.batch_size: auto` (the default): Ray Data hands each GPU extraction actor
  `GPU_FEATURES_BATCH` rows (CPUs: `CPU_FEATURES_BATCH`, where larger batches gain nothing);
  on a GPU the actor runs them in the largest part that fits its memory, halving on an
  out-of-memory error (pipeline.TrunkRunner), so the first batch is the trial.
- `train.batch_size: auto`: on a GPU, the training loop takes the largest of
  `TRAIN_CANDIDATES` whose trial step (forward and backward of the run's network at its most
  trainable freeze spec) peaks within `MEMORY_SHARE` of the memory the GPU has for it; with
  DDP the smallest over the ranks. On CPUs, `CPU_TRAIN_BATCH` (the lab's 32). A larger batch
  changes the optimisation (fewer, larger steps at the same learning rate): the plan says
  which size each stage uses, and every epoch's metrics record it (`batch_size`).

`auto` rather than a table of sizes per GPU type: the trial measures the GPU, the model, the
image size and the freeze spec actually in use, including what other processes already hold
on a GPU shared by `HEAD_TRIAL_GPU` trials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from boatray.config import FeaturesConfig, TrainConfig

TRAIN_CANDIDATES = (256, 128, 64, 32)
CPU_TRAIN_BATCH = 32
GPU_FEATURES_BATCH = 256
CPU_FEATURES_BATCH = 64
MEMORY_SHARE = 0.85
"""A trial step may peak at this share of the GPU memory free for it (the optimizer's state,
the allocator's fragmentation and a second input batch in flight need the rest)."""
HEAD_TRIAL_GPU = 0.25
"""The GPU share a sweep trial asks for when it trains the head alone on cached features
(pooled activations): four such trials share one GPU."""


def features_batch(cfg: FeaturesConfig) -> int:
    """The rows per Ray Data batch of an extraction (`features.batch_size`, or its `auto`)."""
    if cfg.batch_size != "auto":
        return int(cfg.batch_size)
    return GPU_FEATURES_BATCH if cfg.use_gpu is True else CPU_FEATURES_BATCH


def resolved_features(cfg: FeaturesConfig) -> FeaturesConfig:
    """`cfg` with `batch_size` a number (`features_batch`)."""
    return dataclasses.replace(cfg, batch_size=features_batch(cfg))


def fixed_train_batch(cfg: TrainConfig) -> int:
    """`train.batch_size` where no trial step can run (prediction after training; CPUs)."""
    return CPU_TRAIN_BATCH if cfg.batch_size == "auto" else int(cfg.batch_size)


def largest_fitting(step: Callable[[int], None], device: torch.device,
                    candidates: tuple[int, ...] = TRAIN_CANDIDATES) -> int:
    """The largest of `candidates` (in decreasing order) for which `step(size)` runs on the GPU
    `device` and peaks within `MEMORY_SHARE` of the memory free for it; the smallest if none."""
    free, _ = torch.cuda.mem_get_info(device)
    budget = MEMORY_SHARE * (free + torch.cuda.memory_reserved(device))
    for size in candidates:
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(size)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            peak = None
        torch.cuda.empty_cache()
        if peak is not None and peak <= budget:
            return size
    return candidates[-1]


def describe(train: TrainConfig, features: FeaturesConfig) -> str:
    """The plan's line: the batch sizes training and extraction will use."""
    if train.batch_size != "auto":
        training = f"training {train.batch_size}"
    elif train.use_gpu is True:
        training = ("training auto: the largest of " + ", ".join(map(str, TRAIN_CANDIDATES))
                    + " whose trial step fits each GPU's free memory (recorded per epoch)")
    else:
        training = f"training auto: {CPU_TRAIN_BATCH} on CPUs"
    extraction = f"extraction {features_batch(features)}"
    if features.use_gpu is True:
        extraction += " rows per GPU actor (run in the largest part that fits its GPU)"
    elif features.batch_size == "auto":
        extraction += " (auto, on CPUs)"
    return f"batch sizes: {training}; {extraction}"
