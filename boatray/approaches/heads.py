"""Classical heads on the extracted features, fitted on the driver (the SVM, the probe, k-NN).

`FeatureHead.fit`: every setting of the head's grid is fitted on train and scored on valid
(`select`); the best is fitted on train (the valid rows of its predictions) and, with `refit:
train+valid`, refitted on train and valid (the test rows). Labels are the most probable class
of the (calibrated) probabilities (`LABEL_RULE`), so labels and log loss describe one
prediction. The model is exported with the trunk that made its features and the head as plain
arrays (head.npz, `np.load(allow_pickle=False)`).
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from boatray import export, weightstore
from boatray.approaches.base import Approach, Context, Plan
from boatray.config import Experiment, HeadConfig
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.results import RunRecord, atomic_write, predictions_frame, write_run

HEAD = "head.npz"
LABEL_RULE = "the most probable class of the calibrated probabilities"
"""How every head labels an image, so that labels and log loss describe one prediction."""


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The selection metric on the valid split: `accuracy` or `macro_f1`."""
    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def full_proba(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba over every class index (0 for a class the model never saw)."""
    proba = np.zeros((len(x), n_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def logistic_proba(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """scikit-learn LogisticRegression.predict_proba from its coefficients."""
    z = x @ coef.T + intercept
    if z.shape[1] == 1:  # two classes: one logit
        z = np.hstack([np.zeros_like(z), z])
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class FeatureHead(Approach):
    """An approach that fits a scikit-learn-style classifier on the extracted features."""

    uses_features = True

    @abc.abstractmethod
    def grid(self, cfg: HeadConfig) -> list[dict[str, Any]]:
        """The settings chosen among on valid, in order (ties go to the earlier)."""

    @abc.abstractmethod
    def make(self, params: dict[str, Any], cfg: HeadConfig, seed: int) -> Any:
        """A fresh estimator (fit, predict, predict_proba, classes_) with these settings."""

    @abc.abstractmethod
    def arrays(self, estimator: Any) -> dict[str, np.ndarray]:
        """A fitted estimator as plain arrays (`classes`: the class indices it saw)."""

    @abc.abstractmethod
    def proba(self, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """`predict_proba` of the estimator `arrays` describes, on features `x`."""

    def settings(self, exp: Experiment) -> HeadConfig:
        """The head's config section."""
        return getattr(exp, self.section)

    def select(self, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
               y_valid: np.ndarray, cfg: HeadConfig, seed: int
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The best setting on valid and the whole grid's scores (`valid_score`)."""
        table = [{**params, "valid_score": score(cfg.metric, y_valid, self.make(
            params, cfg, seed).fit(x_train, y_train).predict(x_valid))}
            for params in self.grid(cfg)]
        best = max(table, key=lambda row: row["valid_score"])  # first of equal scores
        return {key: best[key] for key in self.grid(cfg)[0]}, table

    def fit_on(self, x: np.ndarray, frame: pd.DataFrame, classes: list[str], cfg: HeadConfig,
               seed: int) -> tuple[pd.DataFrame, dict[str, Any], Any]:
        """Select, fit and predict: (predictions table, the run record's details, the fitted
        model). The details keep how often the model's own `predict` agrees with the label
        rule (`own_label_agreement`)."""
        split = frame["split"].to_numpy()
        y = frame["label_idx"].to_numpy()
        train, valid, test = (split == "train"), (split == "valid"), (split == "test")
        if not train.any():
            raise BoatrayError(f"the features have no train split: nothing to fit the "
                               f"{self.title} on")
        grid = self.grid(cfg)
        if len(grid) > 1 and not valid.any():
            raise BoatrayError(f"the {self.title} grid ({self.section}) needs a valid split, and "
                               "the features have none; give a single value or prepare the data "
                               "with a valid fraction")
        params, table = (self.select(x[train], y[train], x[valid], y[valid], cfg, seed)
                         if valid.any() else (grid[0], []))
        model = self.make(params, cfg, seed).fit(x[train], y[train])
        parts = []
        if valid.any():
            parts.append(predictions_frame(frame["path"][valid], "valid", y[valid],
                                           full_proba(model, x[valid], len(classes)), classes))
        if test.any():
            if cfg.refit == "train+valid" and valid.any():
                model = self.make(params, cfg, seed).fit(x[train | valid], y[train | valid])
            parts.append(predictions_frame(frame["path"][test], "test", y[test],
                                           full_proba(model, x[test], len(classes)), classes))
        rows = x[test] if test.any() else x[valid]  # the last model's own rows
        details = {"selected": params, "grid": table, "metric": cfg.metric, "refit": cfg.refit,
                   "valid_score": max((row["valid_score"] for row in table), default=None),
                   "label_rule": LABEL_RULE, "own_label_agreement": float(np.mean(
                       model.classes_[model.predict_proba(rows).argmax(axis=1)]
                       == model.predict(rows)))}
        return pd.concat(parts, ignore_index=True), details, model

    def fit_file(self, features_path: str | Path, run_dir: str | Path, cfg: HeadConfig,
                 seed: int = 0, config: dict | None = None,
                 model_dir: str | Path | None = None) -> Path:
        """Fit on a features file; write the run folder `run_dir` (and with `model_dir`, the
        exported model there); return the run folder."""
        started = time.monotonic()
        x, frame = featurefile.read_features(features_path)
        info = featurefile.feature_info(features_path)
        x = x.reshape(len(x), -1).astype(np.float32)
        stats = info.get("extraction", {})
        extraction = float(stats.get("seconds", 0.0))
        fit_started = time.monotonic()
        predictions, details, model = self.fit_on(x, frame, info["classes"], cfg, seed)
        fit_seconds = time.monotonic() - fit_started
        loaded = fit_started - started
        print(f"[{self.name}] selected {details['selected']} (valid {cfg.metric} "
              f"{details['valid_score']}), fitted in {fit_seconds:.1f} s", flush=True)
        run_dir = write_run(run_dir, predictions, RunRecord.from_json({
            "approach": self.name, "name": Path(run_dir).name,
            "config": config or {self.section: vars(cfg)}, **details,
            "features": str(features_path), "backbone": info.get("model"),
            "fit_seconds": fit_seconds, "extraction_seconds": extraction,
            "wall_seconds": extraction + loaded + fit_seconds,
            "device_seconds": extraction + fit_seconds,
            "images_per_second": stats.get("images_per_second"),
            "skipped_images": stats.get("failed", [])}))
        if model_dir is not None and export.trunk_path(features_path).is_file():
            self.export(model, info, features_path, Path(model_dir))
        elif model_dir is not None:
            print(f"[{self.name}] not exported: {export.trunk_path(features_path)} is missing "
                  "(features from an older boatray: extract them again)", flush=True)
        return run_dir

    def fit(self, context: Context) -> None:
        exp = context.exp
        run_dir = exp.layout.run(self.name)
        self.fit_file(context.features, run_dir, self.settings(exp), exp.seed, exp.to_dict(),
                      exp.layout.models / run_dir.name)

    def export(self, estimator: Any, info: dict[str, Any], features_path: str | Path,
               out_dir: Path) -> Path:
        """The fitted head with the trunk that made its features, as a model folder."""
        weightstore.copy(export.trunk_path(features_path), out_dir / export.WEIGHTS)
        arrays = self.arrays(estimator)
        atomic_write(out_dir / HEAD, lambda tmp: _save_arrays(tmp, arrays))
        spec = info["model"]
        return export.write_spec(out_dir, {
            "kind": "features+head", "approach": self.name, "classes": info["classes"],
            "image_size": info["image_size"],
            "model": {"name": spec["name"], "pooling": spec["pooling"]}, "stage": info["stage"]})

    def load(self, folder: Path, spec: dict[str, Any]) -> export.Model:
        if not (folder / HEAD).is_file():
            raise BoatrayError(f"{folder} lacks {HEAD}, the fitted {self.title}: the model "
                               "folder is incomplete (copy it whole, or fit it again with "
                               "python -m boatray.svm)")
        try:
            with np.load(folder / HEAD, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError) as exc:
            raise BoatrayError(f"{folder / HEAD} cannot be read ({type(exc).__name__}): export "
                               "the model again") from None
        classes = len(spec["classes"])

        def head(x: np.ndarray) -> np.ndarray:
            proba = np.zeros((len(x), classes))
            proba[:, arrays["classes"]] = self.proba(arrays, x)
            return proba

        return export.Model(spec, export.load_trunk(folder, spec), head)

    def plan(self, exp: Experiment, manifest: pd.DataFrame) -> Plan:
        cfg = self.settings(exp)
        keys = ", ".join(self.grid(cfg)[0])
        return Plan(f"stage {self.stage}: {len(self.grid(cfg))} setting(s) of {keys} chosen on "
                    f"valid {cfg.metric}, refitted on {cfg.refit}, on the driver")


def _save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add .npz to a name
        np.savez(file, **arrays)
