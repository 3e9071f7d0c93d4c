"""The classical heads on the driver: an RBF SVM and a logistic-regression linear probe.

Both are scikit-learn estimators (`fit`, `predict`, `predict_proba`) on standardised features.
The SVM's hyper-parameters C and gamma are chosen on the valid split from the config's grid,
then it is refitted on train or train+valid (`svm.refit`).

Fast path: libsvm evaluates the RBF kernel element by element, which for 4,000 x 2,048
features costs tens of seconds per fit. Here the squared distances come from ONE float32
matrix product, each gamma is an element-wise `exp` of them and every C of the grid reuses
that Gram matrix through `SVC(kernel="precomputed")`: the same decision function as
`SVC(kernel="rbf")` (tests check the predictions are equal), in seconds.

Probabilities are calibrated on held-out decision values (see `RbfSvm`), so the report's
log loss is a real one. The valid
rows of predictions.parquet come from the selected model fitted on train only (held-out
predictions); the test rows from the refitted model.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from boatray import config as config_module
from boatray import export, features
from boatray.config import Experiment, SvmConfig
from boatray.errors import BoatrayError, cli
from boatray.results import predictions_frame, write_run

HEADS = ("svm", "probe")
LABEL_RULE = "the most probable class of the calibrated probabilities"
"""How both heads label an image, so that labels and log loss describe one prediction."""


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All squared Euclidean distances between rows of `a` and `b`: one float32 matmul."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    out = a @ b.T
    out *= -2.0
    out += np.einsum("ij,ij->i", a, a)[:, None]
    out += np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(out, 0.0, out=out)


def check_gamma(gamma: float | str) -> None:
    """A gamma setting must be a positive number, `scale` or `auto` (scikit-learn's)."""
    if gamma in ("scale", "auto"):
        return
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0):
        raise BoatrayError(f"svm.gamma entries must be positive numbers, 'scale' or 'auto'; "
                           f"got {gamma!r}")


def gamma_value(gamma: float | str, x: np.ndarray) -> float:
    """scikit-learn's gamma: `scale` = 1 / (n_features * x.var()), `auto` = 1 / n_features."""
    check_gamma(gamma)
    if gamma == "scale":
        variance = float(np.var(x, dtype=np.float64))
        return 1.0 / (x.shape[1] * variance) if variance > 0 else 1.0
    if gamma == "auto":
        return 1.0 / x.shape[1]
    return float(gamma)


def rbf_gram(distances: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma * d) of precomputed squared distances, as float64 for libsvm."""
    return np.exp(-gamma * distances, dtype=np.float64)


class RbfSvm(ClassifierMixin, BaseEstimator):
    """StandardScaler + SVC(RBF) fitted on a precomputed float32 Gram matrix.

    `predict` is the SVM's own decision, equal to that of
    `make_pipeline(StandardScaler(), SVC(kernel="rbf", ...))`, much faster. With
    `probability`, `predict_proba` comes from a multinomial logistic regression on the SVM's
    one-vs-one decision values, fitted on out-of-fold values (seeded stratified 5-fold split):
    held-out calibration in the spirit of libsvm's pairwise Platt scaling (as good in log loss
    in our checks), which copes with classes of a single image. libsvm's own
    `probability=True` is deprecated in scikit-learn 1.9, and `CalibratedClassifierCV`
    refuses classes smaller than its fold count. As with libsvm, the most probable class can
    differ from `predict` on hard images.
    """

    def __init__(self, C: float = 1.0, gamma: float | str = "scale",
                 class_weight: str | None = None, probability: bool = True,
                 random_state: int = 0) -> None:
        self.C = C
        self.gamma = gamma
        self.class_weight = class_weight
        self.probability = probability
        self.random_state = random_state

    def fit(self, x: np.ndarray, y: np.ndarray) -> RbfSvm:
        """Standardise, build the train Gram matrix, fit libsvm on it (and the calibrator)."""
        y = np.asarray(y)
        self.scaler_ = StandardScaler().fit(x)
        self.train_ = self.scaler_.transform(x).astype(np.float32)
        self.gamma_ = gamma_value(self.gamma, self.train_)
        gram = rbf_gram(squared_distances(self.train_, self.train_), self.gamma_)
        self.svc_ = fit_svc(gram, y, self.C, self.class_weight)
        self.classes_ = self.svc_.classes_
        if self.probability:
            margins = out_of_fold_margins(gram, y, self.classes_, self.C, self.class_weight,
                                          self.random_state)
            with threadpool_limits(1):  # a tiny problem: BLAS threads only add overhead
                self.calibrator_ = LogisticRegression(max_iter=2000).fit(margins, y)
        return self

    def gram(self, x: np.ndarray) -> np.ndarray:
        """The kernel between new rows and the training rows."""
        scaled = self.scaler_.transform(x).astype(np.float32)
        return rbf_gram(squared_distances(scaled, self.train_), self.gamma_)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """One-vs-one decision values, (n, n_classes * (n_classes - 1) / 2)."""
        return pairwise_margins(self.svc_, self.gram(x), self.classes_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.svc_.predict(self.gram(x))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.calibrator_.predict_proba(self.decision_function(x))


def fit_svc(gram: np.ndarray, y: np.ndarray, C: float, class_weight: str | None) -> SVC:
    """libsvm on a precomputed kernel."""
    return SVC(kernel="precomputed", C=C, class_weight=class_weight,
               decision_function_shape="ovo").fit(gram, y)


def pairwise_margins(svc: SVC, gram: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The SVC's one-vs-one decision values, one column per pair of `classes` (in
    `itertools.combinations` order); a pair with a class the SVC never saw is 0 (undecided)."""
    pairs = {pair: i for i, pair in enumerate(itertools.combinations(range(len(classes)), 2))}
    values = svc.decision_function(gram).reshape(len(gram), -1)
    out = np.zeros((len(gram), len(pairs)))
    seen = np.searchsorted(classes, svc.classes_)
    for column, pair in enumerate(itertools.combinations(seen, 2)):
        out[:, pairs[pair]] = values[:, column]
    return out


