"""Fine-tuning the pretrained backbone: the Ray Tune sweep over freeze spec x learning rate
(x scheduler x repeats), then the selected configurations (the best overall and the best per
freeze spec) evaluated on test (boatray/finetune/)."""

from __future__ import annotations

import pandas as pd

from boatray import cluster, models, results
from boatray.approaches.base import Context, Plan
from boatray.approaches.networks import NetworkApproach
from boatray.config import Experiment


class Finetune(NetworkApproach):
    """The fine-tuning sweep (`sweep` and `train` sections)."""

    name = "finetune"
    title = "fine-tune"
    stage = "fine-tuning sweep"
    section = "sweep"
    tuned = True

    def training(self, exp: Experiment) -> Experiment:
        return exp

    def config_id(self, training: Experiment) -> str:
        cfg = training.train
        return results.finetune_config_id(cfg.freeze, cfg.lr, cfg.scheduler)

    def fit(self, context: Context) -> list[str]:
        from boatray.finetune.stage import run_stage

        return run_stage(context.exp, context.manifest, context.resume, self.name)

    def label(self, record) -> str:
        if not record.get("freeze"):
            return self.title
        parts = [f"fine-tune {record['freeze']}"]
        if record.get("lr") is not None:
            parts.append(f"lr {float(record['lr']):g}")
        if record.get("scheduler") not in (None, "none"):
            parts.append(str(record["scheduler"]))
        return ", ".join(parts) + (" (best)" if record.get("selected") == "best" else "")

    def plan(self, exp: Experiment, manifest: pd.DataFrame) -> Plan:
        from boatray.finetune.trainer import worker_resources
        from boatray.finetune.tuning import trial_count, trial_epochs

        trials, epochs = trial_count(exp), trial_epochs(exp)
        lengths = ", ".join(f"{freeze} {exp.sweep.epochs(freeze, exp.train.epochs)}"
                            for freeze in exp.sweep.freeze)
        forward = models.backbone(exp.model.name).flops(
            exp.data.image_size, manifest["label"].nunique(), exp.model.pooling)
        height, width = exp.data.image_size
        return Plan(
            f"stage {self.stage}: {trials} trials, epochs {lengths}: {epochs} "
            f"trial-epochs at most (ASHA stops some early), {exp.sweep.max_concurrent_trials} "
            f"at a time, each {exp.train.num_workers} worker(s) x "
            f"{cluster.shown(worker_resources(exp.train))}; {exp.model.name} at "
            f"{height}x{width}, weights {exp.model.weights}",
            3 * forward * int((manifest["split"] == "train").sum()) * epochs)
