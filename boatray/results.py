"""The results folder: its layout, and the contract between approaches and the report.

`Layout` names every file and folder of results/<experiment>/. Every approach writes, in its
run folder under runs/, `predictions.parquet` (one row per evaluated image: `path`, `split`,
`y_true`, `y_pred`, and a `proba::<Class>` column per class in class-index order) and
`run.json` (a `RunRecord`). All writes are atomic: a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boatray.errors import BoatrayError

PREDICTIONS = "predictions.parquet"
RUN_JSON = "run.json"
FEATURES = "features.parquet"
PROBA_PREFIX = "proba::"


@dataclass(frozen=True)
class Layout:
    """Every file and folder of one experiment's results folder, `root`.

    Ray's folders (tune/, train/) and the caches (cache/) are named relative to the storage
    location too (`TUNE`, `TRAIN`, `CACHE`): with a remote storage_path they live there only.
    """

    root: Path
    TUNE = "tune"
    TRAIN = "train"
    CACHE = "cache"

    @property
    def experiment(self) -> Path:
        """The experiment's config as the run used it (a resume must match it)."""
        return self.root / "experiment.json"

    @property
    def backbone(self) -> Path:
        """Which backbone and weights the run used, and where the weights came from."""
        return self.root / "backbone.json"

    @property
    def trials(self) -> Path:
        """The sweep's trials, one row per trial per epoch."""
        return self.root / "trials.parquet"

    @property
    def data(self) -> Path:
        """The manifest (and generated images)."""
        return self.root / "data"

    @property
    def runs(self) -> Path:
        """Run folders, one per evaluated model."""
        return self.root / "runs"

    def run(self, name: str) -> Path:
        """The run folder `name`."""
        return self.runs / name

    @property
    def features(self) -> Path:
        """The extracted features (the stats file beside it: `featurefile.stats_path`)."""
        return self.root / "features" / FEATURES

    @property
    def models(self) -> Path:
        """Exported models, one folder per run (boatray.export)."""
        return self.root / "models"

    @property
    def report(self) -> Path:
        """report.md, report.html and their plots."""
        return self.root / "report"

    @property
    def logs(self) -> Path:
        """Ray's worker output and the tracebacks of failed stages."""
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        """Held by the one process running the experiment."""
        return self.root / "run.lock"

    @property
    def state(self) -> Path:
        """Whether the last run is running, finished or was interrupted."""
        return self.root / "run_state.json"


def run_name(config_id: str, repeat: int | None = None) -> str:
    """The one naming scheme of run folders: the configuration's id, and `-r<repeat>` for an
    approach that repeats with other seeds (`svm`, `finetune-last1-lr1e-03-none-r0`)."""
    return config_id if repeat is None else f"{config_id}-r{int(repeat)}"


def finetune_config_id(freeze: str, lr: float, scheduler: str) -> str:
    """What groups the repeats of a fine-tuning configuration: finetune-last1-lr1e-03-none."""
    return f"finetune-{freeze}-lr{lr:.0e}-{scheduler}"


