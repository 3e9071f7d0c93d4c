"""The study's approaches, in the order the sweep runs them and the report shows them.

Each is one module implementing `base.Approach`; this list is the only place that names them.
Everything above (the sweep's stages, the plan, predict, the report, the closing summary)
iterates `APPROACHES`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from boatray import export, storage, weightstore
from boatray.approaches.base import Approach, Context, Plan
from boatray.approaches.baseline import Baseline
from boatray.approaches.finetune import Finetune
from boatray.approaches.knn import Knn
from boatray.approaches.probe import Probe
from boatray.approaches.svm import Svm
from boatray.errors import BoatrayError

APPROACHES: tuple[Approach, ...] = (Finetune(), Svm(), Probe(), Knn(), Baseline())

__all__ = ["APPROACHES", "Approach", "Context", "Plan", "enabled", "get", "load_model", "names"]


def names() -> tuple[str, ...]:
    """Every approach's name, in order."""
    return tuple(approach.name for approach in APPROACHES)


def get(name: str) -> Approach | None:
    """The approach called `name` (run.json's `approach`), or None."""
    return next((approach for approach in APPROACHES if approach.name == name), None)


def enabled(config: dict[str, Any]) -> list[Approach]:
    """The approaches an experiment's config (`Experiment.to_dict()`) runs, in order."""
    return [approach for approach in APPROACHES if approach.enabled(config)]


def load_model(folder: str | Path) -> export.Model:
    """An exported model folder (or its storage URI) of any approach, rebuilt from its files
    and the weight store of its results folder alone."""
    if storage.is_remote(folder):
        with tempfile.TemporaryDirectory(prefix="boatray-model-") as temporary:
            local = storage.local_copy(folder, Path(temporary) / "model")
            weightstore.downloaded(local, str(folder))
            return load_model(local)
    folder = Path(folder)
    spec = export.read_spec(folder)
    approach = get(spec.get("approach"))
    if approach is None:
        raise BoatrayError(f"{folder / export.SPEC} names the approach "
                           f"{spec.get('approach')!r}, which this boatray does not know "
                           f"(known: {', '.join(names())})")
    return approach.load(folder, spec)
