"""Minutes in the plan: every stage's wall time, estimated from a few seconds of calibration.

`calibrate` times, on this node, what each stage repeats per image: decoding at the run's
image size, the extraction trunk through the features pipeline's own `TrunkRunner` (the run's
size, batch, dtype and threads), one training step and one evaluation of every freeze spec
(on cached activations where the run trains from a cache) through the loop's own
`train_one_epoch`/`evaluate`, and the step of every other network an approach trains (the
BetterCNN baseline's). `estimate` scales those, stage by stage as the sweep runs them (the
approach registry's), by their images, epochs and concurrency, adds their fixed costs, and gives
the sweep a range when ASHA may stop trials early: from every trial stopped at its first
chance to none stopped. After a run, `record` keeps the estimate beside each stage's actual
wall time in results/<experiment>/timing.json (`TIMING_FILE`), which the report's cost
section shows (`stage_times`). Importing this module is cheap: torch and the models are only
loaded by `calibrate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from boatray import precision, sizing
from boatray.cluster import Capacity
from boatray.config import Experiment
from boatray.results import atomic_write_text

TIMING_FILE = "timing.json"

STEP_BUDGET_S = 4.0
"""Seconds one timed step may take: a step at the run's batch that would take longer (by a
1-image probe) is timed on fewer images, MIN_IMAGES at the least."""
MIN_IMAGES = 8
THREAD_EFFICIENCY = 0.7
"""What each thread past the first adds to a step's speed (convolutions on 2 cores: 1.7x)."""
TRIAL_START_S = 6.0
"""A sweep's first trial process: Python, torch and the trial's data (on 2 cores, with Tune's
start: SWEEP_OVERHEAD_S)."""
TRIAL_SWITCH_S = 0.5
"""Handing a reused trial process to its next trial."""
EPOCH_OVERHEAD_S = 0.1
"""Per trial epoch: Tune's report, the epoch's bookkeeping and (some epochs) a checkpoint."""
SWEEP = "sweep"
"""The config section of the approach whose stage is the Tune sweep (the fine-tunes)."""
SWEEP_OVERHEAD_S = 6.0
"""The sweep's own fixed cost: Tune's start and end, the trials table."""
FIT_OVERHEAD_S = 0.3
"""Each other stage's fixed cost: reading the features, writing run folders and models."""
REPORT_S = 2.5
"""The report: bootstrap intervals, tables, plots, Markdown and HTML."""
START_S = 8.0
"""The run's start before its first stage: Ray, the manifest, the experiment's records."""
HEAD_S_PER_SAMPLE2 = 1e-7
"""A classical head's grid of fits on the features, seconds per (train + valid image)^2 (the
SVM's Gram matrices dominate)."""


@dataclass
class Calibration:
    """Per-image seconds of each repeated step, as measured on this node."""

    node: str
    decode_s: float  # one image at the run's size, one thread
    trunk_s: float  # one image through the features trunk (features.stage)
    trunk_rate: str  # how it was measured, in words
    prefix_s: dict[str, float]  # one image to each cache's cut point
    train_s: dict[str, float]  # one training image of each freeze spec (cached where it can)
    eval_s: dict[str, float]  # one valid image of each freeze spec
    cached: dict[str, bool]  # whether each freeze spec trains from a cache
    single: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """The other approaches that train a network (the baseline), per image: decoding, a
    training step, an evaluation."""
    seconds: float = 0.0  # what the calibration took


@dataclass
class Estimate:
    """Each stage's (low, high) seconds; low == high where nothing can stop early."""

    stages: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> tuple[float, float]:
        return (sum(low for low, _ in self.stages.values()),
                sum(high for _, high in self.stages.values()))


# ---------------------------------------------------------------- calibration

