"""What an approach is: one way to answer the study's question, from fitting to prediction.

An approach fits on the study (`fit`: it writes its run folders, predictions.parquet +
run.json, and exports its models), says what it will do (`plan`), names its results in the
report (`title`, `label`), and rebuilds an exported model for prediction (`load`). Its settings
are the config section `section`. Everything above the approaches (the sweep's stages, the
plan, export and predict, the report and the closing summary) iterates the registry
(`boatray.approaches`) and names no approach.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from boatray.config import Experiment
    from boatray.export import Model


@dataclass(frozen=True)
class Context:
    """What an approach fits on: the experiment (devices resolved), its manifest, whether this
    run resumes an earlier one, and the features file (for approaches on features)."""

    exp: Experiment
    manifest: Path
    resume: bool = False

    @property
    def features(self) -> Path:
        """The experiment's extracted features (the sweep extracts them before any approach
        that `uses_features` runs)."""
        return self.exp.layout.features


@dataclass(frozen=True)
class Plan:
    """An approach's line in the dry-run plan, and its compute estimate in FLOPs."""

    line: str
    flops: float = 0.0


class Approach(abc.ABC):
    """One approach of the study. Subclasses set the class attributes and implement `fit`,
    `plan` and `load`."""

    name: str
    """Its name in run.json (`approach`) and model.json."""
    title: str
    """What the report calls its results."""
    stage: str
    """What the console calls its stage."""
    section: str
    """The config section that holds its settings and its `enabled` switch."""
    uses_features: bool = False
    """Fitted on the experiment's extracted features (then `features.enabled` switches it too)."""
    trains_network: bool = False
    """Trains a network epoch by epoch: its runs have a learning curve (`history`)."""
    tuned: bool = False
    """Its runs are the trials of a Ray Tune sweep (with Ray Train workers, each trial's own
    process drives its run)."""

    def enabled(self, config: dict[str, Any]) -> bool:
        """Whether the experiment's config (as a dict, `Experiment.to_dict()`) runs it."""
        on = (config.get(self.section) or {}).get("enabled", True)
        if self.uses_features:
            on = on and (config.get("features") or {}).get("enabled", True)
        return bool(on)

    def label(self, record: Any) -> str:
        """The report's name of the configuration a run record belongs to."""
        return self.title

    @abc.abstractmethod
    def fit(self, context: Context) -> list[str] | None:
        """Fit on the study: write its run folders under runs/ and its models under models/;
        on resume, keep what an earlier run finished. Returns the parts that failed while the
        rest stands (one line each, e.g. failed sweep trials), if any."""

    @abc.abstractmethod
    def plan(self, exp: Experiment, manifest: pd.DataFrame) -> Plan:
        """What `fit` will do on this experiment and data, in one line, and its FLOPs."""

    @abc.abstractmethod
    def load(self, folder: Path, spec: dict[str, Any]) -> Model:
        """The model exported in `folder` (its model.json read as `spec`), ready to predict."""
