"""The lab's BetterCNN trained from scratch by the fine-tuning loop: the baseline."""

from __future__ import annotations

import dataclasses

import pandas as pd

from boatray import cluster, models, results
from boatray.approaches.base import Context, Plan
from boatray.approaches.networks import NetworkApproach
from boatray.config import Experiment, ModelConfig

CONFIG_ID = "baseline-bettercnn"


class Baseline(NetworkApproach):
    """BetterCNN from scratch (`baseline` section), once per `sweep.repeats` seed."""

    name = "baseline"
    title = "BetterCNN from scratch"
    stage = "BetterCNN baseline"
    section = "baseline"

    def training(self, exp: Experiment) -> Experiment:
        """exp.baseline mapped onto model/train/data: from scratch (weights none, every layer
        trained) at the baseline's image size, epochs, optimizer, lr and batch size, with the
        lab's plain recipe (no scheduler, class weighting, balanced sampler or weight decay).
        Workers, devices, seed and failure handling stay those of exp.train."""
        base = exp.baseline
        return dataclasses.replace(
            exp, model=ModelConfig(name="bettercnn", weights="none", pooling="avg"),
            features=dataclasses.replace(exp.features, stage="pool"),  # bettercnn's only cut
            data=dataclasses.replace(exp.data, image_size=tuple(base.image_size)),
            train=dataclasses.replace(
                exp.train, epochs=base.epochs, lr=base.lr, optimizer=base.optimizer,
                batch_size=base.batch_size, freeze="all", scheduler="none", lr_decay=1.0,
                weight_decay=0.0, class_weighted_loss=False, balanced_sampler=False))

    def config_id(self, training: Experiment) -> str:
        return CONFIG_ID

    def fit(self, context: Context) -> None:
        """One run per `sweep.repeats` seed (the fine-tunes' seeds), grouped as one
        configuration in the report; a finished repeat is kept on resume."""
        exp = context.exp
        for repeat in range(exp.sweep.repeats):
            training = self.training(exp)
            training = dataclasses.replace(training, train=dataclasses.replace(
                training.train, seed=exp.seed + repeat))
            run_dir = exp.layout.run(self.run_name(training))
            if context.resume and results.is_run(run_dir):
                continue
            self.train(training, context.manifest, run_dir)

    def plan(self, exp: Experiment, manifest: pd.DataFrame) -> Plan:
        from boatray.finetune.trainer import worker_resources

        training = self.training(exp)
        backbone = models.backbone(training.model.name)
        train_images = int((manifest["split"] == "train").sum())
        height, width = training.data.image_size
        return Plan(
            f"stage {self.stage}: {training.train.epochs} epochs on {train_images} images at "
            f"{height}x{width}, {training.train.num_workers} worker(s) x "
            f"{cluster.shown(worker_resources(training.train))}",
            3 * backbone.flops(training.data.image_size, manifest["label"].nunique())
            * train_images * training.train.epochs)
