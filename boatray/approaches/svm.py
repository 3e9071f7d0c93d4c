"""The RBF SVM on the extracted features: C and gamma chosen on valid, calibrated probabilities.

libsvm evaluates the RBF kernel element by element, tens of seconds per fit on 4,000 x 2,048
features. `RbfSvm` computes the squared distances in ONE float32 matrix product, each gamma is
an element-wise `exp` of them, and every C reuses that Gram matrix through
`SVC(kernel="precomputed")`: the decision function of `SVC(kernel="rbf")`, in seconds. The
selection on valid reuses one distance matrix for the whole grid.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from boatray.approaches.heads import FeatureHead, logistic_proba, score
from boatray.config import SvmConfig


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All squared Euclidean distances between rows of `a` and `b`: one float32 matmul."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    out = a @ b.T
    out *= -2.0
    out += np.einsum("ij,ij->i", a, a)[:, None]
    out += np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(out, 0.0, out=out)


def gamma_value(gamma: float | str, x: np.ndarray) -> float:
    """scikit-learn's gamma: `scale` = 1 / (n_features * x.var()), `auto` = 1 / n_features."""
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


def svm_margins(scaled: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """The one-vs-one decision values of an exported SVM (`Svm.arrays`), placed as
    `RbfSvm.decision_function` places them (0 for a pair with a class the SVM never saw)."""
    kernel = rbf_gram(squared_distances(scaled, head["support"]), float(head["gamma"]))
    starts = np.concatenate([[0], np.cumsum(head["n_support"])])
    pairs = {p: i for i, p in enumerate(itertools.combinations(
        range(len(head["pair_classes"])), 2))}
    seen = np.searchsorted(head["pair_classes"], head["svc_classes"])
    out = np.zeros((len(scaled), len(pairs)))
    for column, (i, j) in enumerate(itertools.combinations(range(len(seen)), 2)):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        out[:, pairs[(seen[i], seen[j])]] = (
            kernel[:, si] @ head["dual_coef"][j - 1, si]
            + kernel[:, sj] @ head["dual_coef"][i, sj] + head["svc_intercept"][column])
    return out


class Svm(FeatureHead):
    """The RBF SVM on the features (`svm` section)."""

    name = "svm"
    title = "SVM (RBF) on features"
    stage = "SVM (RBF) on features"
    section = "svm"

    def grid(self, cfg: SvmConfig) -> list[dict[str, Any]]:
        return [{"C": C, "gamma": gamma} for gamma in cfg.gamma for C in cfg.C]

    def make(self, params: dict[str, Any], cfg: SvmConfig, seed: int) -> RbfSvm:
        return RbfSvm(params["C"], params["gamma"], cfg.class_weight, True, seed)

    def select(self, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
               y_valid: np.ndarray, cfg: SvmConfig, seed: int
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One distance matrix for the grid, one `exp` per gamma, one libsvm fit per (gamma,
        C); ties go to the earlier grid entry."""
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

    def arrays(self, estimator: RbfSvm) -> dict[str, np.ndarray]:
        svc, calibrator = estimator.svc_, estimator.calibrator_
        return {"mean": estimator.scaler_.mean_, "scale": estimator.scaler_.scale_,
                "gamma": np.float64(estimator.gamma_),
                "support": estimator.train_[svc.support_], "n_support": svc.n_support_,
                "dual_coef": svc.dual_coef_, "svc_intercept": svc.intercept_,
                "svc_classes": svc.classes_, "pair_classes": estimator.classes_,
                "coef": calibrator.coef_, "intercept": calibrator.intercept_,
                "classes": calibrator.classes_}

    def proba(self, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        margins = svm_margins((x - arrays["mean"]) / arrays["scale"], arrays)
        return logistic_proba(margins, arrays["coef"], arrays["intercept"])
