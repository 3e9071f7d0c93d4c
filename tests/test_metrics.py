"""boatray.metrics against scikit-learn and known cases, on fixed predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from boatray import metrics
from boatray.errors import BoatrayError
from boatray.results import predictions_frame

CLASSES = ["Alilaguna", "Gondola", "Motobarca", "Topa", "Water"]  # Topa: no test image


def _fixed(seed: int = 3, n: int = 300, skill: float = 0.7) -> pd.DataFrame:
    """Predictions with a class that never occurs in y_true and a never-recognised class."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 4], size=n, p=[0.2, 0.2, 0.2, 0.4])
    proba = rng.dirichlet(np.ones(len(CLASSES)), n)
    right = rng.random(n) < skill
    proba[right, y_true[right]] += 1.0
    proba[y_true == 1, 0] += 2.0  # Gondola is always called Alilaguna
    proba[5, :] = [0.0, 1.0, 0.0, 0.0, 0.0]  # a zero probability on a true class: clipped
    proba = proba / proba.sum(axis=1, keepdims=True)
    return predictions_frame([f"img{i:04d}.jpg" for i in range(n)], "test", y_true, proba,
                             CLASSES)


def test_scores_equal_scikit_learn() -> None:
    table = _fixed()
    y_true, y_pred = table["y_true"], table["y_pred"]
    proba = table.filter(like="proba::").to_numpy()
    labels = list(range(len(CLASSES)))
    got = metrics.scores(table)
    assert got["n"] == len(table)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=average, zero_division=0)
        assert (got[f"{average}_precision"], got[f"{average}_recall"],
                got[f"{average}_f1"]) == pytest.approx((p, r, f))
    clipped = np.clip(proba, 1e-15, 1.0)
    expected_loss = log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels)
    assert np.isfinite(got["log_loss"]) and got["log_loss"] == pytest.approx(expected_loss)
    assert got["top2_accuracy"] == pytest.approx(
        top_k_accuracy_score(y_true, proba, k=2, labels=labels))


def test_per_class_table_is_classification_report_by_name() -> None:
    table = _fixed()
    got = metrics.classification_table(table)
    expected = classification_report(table["y_true"], table["y_pred"], labels=range(5),
                                     target_names=CLASSES, output_dict=True, zero_division=0)
    assert list(got.index) == [*CLASSES, "macro avg", "weighted avg"]
    for name in got.index:
        for column in ("precision", "recall", "f1-score", "support"):
            assert got.loc[name, column] == pytest.approx(expected[name][column])
    assert got.loc["Topa", "support"] == 0 and got.loc["Gondola", "f1-score"] == 0


def test_confusion_matrix_by_class_name() -> None:
    table = _fixed()
    got = metrics.confusion(table)
    assert list(got.index) == CLASSES and list(got.columns) == CLASSES
    np.testing.assert_array_equal(got.to_numpy(), confusion_matrix(
        table["y_true"], table["y_pred"], labels=range(5)))


def test_missing_probabilities_give_nan_not_an_error() -> None:
    table = _fixed()
    table["proba::Topa"] = np.nan
    assert np.isnan(metrics.multiclass_log_loss(table))
    assert np.isnan(metrics.top_k_accuracy(table))
    two = predictions_frame(["a", "b"], "test", [0, 1], np.array([[0.2, 0.8], [0.9, 0.1]]),
                            ["x", "y"])
    assert metrics.top_k_accuracy(two, 2) == 1.0


def test_mcnemar_exact_known_case() -> None:
    # b = 10, c = 2: p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert metrics.mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert metrics.mcnemar_exact(2, 10) == metrics.mcnemar_exact(10, 2)
    assert metrics.mcnemar_exact(0, 0) == 1.0
    assert metrics.mcnemar_exact(5, 5) == pytest.approx(1.0)