def _per_image(step, images: int) -> float:
    """Seconds per image of `step(n)` (n images) at `images` per call (the run's batch: a call
    has a fixed cost too), or fewer (at least MIN_IMAGES) where a 1-image probe says that a
    call would take more than STEP_BUDGET_S; after a warm-up call of that size, the best of two
    (a busy machine's pauses are not the step's)."""
    began = time.perf_counter()
    step(1)
    probe = time.perf_counter() - began
    count = images if probe * images <= STEP_BUDGET_S else max(
        min(MIN_IMAGES, images), int(STEP_BUDGET_S / probe))
    step(count)
    best = math.inf
    for _ in range(2):
        began = time.perf_counter()
        step(count)
        best = min(best, time.perf_counter() - began)
    return best / count


def calibrate(exp: Experiment, frame: pd.DataFrame) -> Calibration:
    """Time each stage's repeated steps on this node (a few seconds): `frame` is the manifest
    (a few of its images are decoded). Speeds do not depend on the weights: the networks are
    built without them. Every step is timed on one thread and scaled to the threads the stage
    runs on (`_threads`): on a busy machine a step on several threads waits for all of them at
    every layer and its time says little, one thread's says what a core does."""
    import torch

    from boatray import approaches, freezing, models
    from boatray.finetune import prefix_cache

    began, threads = time.perf_counter(), torch.get_num_threads()
    size = tuple(exp.data.image_size)
    classes = int(frame.label_idx.max()) + 1
    backbone = models.backbone(exp.model.name)
    network = models.build(exp.model.name, "none", classes, exp.model.pooling)
    cores = os.cpu_count() or 1
    trunk_threads = exp.features.threads_per_actor or max(
        1, cores // max(1, exp.features.num_actors or 1))
    trial_threads = max(1, int(exp.train.cpus_per_worker))
    trunk_s = _trunk_seconds(models.trunk(network, exp.features.stage), exp) / _threads(
        trunk_threads)
    trunk_flops = max(backbone.flops(size, classes, exp.model.pooling, upto=exp.features.stage),
                      1)
    torch.set_num_threads(1)
    try:
        train_s, eval_s, cached, prefix_s, timed = {}, {}, {}, {}, {}
        for spec in dict.fromkeys(exp.sweep.freeze):
            run = dataclasses.replace(exp, train=dataclasses.replace(exp.train, freeze=spec))
            cut = prefix_cache.cached_stage(run)[0]
            if cut is not None and prefix_cache.estimated_speedup(
                    run, cut, classes) < exp.train.cache_min_speedup:
                cut = None
            cached[spec] = cut is not None
            shape = (3, *size)
            if cut is not None:
                prefix_s[cut] = trunk_s * backbone.flops(size, classes, exp.model.pooling,
                                                         upto=cut) / trunk_flops
                shape = backbone.output_shape(size, cut, exp.model.pooling)
            trains = freezing.GRADUAL[-1] if spec == "gradual" else spec  # its longest phase
            if (trains, cut) not in timed:
                freezing.freeze(network, trains)
                trained = network if cut is None else models.suffix(network, cut)
                timed[trains, cut] = tuple(
                    seconds / _threads(trial_threads)
                    for seconds in _step_seconds(trained, shape, exp.train, classes))
            train_s[spec], eval_s[spec] = timed[trains, cut]
        paths = frame.path.tolist()[:4]
        single = {}  # they train in the driver (a one-node CPU cluster): all its cores
        for approach in approaches.enabled(exp.to_dict()):
            if approach.trains_network and approach.section != SWEEP:
                training = approach.training(exp)
                steps = _step_seconds(models.build(training.model.name, "none", classes,
                                                   training.model.pooling),
                                      (3, *training.data.image_size), training.train, classes)
                single[approach.name] = (_decode_seconds(paths, training.data.image_size),
                                         *(seconds / _threads(cores) for seconds in steps))
    finally:
        torch.set_num_threads(threads)
    return Calibration(
        node=f"{cores} CPUs: {trunk_threads} threads per extraction actor, "
             f"{trial_threads} per trial",
        decode_s=_decode_seconds(paths, size), trunk_s=trunk_s,
        trunk_rate=f"trunk {1 / trunk_s:.1f} images/s at {size[0]}x{size[1]}, batch "
                   f"{sizing.features_batch(exp.features)}, "
                   f"{precision.compute_dtype(exp.features.amp, 'cpu')}",
        prefix_s=prefix_s, train_s=train_s, eval_s=eval_s, cached=cached, single=single,
        seconds=time.perf_counter() - began)


def _threads(count: int) -> float:
    """How many times faster a step runs on `count` threads than on one."""
    return 1 + (count - 1) * THREAD_EFFICIENCY


def _decode_seconds(paths: list[str], size: tuple[int, int]) -> float:
    """Seconds to decode one image at `size` (after one warm-up)."""
    from boatray.data.images import decode

    decode(paths[0], size)
    began = time.perf_counter()
    for path in paths:
        decode(path, size)
    return (time.perf_counter() - began) / len(paths)


def _trunk_seconds(trunk, exp: Experiment) -> float:
    """Seconds per image through the extraction's own TrunkRunner on one thread, at the
    features' batch."""
    import numpy as np

    from boatray.features.pipeline import COLUMNS, TrunkRunner

    feats = exp.features
    runner = TrunkRunner(trunk, False, feats.amp, feats.channels_last, 1, feats.dtype)

    def extract(count: int) -> None:
        rows = {column: np.array(["x"] * count) for column in COLUMNS}
        runner({**rows, "error": np.array([""] * count), "decode_seconds": np.zeros(count),
                "image": np.zeros((count, *exp.data.image_size, 3), dtype=np.uint8)})

    return _per_image(extract, sizing.features_batch(feats))


def _step_seconds(network, shape: tuple[int, ...], cfg, classes: int) -> tuple[float, float]:
    """Seconds per image of a training step and of an evaluation of `network` through the
    loop's own functions, on inputs of `shape` (uint8 images, or float16 cached activations),
    at `cfg`'s batch size and optimizer."""
    import torch
    from torch import nn

    from boatray.finetune import engine

    device = torch.device("cpu")
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = engine.make_optimizer([{"params": trainable, "lr": cfg.lr}], cfg)
    criterion = nn.CrossEntropyLoss()
    kind = torch.uint8 if len(shape) == 3 and shape[0] == 3 else torch.float16

    def batch(count: int) -> list:
        return [(torch.zeros((count, *shape), dtype=kind), torch.zeros(count, dtype=torch.long)
                 % classes)]

    size = sizing.fixed_train_batch(cfg)  # `auto` is a GPU's: on a CPU, the fixed one
    train = _per_image(lambda n: engine.train_one_epoch(network, batch(n), criterion,
                                                        optimizer, device), size)
    valid = _per_image(lambda n: engine.evaluate(network, batch(n), criterion, device), size)
    return train, valid


# ---------------------------------------------------------------- the estimate

def for_run(exp: Experiment, frame: pd.DataFrame, capacity: Capacity
            ) -> tuple[Estimate, Calibration | None]:
    """The estimate of a run whose devices are resolved (preflight.check), with the
    calibration it rests on; none, with a note, for a run on GPUs (this node's CPUs say
    nothing about them)."""
    if exp.train.use_gpu is True or exp.features.use_gpu is True:
        return Estimate(notes=["not estimated: the run uses GPUs, and the calibration runs on "
                               "this node's CPUs"]), None
    cal = calibrate(exp, frame)
    nodes = sum(1 for node in capacity.nodes if node.get("CPU"))
    result = estimate(exp, frame, max(1, nodes), cal)
    start = result.stages["start (Ray, data)"][0] + cal.seconds  # the run calibrates too
    result.stages["start (Ray, data)"] = (start, start)
    return result, cal


def estimate(exp: Experiment, frame: pd.DataFrame, nodes: int, cal: Calibration) -> Estimate:
    """Each stage's wall time on a cluster of `nodes` CPU nodes, from `cal`: its images x
    epochs x the calibrated per-image seconds, over its concurrency, plus its fixed costs; the
    sweep as a range where ASHA may stop trials. The stages are the sweep's (sweep.stages): each
    enabled approach's, the feature extraction before the first on features."""
    from boatray import approaches
    from boatray.sweep import FEATURES_STAGE

    counts = frame.split.value_counts()
    splits = {split: int(counts.get(split, 0)) for split in ("train", "valid", "test")}
    extraction = len(frame) * (cal.decode_s + cal.trunk_s) / max(1, _actors(exp, nodes))
    chosen = approaches.enabled(exp.to_dict())
    # the sweep's one pass extracts the features where a trial trains from a cache
    in_sweep = any(a.section == SWEEP for a in chosen) and any(cal.cached.values()) and any(
        a.uses_features for a in chosen)
    result = Estimate(stages={"start (Ray, data)": (START_S, START_S)})
    for approach in chosen:
        if approach.uses_features and FEATURES_STAGE not in result.stages:
            seconds = FIT_OVERHEAD_S + (0.0 if in_sweep else extraction)
            result.stages[FEATURES_STAGE] = (seconds, seconds)
        if approach.section == SWEEP:
            result.stages[approach.stage] = _sweep(exp, cal, splits,
                                                   extraction if in_sweep else 0.0, result)
        elif approach.trains_network:
            seconds = FIT_OVERHEAD_S + exp.sweep.repeats * _single_run(
                approach.training(exp), cal.single[approach.name], splits)
            result.stages[approach.stage] = (seconds, seconds)
        else:
            seconds = FIT_OVERHEAD_S + HEAD_S_PER_SAMPLE2 * (splits["train"]
                                                             + splits["valid"]) ** 2
            result.stages[approach.stage] = (seconds, seconds)
    result.stages["report"] = (REPORT_S, REPORT_S)
    return result


def _sweep(exp: Experiment, cal: Calibration, splits: dict[str, int], extraction: float,
           result: Estimate) -> tuple[float, float]:
    """The sweep's (fewest, most) seconds: the features' pass (`extraction`) with the caches it
    fills, the caches it cannot, the trials over their concurrency, the selected runs' test
    predictions."""
    from boatray.finetune.tuning import grid_points, scheduler_stops, trial_experiment

    train, valid, test = splits["train"], splits["valid"], splits["test"]
    repeats = exp.sweep.repeats
    points = grid_points(exp) if exp.sweep.search == "grid" else [
        {"freeze": freeze, "lr": exp.train.lr} for freeze in exp.sweep.freeze]
    # each cut point's caches: one per seed with random weights, else one; the features' pass
    # fills one of them
    own = (repeats if exp.model.weights.lower() == "none" else 1) - int(extraction > 0)
    low = high = (SWEEP_OVERHEAD_S + extraction + own * (train + valid) * sum(
        cal.decode_s + seconds for seconds in cal.prefix_s.values()))
    trials = len(points) * len(exp.sweep.scheduler) * repeats
    at_once = max(1, min(exp.sweep.max_concurrent_trials, trials))
    stops = scheduler_stops(exp)
    for freeze in dict.fromkeys(point["freeze"] for point in points):
        count = sum(p["freeze"] == freeze for p in points) * len(exp.sweep.scheduler) * repeats
        epochs = trial_experiment(exp, {"freeze": freeze, "lr": 0, "scheduler": "none",
                                        "repeat": 0}).train.epochs
        epoch = _epoch_seconds(exp, cal, freeze, train, valid)
        few, most = _asha_epochs(count, epochs, [s for s in stops if s < epochs],
                                 exp.sweep.asha.reduction_factor)
        low += few * epoch / at_once
        high += most * epoch / at_once
    # the selected runs (the best per freeze spec) predict valid and test: from an evaluation
    # cache (the suffix alone) where the features' pass made one, else from the images
    predictions = sum(
        (cal.eval_s[freeze] if extraction and cal.cached[freeze] else cal.decode_s + cal.trunk_s)
        for freeze in dict.fromkeys(point["freeze"] for point in points)) * repeats * (
        valid + test)
    fixed = TRIAL_START_S + TRIAL_SWITCH_S * trials / at_once + predictions
    if stops and low != high:
        result.notes.append("the sweep's range: from every trial ASHA can stop stopped at its "
                            "first chance to none stopped")
    return low + fixed, high + fixed


def _single_run(training: Experiment, steps: tuple[float, float, float],
                splits: dict[str, int]) -> float:
    """One run of `training` (the baseline's): its decoded-image cache, its epochs, its valid
    and test predictions; `steps`: per-image decoding, training step and evaluation."""
    decode, step, evaluation = steps
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    return ((train + valid) * decode
            + training.train.epochs * (train * step + valid * evaluation + EPOCH_OVERHEAD_S)
            + (valid + test) * (decode + evaluation))


def _actors(exp: Experiment, nodes: int) -> int:
    """Extraction actors on CPUs: `features.num_actors`, else one per node."""
    return exp.features.num_actors or nodes


def _epoch_seconds(exp: Experiment, cal: Calibration, freeze: str, train: int,
                   valid: int) -> float:
    """One trial epoch of `freeze`: its steps over the train split and its evaluation; on
    images, their decoding too where no decoded-image cache is kept (random augmentation)."""
    decoding = 0.0 if cal.cached[freeze] or (exp.train.cache_decoded and not exp.data.augment) \
        else cal.decode_s
    workers = max(1, exp.train.num_workers)
    return ((train * (cal.train_s[freeze] + decoding) + valid * (cal.eval_s[freeze] + decoding))
            / workers + EPOCH_OVERHEAD_S)


def _asha_epochs(trials: int, epochs: int, rungs: list[int], factor: float
                 ) -> tuple[float, float]:
    """(fewest, most) epochs `trials` trials of `epochs` run: at each rung ASHA keeps the best
    1/factor of them at the least, every one of them at the most."""
    most = trials * epochs
    left, few = trials, 0.0
    for rung in rungs:
        kept = max(1, math.ceil(left / factor))
        few += (left - kept) * rung
        left = kept
    return few + left * epochs, most


def summary(result: Estimate, cal: Calibration | None) -> str:
    """The estimate in one line."""
    if cal is None:
        return "; ".join(result.notes)
    stages = ", ".join(f"{stage} {_span(span)}" for stage, span in result.stages.items()
                       if not stage.startswith("start"))
    return (f"{_span(result.total)} ({stages}; calibrated on this node in {cal.seconds:.1f} s, "
            f"{cal.trunk_rate})")


def describe(result: Estimate, cal: Calibration | None) -> list[str]:
    """The plan's lines: each stage's minutes and the total, and what they rest on."""
    if cal is None:
        return [f"estimated wall time: {note}" for note in result.notes]
    lines = [f"estimated wall time (calibrated on this node in {cal.seconds:.1f} s: "
             f"{cal.node}; {cal.trunk_rate}):"]
    for stage, span in [*result.stages.items(), ("total", result.total)]:
        lines.append(f"  {stage}: {_span(span)}")
    return lines + [f"  ({note})" for note in result.notes]


def _span(span: tuple[float, float]) -> str:
    from boatray.console import duration

    low, high = span
    return duration(low) if round(low) == round(high) else f"{duration(low)} to {duration(high)}"


# ---------------------------------------------------------------- estimate against actual

def record(results_dir: Path, result: Estimate, actual: dict[str, float] | None = None) -> Path:
    """Write results_dir/timing.json: the estimate of each stage and, once known, its actual
    wall seconds."""
    path = Path(results_dir) / TIMING_FILE
    atomic_write_text(path, json.dumps({
        "estimate": {stage: list(span) for stage, span in result.stages.items()},
        "notes": result.notes, "actual": actual or {}}, indent=2) + "\n")
    return path


def stage_times(results_dir: Path) -> pd.DataFrame | None:
    """The report's table of timing.json: each stage's estimated and actual seconds and their
    ratio; None where the run kept no estimate."""
    path = Path(results_dir) / TIMING_FILE
    if not path.is_file():
        return None
    timing = json.loads(path.read_text())
    actual = timing.get("actual") or {}
    rows = []
    for stage, (low, high) in timing["estimate"].items():
        seconds = actual.get(stage)
        rows.append({"stage": stage, "estimated_seconds": (low + high) / 2 if low == high
                     else f"{low:.0f} to {high:.0f}", "actual_seconds": seconds,
                     "actual / estimate": seconds / ((low + high) / 2) if seconds else None})
    return pd.DataFrame(rows)
