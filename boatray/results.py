"""The contract between approaches and the report: predictions.parquet and run.json.

Every approach (fine-tune, SVM, linear probe, BetterCNN baseline) writes, in its own run
folder under results/<experiment>/:

- `predictions.parquet`: one row per evaluated image with `path`, `split` (valid/test),
  `y_true`, `y_pred` (class indices) and one probability column `proba::<ClassName>` per
  class, in class-index order;
- `run.json`: `approach`, `name`, `classes`, `config`, `wall_seconds`, `device_seconds`,
  `images_per_second`, `host` and anything else worth keeping (e.g. `history`, a list of
  per-epoch metric dicts for learning curves).

All writes are atomic (write to a temporary file, then rename), so a killed run never
leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boatray.errors import BoatrayError

PREDICTIONS = "predictions.parquet"
RUN_JSON = "run.json"
PROBA_PREFIX = "proba::"
APPROACHES = ("finetune", "svm", "probe", "baseline")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: results files get the modes that open() would give them


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(temporary_path)`, then rename the file to `path`: readers never see half a
    file. The file gets the mode the umask gives (mkstemp alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
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

        info["torch"] = torch.__version__
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


def write_run(run_dir: str | Path, predictions: pd.DataFrame, run: dict[str, Any]) -> Path:
    """Write a run folder's predictions.parquet and run.json (predictions first)."""
    missing = {"approach", "name", "wall_seconds"} - set(run)
    if missing:
        raise ValueError(f"run.json needs {sorted(missing)}")
    run_dir = Path(run_dir)
    atomic_write_parquet(run_dir / PREDICTIONS, predictions)
    record = {"classes": classes_of(predictions), "host": host_info(), **run}
    atomic_write_text(run_dir / RUN_JSON, json.dumps(record, indent=2, default=_jsonable))
    return run_dir


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a run folder back: (predictions, run record)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / RUN_JSON).read_text())
        predictions = pd.read_parquet(run_dir / PREDICTIONS)
    except FileNotFoundError as exc:
        raise BoatrayError(
            f"{run_dir} is not a complete run folder: {exc.filename} is missing") from None
    return predictions, run


def find_runs(results_dir: str | Path) -> list[Path]:
    """Every complete run folder (one with both files) below `results_dir`, sorted."""
    root = Path(results_dir)
    return sorted(p.parent for p in root.rglob(RUN_JSON) if (p.parent / PREDICTIONS).is_file())


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