def out_of_fold_margins(gram: np.ndarray, y: np.ndarray, classes: np.ndarray, C: float,
                        class_weight: str | None, seed: int, folds: int = 5) -> np.ndarray:
    """Pairwise margins of every training row from an SVC that did not see it."""
    margins = np.empty((len(y), len(classes) * (len(classes) - 1) // 2))
    splitter = StratifiedKFold(n_splits=min(folds, len(y)), shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than the fold count is expected
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splits = list(splitter.split(np.zeros(len(y)), y))
    for train, held_out in splits:
        svc = fit_svc(gram[np.ix_(train, train)], y[train], C, class_weight)
        margins[held_out] = pairwise_margins(svc, gram[np.ix_(held_out, train)], classes)
    return margins


class OneThreadLogisticRegression(LogisticRegression):
    """scikit-learn's LogisticRegression (lbfgs), fitted on one BLAS/OpenMP thread.

    Each lbfgs step is a few small matrix products (n x d by d x classes); with torch's and
    NumPy's thread pools both loaded, more threads only contend: one fit of 3,869 x 512
    features took 12.3 s with 2 threads and 0.8 s with 1 on the loaded 2-core machine, with
    the same iterations and result.
    """

    def fit(self, x, y, sample_weight=None):
        with threadpool_limits(1):
            return super().fit(x, y, sample_weight)


def linear_probe(C: float, class_weight: str | None) -> object:
    """StandardScaler + multinomial logistic regression: the linear probe."""
    return make_pipeline(StandardScaler(),
                         OneThreadLogisticRegression(C=C, class_weight=class_weight,
                                                     max_iter=2000))


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
    `out_dir/svm` and `out_dir/probe` (predictions.parquet + run.json); return them. With
    `models_dir`, each fitted head is also exported there with its trunk (export.py)."""
    for gamma in cfg.gamma:
        check_gamma(gamma)
    started = time.monotonic()
    x, frame = features.read_features(features_path)
    meta = features.feature_info(features_path)
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
        written.append(write_run(Path(out_dir) / head, predictions, {
            "approach": head, "name": head, "config": config or {"svm": vars(cfg)},
            **record, "features": str(features_path), "backbone": meta.get("model"),
            "fit_seconds": fit_seconds, "extraction_seconds": extraction,
            "wall_seconds": extraction + loaded + fit_seconds,
            "device_seconds": extraction + fit_seconds,
            "images_per_second": stats.get("images_per_second"),
            "skipped_images": stats.get("failed", [])}))
        if models_dir is not None and export.trunk_path(features_path).is_file():
            export.export_head(head, model, meta, features_path, Path(models_dir) / head)
        elif models_dir is not None:
            print(f"[svm] {head}: not exported, {export.trunk_path(features_path)} is missing "
                  "(features from an older boatray: extract them again)", flush=True)
    return written


def run_for(exp: Experiment, features_path: str | Path, runs_dir: str | Path) -> list[Path]:
    """The sweep's features stage, second half: `run` with the experiment's settings."""
    return run(features_path, runs_dir, exp.svm, exp.seed, exp.to_dict(),
               exp.results_dir / export.MODELS_DIR)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.svm`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.svm",
        description="Fit the RBF SVM and the linear probe on extracted features; write "
                    "OUT/svm and OUT/probe run folders (predictions.parquet + run.json).")
    parser.add_argument("--features", required=True, help="features.parquet from boatray.features")
    parser.add_argument("--out", required=True, help="folder for the svm/ and probe/ run folders")
    config_module.add_arguments(parser)
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """`python -m boatray.svm --features PATH --out DIR [--config FILE] [--set k=v ...]`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    for path in run_for(exp, args.features, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