def _pair(only_a: int, only_b: int, both: int, neither: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = only_a + only_b + both + neither
    y_true = np.zeros(n, dtype=int)
    a_right = np.r_[np.ones(only_a), np.zeros(only_b), np.ones(both), np.zeros(neither)]
    b_right = np.r_[np.zeros(only_a), np.ones(only_b), np.ones(both), np.zeros(neither)]
    paths = [f"img{i}.jpg" for i in range(n)]
    tables = []
    for right in (a_right, b_right):
        proba = np.where(right[:, None] == 1, [[0.9, 0.1]], [[0.1, 0.9]])
        tables.append(predictions_frame(paths, "test", y_true, proba, ["water", "boat"]))
    return tables[0], tables[1]


def test_mcnemar_aligns_by_path() -> None:
    a, b = _pair(only_a=10, only_b=2, both=30, neither=8)
    shuffled = b.sample(frac=1.0, random_state=0)  # another order, same images
    result = metrics.mcnemar(a, shuffled)
    assert (result.n, result.only_a_right, result.only_b_right) == (50, 10, 2)
    assert result.p_value == pytest.approx(158 / 4096)


def test_mcnemar_refuses_different_images() -> None:
    a, b = _pair(only_a=3, only_b=3, both=4, neither=0)
    with pytest.raises(BoatrayError, match="same images"):
        metrics.mcnemar(a, b.iloc[1:])
    other = b.copy()
    other.loc[0, "y_true"] = 1
    with pytest.raises(BoatrayError, match="true labels"):
        metrics.mcnemar(a, other)


def test_bootstrap_statistics_equal_scikit_learn_per_resample() -> None:
    table = _fixed()
    y_true, y_pred = table["y_true"].to_numpy(), table["y_pred"].to_numpy()
    indices = metrics.bootstrap_indices(len(table), 20, seed=1)
    stats = metrics.bootstrap_statistics(y_true, y_pred, len(CLASSES), indices)
    for row, rows in enumerate(indices):
        assert stats["accuracy"][row] == pytest.approx(accuracy_score(y_true[rows], y_pred[rows]))
        assert stats["macro_f1"][row] == pytest.approx(f1_score(
            y_true[rows], y_pred[rows], labels=range(5), average="macro", zero_division=0))


def test_bootstrap_ci_is_seeded_and_contains_the_estimate() -> None:
    table = _fixed()
    y_true, y_pred = table["y_true"].to_numpy(), table["y_pred"].to_numpy()
    ci = metrics.bootstrap_ci(y_true, y_pred, len(CLASSES), resamples=1000, seed=7)
    assert ci == metrics.bootstrap_ci(y_true, y_pred, len(CLASSES), resamples=1000, seed=7)
    assert ci != metrics.bootstrap_ci(y_true, y_pred, len(CLASSES), resamples=1000, seed=8)
    point = metrics.scores(table)
    for name in ("accuracy", "macro_f1"):
        low, high = ci[name]
        assert low < point[name] < high and high - low < 0.2


def test_bootstrap_of_repeats_averages_the_seeds() -> None:
    table = _fixed()
    y_true = table["y_true"].to_numpy()
    preds = np.vstack([table["y_pred"].to_numpy(), _fixed(seed=4)["y_pred"].to_numpy()])
    indices = metrics.bootstrap_indices(len(y_true), 50, seed=0)
    joint = metrics.bootstrap_statistics(y_true, preds, len(CLASSES), indices)
    alone = [metrics.bootstrap_statistics(y_true, p, len(CLASSES), indices) for p in preds]
    for name in ("accuracy", "macro_f1"):
        np.testing.assert_allclose(joint[name], (alone[0][name] + alone[1][name]) / 2)


def test_across_repeats_mean_and_std() -> None:
    tables = [_fixed(seed=s) for s in (1, 2, 3)]
    summary = metrics.across_repeats([metrics.scores(t) for t in tables])
    accuracies = [metrics.scores(t)["accuracy"] for t in tables]
    assert summary.loc["accuracy", "mean"] == pytest.approx(np.mean(accuracies))
    assert summary.loc["accuracy", "std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert (summary["repeats"] == 3).all()
    assert {"macro_f1", "weighted_f1", "log_loss", "top2_accuracy"} <= set(summary.index)
