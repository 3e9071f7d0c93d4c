"""Load a results folder into what the report works from: runs, configurations, the sweep.

The report reads nothing but run folders (predictions and run records, boatray.results) and,
beside them, the sweep's trials, the experiment's config and the run state (whether the run
finished). A trials table has a row per trial per epoch with `trial_id`, `epoch`, the trial's
config (plain or as Tune's `config/<key>`) and its metrics; a trial's score is its
`sweep.metric` at its last reported epoch. A run folder that cannot be used is left out with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from boatray import approaches, metrics
from boatray.config import FREEZE_SPECS
from boatray.errors import BoatrayError
from boatray.results import (
    PREDICTIONS,
    RUN_JSON,
    Layout,
    RunRecord,
    classes_of,
    find_runs,
    read_run,
)
from boatray.run_state import read_state


@dataclass(eq=False)
class Run:
    """One run folder: its run record and its test predictions (sorted by path)."""

    folder: Path
    record: RunRecord
    test: pd.DataFrame
    valid: pd.DataFrame

    @property
    def approach(self) -> str:
        return str(self.record.get("approach", "unknown"))

    @property
    def seed(self) -> Any:
        return self.record.get("seed")

    @cached_property
    def scores(self) -> dict[str, float]:
        """metrics.scores of the test predictions."""
        return metrics.scores(self.test)

    @cached_property
    def classification(self) -> pd.DataFrame:
        """metrics.classification_table of the test predictions."""
        return metrics.classification_table(self.test)


@dataclass(eq=False)
class Configuration:
    """The runs of one configuration: several when it was repeated with different seeds."""

    label: str
    runs: list[Run]

    @property
    def approach(self) -> str:
        return self.runs[0].approach

    @property
    def record(self) -> RunRecord:
        """The run record of the representative run (the first seed)."""
        return self.runs[0].record

    @property
    def tests(self) -> list[pd.DataFrame]:
        return [run.test for run in self.runs]

    @property
    def selected(self) -> str | None:
        return self.record.get("selected")


@dataclass
class LoadedResults:
    """Everything one report is made of."""

    results_dir: Path
    configurations: list[Configuration]
    trials: pd.DataFrame | None = None
    experiment: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None  # run_state.json: running, interrupted or finished
    backbone: dict[str, Any] | None = None

    @property
    def layout(self) -> Layout:
        """The results folder's files and folders."""
        return Layout(self.results_dir)

    @property
    def config(self) -> dict[str, Any]:
        """The experiment's config, else the config recorded in the first run record."""
        if self.experiment is not None:
            return self.experiment
        return self.configurations[0].record.get("config") or {}

    def of(self, approach: str) -> list[Configuration]:
        return [c for c in self.configurations if c.approach == approach]

    @property
    def missing(self) -> list[str]:
        """The approaches the config runs that have no run here (their titles)."""
        return [approach.title for approach in approaches.enabled(self.config)
                if not self.of(approach.name)]


def load_study(results_dir: str | Path) -> LoadedResults:
    """Read every run folder under `results_dir`, the sweep's trials and the experiment's
    config (results.Layout)."""
    root = Path(results_dir)
    layout = Layout(root)
    if not root.is_dir():
        raise BoatrayError(f"results folder not found: {root}")
    notes: list[str] = []
    runs = [run for folder in find_runs(root) if (run := _read(folder, root, notes)) is not None]
    if not runs:
        raise BoatrayError(f"no runs under {root} (a run folder holds {PREDICTIONS} and "
                           f"{RUN_JSON})")
    return LoadedResults(root, _configurations(runs, notes), _trials(root, notes),
                 _json(layout.experiment, f"the config comes from {RUN_JSON}", notes), notes,
                 read_state(root), _json(layout.backbone, "no backbone section", notes))


def _read(folder: Path, root: Path, notes: list[str]) -> Run | None:
    where = folder.relative_to(root)
    try:
        predictions, record = read_run(folder)
    except (OSError, ValueError) as exc:  # JSON or parquet that cannot be parsed
        notes.append(f"{where}: left out, its files cannot be read ({type(exc).__name__})")
        return None
    except BoatrayError as exc:  # a run record that fails validation
        notes.append(f"{where}: left out, {exc}")
        return None
    if approaches.get(record.approach) is None:
        notes.append(f"{where}: left out, its approach {record.approach!r} is not one this "
                     f"boatray knows ({', '.join(approaches.names())})")
        return None
    missing = {"split", "path", "y_true", "y_pred"} - set(predictions.columns)
    if missing:
        notes.append(f"{where}: left out, {PREDICTIONS} lacks {', '.join(sorted(missing))}")
        return None
    classes = len(classes_of(predictions))
    labels = predictions[["y_true", "y_pred"]]
    if not all(pd.api.types.is_integer_dtype(t) for t in labels.dtypes) or (
            labels.lt(0).any().any() or labels.ge(classes).any().any()):
        notes.append(f"{where}: left out, its y_true/y_pred are not class indices 0..{classes - 1}")
        return None
    test = predictions[predictions["split"] == "test"]
    if test.empty:
        notes.append(f"{where}: left out, it has no test predictions")
        return None
    return Run(folder, record, test.sort_values("path", ignore_index=True),
               predictions[predictions["split"] == "valid"].reset_index(drop=True))


def _order(run: Run) -> tuple:
    record = run.record
    freeze = record.get("freeze")
    return (approaches.names().index(run.approach),
            record.get("selected") != "best",
            FREEZE_SPECS.index(freeze) if freeze in FREEZE_SPECS else len(FREEZE_SPECS),
            -float(record.get("lr") or 0.0), str(record.get("name")), str(run.seed))


def _label(record: RunRecord) -> str:
    return approaches.get(record.approach).label(record)


def _configurations(runs: list[Run], notes: list[str]) -> list[Configuration]:
    groups: dict[tuple, list[Run]] = {}
    for run in sorted(runs, key=_order):
        key = (run.approach, run.record.get("config_id") or run.record["name"])
        groups.setdefault(key, []).append(run)
    configurations = []
    for (_, key), members in groups.items():
        first = members[0]
        same = [r for r in members if r.test["path"].equals(first.test["path"])]
        for run in members:
            if run not in same:
                notes.append(f"{run.record['name']}: left out of {key}, its test images differ "
                             "from the other repeats'")
        configurations.append(Configuration(_label(first.record), same))
    labels = [c.label for c in configurations]
    for configuration in configurations:
        if labels.count(configuration.label) > 1:
            configuration.label += f" [{configuration.record['name']}]"
    return configurations


def _trials(root: Path, notes: list[str]) -> pd.DataFrame | None:
    path = Layout(root).trials
    if not path.is_file():
        return None
    try:
        trials = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name}: cannot be read ({type(exc).__name__}); no sweep section")
        return None
    if not {"trial_id", "epoch"} <= set(trials.columns):
        notes.append(f"{path.name}: lacks trial_id/epoch columns; no sweep section")
        return None
    return trials


def _json(path: Path, otherwise: str, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        notes.append(f"{path.name}: not valid JSON; {otherwise}")
        return None
