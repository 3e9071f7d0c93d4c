"""Approaches that train a network with the fine-tuning loop (the fine-tunes, the baseline):
their runs have learning curves, their models are whole networks, and one run of them can be
trained on its own (`python -m boatray.finetune`)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from boatray import export, results
from boatray.approaches.base import Approach
from boatray.config import Experiment


class NetworkApproach(Approach):
    """An approach whose runs are training runs of the fine-tuning loop."""

    trains_network = True

    @abc.abstractmethod
    def training(self, exp: Experiment) -> Experiment:
        """The experiment one training run of this approach uses (model, data, train)."""

    @abc.abstractmethod
    def config_id(self, training: Experiment) -> str:
        """What groups the repeats of a training run's configuration."""

    def run_name(self, training: Experiment) -> str:
        """The run folder name of a training run (its repeat from its seed)."""
        return results.run_name(self.config_id(training), training.train.seed - training.seed)

    def train(self, training: Experiment, manifest: Path, run_dir: Path) -> Path:
        """Train one run, predict valid and test with its final checkpoint, write its run
        folder and exported model; return the run folder."""
        from boatray.finetune.run import run

        return run(training, manifest, run_dir,
                   {"approach": self.name, "config_id": self.config_id(training)})

    def load(self, folder: Path, spec: dict[str, Any]) -> export.Model:
        return export.load_network(folder, spec)
