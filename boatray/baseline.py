"""The BetterCNN baseline: the lab's small CNN trained from scratch by the fine-tuning loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from boatray import results
from boatray.config import Experiment, ModelConfig
from boatray.finetune.run import run


def baseline_experiment(exp: Experiment) -> Experiment:
    """The lab's BetterCNN baseline as a training run: exp.baseline mapped onto model/train/data.

    From scratch (weights none, every layer trained) at the baseline's image size, epochs,
    optimizer, lr and batch size, with the lab's plain recipe: no scheduler, no class
    weighting, no balanced sampler, no weight decay. Workers, GPUs, seed and failure handling
    stay those of exp.train.
    """
    base = exp.baseline
    return dataclasses.replace(
        exp, model=ModelConfig(name="bettercnn", weights="none", pooling="avg"),
        features=dataclasses.replace(exp.features, stage="pool"),  # bettercnn's only cut
        data=dataclasses.replace(exp.data, image_size=tuple(base.image_size)),
        train=dataclasses.replace(
            exp.train, epochs=base.epochs, lr=base.lr, optimizer=base.optimizer,
            batch_size=base.batch_size, freeze="all", scheduler="none", lr_decay=1.0,
            weight_decay=0.0, class_weighted_loss=False, balanced_sampler=False))


def run_stage(exp: Experiment, manifest: Path, resume: bool) -> None:
    """The study's baseline stage: BetterCNN once per `sweep.repeats` seed (the fine-tunes'
    seeds), grouped as one configuration in the report; a finished repeat is kept on resume."""
    base = baseline_experiment(exp)
    for repeat in range(exp.sweep.repeats):
        run_dir = exp.layout.run(results.run_name(results.BASELINE_CONFIG_ID, repeat))
        if resume and results.is_run(run_dir):
            continue
        base.train.seed = exp.seed + repeat
        run(base, manifest, run_dir, approach="baseline",
            record={"config_id": results.BASELINE_CONFIG_ID})
