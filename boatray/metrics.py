"""Metrics of a predictions table: pure functions, scikit-learn where it has them.

A predictions table is the common format of boatray.results (`y_true`, `y_pred` as class
indices, one `proba::<Class>` column per class in index order). Every function here takes such
a table (or plain label arrays) and returns numbers or DataFrames; nothing reads or writes files.

Averages follow `classification_report(labels=<every class>, zero_division=0)`: a class with no
test image and no prediction counts as 0 in the macro averages, so tables made for the same
class list stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import classification_report, confusion_matrix, log_loss, top_k_accuracy_score

from boatray.errors import BoatrayError
from boatray.results import classes_of, proba_of

PROBA_FLOOR = 1e-15
AVERAGES = ("macro avg", "weighted avg")


def classification_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per-class precision, recall, f1-score and support (rows: class names, then the averages)."""
    classes = classes_of(predictions)
    report = classification_report(
        predictions["y_true"], predictions["y_pred"], labels=list(range(len(classes))),
        target_names=classes, output_dict=True, zero_division=0)
    report.pop("accuracy", None)
    table = pd.DataFrame(report).T[["precision", "recall", "f1-score", "support"]]
    table["support"] = table["support"].astype(np.int64)
    return table.loc[[*classes, *[a for a in AVERAGES if a in table.index]]]


def multiclass_log_loss(predictions: pd.DataFrame) -> float:
    """Cross-entropy of the probability columns (clipped, rows renormalised); NaN without them."""
    proba = proba_of(predictions)
    if proba.size == 0 or np.isnan(proba).any():
        return float("nan")
    proba = np.clip(proba, PROBA_FLOOR, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    return float(log_loss(predictions["y_true"], proba, labels=list(range(proba.shape[1]))))


def top_k_accuracy(predictions: pd.DataFrame, k: int = 2) -> float:
    """Share of images whose true class is among the k most probable; NaN without probabilities."""
    proba = proba_of(predictions)
    if proba.size == 0 or np.isnan(proba).any():
        return float("nan")
    if proba.shape[1] <= k:
        return 1.0
    return float(top_k_accuracy_score(predictions["y_true"], proba, k=k,
                                      labels=list(range(proba.shape[1]))))


def scores(predictions: pd.DataFrame) -> dict[str, float]:
    """The headline numbers of one predictions table."""
    table = classification_table(predictions)
    result = {"n": len(predictions),
              "accuracy": float((predictions["y_true"] == predictions["y_pred"]).mean())}
    for average in AVERAGES:
        prefix = average.split()[0]
        for metric in ("precision", "recall", "f1-score"):
            result[f"{prefix}_{metric.split('-')[0]}"] = float(table.loc[average, metric])
    result["log_loss"] = multiclass_log_loss(predictions)
    result["top2_accuracy"] = top_k_accuracy(predictions, 2)
    return result


def confusion(predictions: pd.DataFrame) -> pd.DataFrame:
    """Confusion matrix counts: rows the true class, columns the predicted class (by name)."""
    classes = classes_of(predictions)
    matrix = confusion_matrix(predictions["y_true"], predictions["y_pred"],
                              labels=list(range(len(classes))))
    return pd.DataFrame(matrix, index=pd.Index(classes, name="true"),
                        columns=pd.Index(classes, name="predicted"))


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """A (resamples, n) matrix of row indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_statistics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                         indices: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro F1 of every resample (one row of `indices` each), vectorised.

    `y_pred` may be (n,) or (repeats, n): with several repeats (seeds) on the same images, a
    resample's statistic is the mean over the repeats, so the interval is that of the
    seed-averaged score under test-set resampling.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.atleast_2d(np.asarray(y_pred, dtype=np.int64))
    resamples = len(indices)
    offsets = (np.arange(resamples) * n_classes)[:, None]
    truth = y_true[indices]
    accuracy, macro_f1 = [], []
    for pred in y_pred:
        guess = pred[indices]
        hits = truth == guess
        accuracy.append(hits.mean(axis=1))
        size = resamples * n_classes
        true_count = np.bincount((truth + offsets).ravel(), minlength=size)
        pred_count = np.bincount((guess + offsets).ravel(), minlength=size)
        true_pos = np.bincount((truth + offsets).ravel(), weights=hits.ravel(), minlength=size)
        denominator = (true_count + pred_count).reshape(resamples, n_classes)
        f1 = np.divide(2 * true_pos.reshape(resamples, n_classes), denominator,
                       out=np.zeros(denominator.shape), where=denominator > 0)
        macro_f1.append(f1.mean(axis=1))
    return {"accuracy": np.mean(accuracy, axis=0), "macro_f1": np.mean(macro_f1, axis=0)}


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for accuracy and macro F1 (see bootstrap_statistics)."""
    indices = bootstrap_indices(len(y_true), resamples, seed)
    tail = (1.0 - level) / 2.0
    return {name: tuple(float(q) for q in np.quantile(values, [tail, 1.0 - tail]))
            for name, values in bootstrap_statistics(y_true, y_pred, n_classes, indices).items()}


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two approaches on the same images."""

    n: int
    only_a_right: int
    only_b_right: int
    p_value: float

    @property
    def discordant(self) -> int:
        return self.only_a_right + self.only_b_right


def mcnemar_exact(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact p-value: a binomial test of the discordant pairs against 1/2."""
    discordant = only_a_right + only_b_right
    if discordant == 0:
        return 1.0
    return float(binomtest(only_a_right, discordant, 0.5).pvalue)


def mcnemar(a: pd.DataFrame, b: pd.DataFrame) -> McNemar:
    """McNemar's exact test between two predictions tables of the same images (joined by path)."""
    for name, table in (("first", a), ("second", b)):
        if table["path"].duplicated().any():
            raise BoatrayError(f"the {name} predictions list an image more than once")
    paths_a, paths_b = set(a["path"]), set(b["path"])
    if paths_a != paths_b:
        raise BoatrayError(
            f"McNemar needs the same images: {len(paths_a - paths_b)} only in the first, "
            f"{len(paths_b - paths_a)} only in the second")
    joined = a[["path", "y_true", "y_pred"]].merge(
        b[["path", "y_true", "y_pred"]], on="path", suffixes=("_a", "_b"))
    if (joined["y_true_a"] != joined["y_true_b"]).any():
        raise BoatrayError("McNemar: the two predictions disagree on the true labels")
    right_a = joined["y_pred_a"] == joined["y_true_a"]
    right_b = joined["y_pred_b"] == joined["y_true_b"]
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return McNemar(len(joined), only_a, only_b, mcnemar_exact(only_a, only_b))


def across_repeats(per_repeat_scores: list[dict[str, float]]) -> pd.DataFrame:
    """Mean and standard deviation (ddof=1) over the repeats (seeds) of one configuration.

    Takes each repeat's `scores(...)`; returns one row per score with mean, std and repeats.
    """
    per_repeat = pd.DataFrame(per_repeat_scores).drop(columns="n", errors="ignore")
    return pd.DataFrame({"mean": per_repeat.mean(), "std": per_repeat.std(ddof=1),
                         "repeats": len(per_repeat)})