@dataclass
class RunRecord:
    """run.json: what a run was, how long it took, and what its approach adds (`details`)."""

    approach: str
    name: str
    wall_seconds: float
    config_id: str | None = None
    classes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    device_seconds: float | None = None
    images_per_second: float | None = None
    host: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    """Approach-specific: `history` (per-epoch metrics), `selected`, `grid`, `freeze`, ..."""

    @classmethod
    def from_json(cls, raw: Any, where: str = "run.json") -> RunRecord:
        """A record from run.json's object: known keys become fields, the rest `details`;
        a missing or mistyped field is a one-line BoatrayError."""
        if not isinstance(raw, dict):
            raise BoatrayError(f"{where}: not a JSON object")
        names = _RECORD_FIELDS
        missing = {"approach", "name", "wall_seconds"} - set(raw)
        if missing:
            raise BoatrayError(f"{where}: lacks {', '.join(sorted(missing))}")
        if not isinstance(raw["approach"], str) or not raw["approach"]:
            raise BoatrayError(f"{where}: approach is not a name")
        if not isinstance(raw["wall_seconds"], (int, float)):
            raise BoatrayError(f"{where}: wall_seconds is not a number")
        known = {k: v for k, v in raw.items() if k in names}
        return cls(**known, details={k: v for k, v in raw.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        """run.json's object: the fields, then the details, at one level."""
        raw = asdict(self)
        return {**{k: v for k, v in raw.items() if k != "details"}, **raw["details"]}

    def get(self, key: str, default: Any = None) -> Any:
        """A field or a detail by its run.json key (no copy of the record)."""
        if key in self.details:
            return self.details[key]
        return getattr(self, key) if key in _RECORD_FIELDS else default

    def __contains__(self, key: str) -> bool:
        return key in self.details or key in _RECORD_FIELDS

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return self.get(key)


_RECORD_FIELDS = frozenset(f.name for f in fields(RunRecord)) - {"details"}


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(temporary_path)`, then rename the file to `path`: readers never see half a
    file. `write` creates the temporary file itself, so it gets the mode the umask gives, as
    any file the process opens (mkstemp would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to `path` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a DataFrame to parquet atomically."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def predictions_frame(paths: Iterable[str], splits: Iterable[str] | str, y_true: Iterable[int],
                      proba: np.ndarray, classes: list[str],
                      y_pred: Iterable[int] | None = None) -> pd.DataFrame:
    """Build a predictions table; `y_pred` defaults to the arg-max of `proba`."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba has shape {proba.shape}, expected (n, {len(classes)})")
    paths = list(paths)
    frame = pd.DataFrame({
        "path": paths,
        "split": [splits] * len(paths) if isinstance(splits, str) else list(splits),
        "y_true": np.asarray(list(y_true), dtype=np.int64),
        "y_pred": (np.asarray(list(y_pred), dtype=np.int64) if y_pred is not None
                   else proba.argmax(axis=1).astype(np.int64)),
    })
    probs = pd.DataFrame(proba, columns=[PROBA_PREFIX + c for c in classes])
    return pd.concat([frame, probs], axis=1)


def classes_of(predictions: pd.DataFrame) -> list[str]:
    """Class names in index order, read from the probability columns."""
    return [c[len(PROBA_PREFIX):] for c in predictions.columns if c.startswith(PROBA_PREFIX)]


def proba_of(predictions: pd.DataFrame) -> np.ndarray:
    """The (n, n_classes) probability matrix of a predictions table."""
    return predictions[[c for c in predictions.columns if c.startswith(PROBA_PREFIX)]].to_numpy()


def host_info() -> dict[str, Any]:
    """Where a run happened: host name, platform and library versions."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        import torch

        from boatray.precision import cpu_bf16

        info["torch"] = torch.__version__
        info["cpu_bf16"] = cpu_bf16() or "none"  # amp: auto computes in bf16 on such CPUs
        info["gpus"] = torch.cuda.device_count()
        if info["gpus"]:
            info["gpu_name"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
        if ray.is_initialized():
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            info["nodes"] = len(nodes)
            info["cluster_gpus"] = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    except ImportError:
        pass
    return info


def write_run(run_dir: str | Path, predictions: pd.DataFrame, record: RunRecord) -> Path:
    """Write a run folder's predictions.parquet, then its run.json (with the classes and the
    host added)."""
    run_dir = Path(run_dir)
    atomic_write_parquet(run_dir / PREDICTIONS, predictions)
    record = RunRecord.from_json({**record.to_json(), "classes": classes_of(predictions),
                                  "host": record.host or host_info()}, str(run_dir / RUN_JSON))
    atomic_write_text(run_dir / RUN_JSON,
                      json.dumps(record.to_json(), indent=2, default=_jsonable))
    return run_dir


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, RunRecord]:
    """Read a run folder back: (predictions, its validated run record)."""
    run_dir = Path(run_dir)
    try:
        raw = json.loads((run_dir / RUN_JSON).read_text())
        predictions = pd.read_parquet(run_dir / PREDICTIONS)
    except FileNotFoundError as exc:
        raise BoatrayError(
            f"{run_dir} is not a complete run folder: {exc.filename} is missing") from None
    return predictions, RunRecord.from_json(raw, str(run_dir / RUN_JSON))


def is_run(folder: str | Path) -> bool:
    """Whether a folder is a complete run folder (both files)."""
    return (Path(folder) / RUN_JSON).is_file() and (Path(folder) / PREDICTIONS).is_file()


def find_runs(results_dir: str | Path) -> list[Path]:
    """Every complete run folder below `results_dir`, sorted."""
    return sorted(p.parent for p in Path(results_dir).rglob(RUN_JSON) if is_run(p.parent))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
