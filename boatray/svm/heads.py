"""The classical heads on extracted features, fitted on the driver: the RBF SVM and the
linear probe. C (and gamma) are chosen on the valid split from the config's grid, then the
model is refitted on train or train+valid (`svm.refit`). The valid rows of the predictions come
from the selected model fitted on train only; the test rows from the refitted model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from boatray import export
from boatray.config import Experiment, SvmConfig
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.results import RunRecord, predictions_frame, write_run
from boatray.svm.estimators import (
    RbfSvm,
    fit_svc,
    gamma_value,
    linear_probe,
    rbf_gram,
    squared_distances,
)

HEADS = ("svm", "probe")
LABEL_RULE = "the most probable class of the calibrated probabilities"
"""How both heads label an image, so that labels and log loss describe one prediction."""


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The selection metric on the valid split: `accuracy` or `macro_f1`."""
    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def select_svm(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
               y_valid: np.ndarray, cfg: SvmConfig) -> tuple[dict, list[dict]]:
    """Best (C, gamma) on the valid split, and the whole grid's scores.

    One distance matrix for the grid, one `exp` per gamma, one libsvm fit per (gamma, C).
    Ties go to the earlier grid entry.
    """
    scaler = StandardScaler().fit(x_train)
    train = scaler.transform(x_train).astype(np.float32)
    valid = scaler.transform(x_valid).astype(np.float32)
    d_train, d_valid = squared_distances(train, train), squared_distances(valid, train)
    table = []
    for gamma in cfg.gamma:
        value = gamma_value(gamma, train)
        k_train, k_valid = rbf_gram(d_train, value), rbf_gram(d_valid, value)
        for C in cfg.C:
            svc = fit_svc(k_train, y_train, C, cfg.class_weight)
            table.append({"C": C, "gamma": gamma, "gamma_value": value,
                          "valid_score": score(cfg.metric, y_valid, svc.predict(k_valid))})
    best = max(table, key=lambda row: row["valid_score"])  # first of equal scores
    return {"C": best["C"], "gamma": best["gamma"]}, table


def select_probe(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
                 y_valid: np.ndarray, cfg: SvmConfig) -> tuple[dict, list[dict]]:
    """Best C of the linear probe on the valid split, and the grid's scores."""
    table = [{"C": C, "valid_score": score(cfg.metric, y_valid, linear_probe(
        C, cfg.class_weight).fit(x_train, y_train).predict(x_valid))} for C in cfg.probe_C]
    best = max(table, key=lambda row: row["valid_score"])
    return {"C": best["C"]}, table


def make_head(head: str, params: dict, cfg: SvmConfig, seed: int) -> object:
    """A fresh estimator of `head` with the selected parameters."""
    if head == "svm":
        return RbfSvm(params["C"], params["gamma"], cfg.class_weight, True, seed)
    return linear_probe(params["C"], cfg.class_weight)


def full_proba(model: object, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba over every class index (0 for a class the model never saw)."""
    proba = np.zeros((len(x), n_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def fit_head(head: str, x: np.ndarray, frame: pd.DataFrame, classes: list[str], cfg: SvmConfig,
             seed: int) -> tuple[pd.DataFrame, dict]:
    """Select, fit and predict one head: (predictions table, run record without timings, the
    fitted model). Labels are the calibrated probabilities' argmax (`LABEL_RULE`); the run
    record keeps how often the head's own `predict` agrees (`own_label_agreement`)."""
    split = frame["split"].to_numpy()
    y = frame["label_idx"].to_numpy()
    train, valid, test = (split == "train"), (split == "valid"), (split == "test")
    grid = len(cfg.C) * len(cfg.gamma) if head == "svm" else len(cfg.probe_C)
    if not train.any():
        raise BoatrayError(f"the features have no train split: nothing to fit the {head} on")
    if grid > 1 and not valid.any():
        raise BoatrayError(f"the {head} grid needs a valid split, and the features have none; "
                           "give a single value or prepare the data with a valid fraction")
    if valid.any():
        select = select_svm if head == "svm" else select_probe
        params, table = select(x[train], y[train], x[valid], y[valid], cfg)
    else:
        params = {"C": cfg.C[0], "gamma": cfg.gamma[0]} if head == "svm" else {"C": cfg.probe_C[0]}
        table = []
    model = make_head(head, params, cfg, seed).fit(x[train], y[train])
    parts = []
    if valid.any():
        parts.append(predictions_frame(frame["path"][valid], "valid", y[valid],
                                       full_proba(model, x[valid], len(classes)), classes))
    if test.any():
        if cfg.refit == "train+valid" and valid.any():
            model = make_head(head, params, cfg, seed).fit(x[train | valid], y[train | valid])
        parts.append(predictions_frame(frame["path"][test], "test", y[test],
                                       full_proba(model, x[test], len(classes)), classes))
    predictions = pd.concat(parts, ignore_index=True)
    rows = x[test] if test.any() else x[valid]  # the last model's own rows
    record = {"selected": params, "grid": table, "metric": cfg.metric, "refit": cfg.refit,
              "valid_score": max((row["valid_score"] for row in table), default=None),
              "label_rule": LABEL_RULE, "own_label_agreement": float(np.mean(
                  model.classes_[model.predict_proba(rows).argmax(axis=1)]
                  == model.predict(rows)))}
    return predictions, record, model


def run(features_path: str | Path, out_dir: str | Path, cfg: SvmConfig, seed: int = 0,
        config: dict | None = None, models_dir: str | Path | None = None) -> list[Path]:
    """Fit the SVM (and the probe if `cfg.probe`) on a features file; write their run folders
    `out_dir/svm` and `out_dir/probe` (results.write_run); return them. With
    `models_dir`, each fitted head is also exported there with its trunk (export.py)."""
    started = time.monotonic()
    x, frame = featurefile.read_features(features_path)
    meta = featurefile.feature_info(features_path)
    x = x.reshape(len(x), -1).astype(np.float32)
    stats = meta.get("extraction", {})
    extraction = float(stats.get("seconds", 0.0))
    loaded = time.monotonic() - started
    written = []
    for head in HEADS if cfg.probe else HEADS[:1]:
        head_started = time.monotonic()
        predictions, record, model = fit_head(head, x, frame, meta["classes"], cfg, seed)
        fit_seconds = time.monotonic() - head_started
        print(f"[svm] {head}: selected {record['selected']} (valid {cfg.metric} "
              f"{record['valid_score']}), fitted in {fit_seconds:.1f} s", flush=True)
        written.append(write_run(Path(out_dir) / head, predictions, RunRecord.from_json({
            "approach": head, "name": head, "config": config or {"svm": vars(cfg)},
            **record, "features": str(features_path), "backbone": meta.get("model"),
            "fit_seconds": fit_seconds, "extraction_seconds": extraction,
            "wall_seconds": extraction + loaded + fit_seconds,
            "device_seconds": extraction + fit_seconds,
            "images_per_second": stats.get("images_per_second"),
            "skipped_images": stats.get("failed", [])})))
        if models_dir is not None and export.trunk_path(features_path).is_file():
            export.export_head(head, model, meta, features_path, Path(models_dir) / head)
        elif models_dir is not None:
            print(f"[svm] {head}: not exported, {export.trunk_path(features_path)} is missing "
                  "(features from an older boatray: extract them again)", flush=True)
    return written


def fit_experiment(exp: Experiment, features_path: str | Path, runs_dir: str | Path
                   ) -> list[Path]:
    """`run` with an experiment's settings; the models are exported under its models/."""
    return run(features_path, runs_dir, exp.svm, exp.seed, exp.to_dict(), exp.layout.models)
