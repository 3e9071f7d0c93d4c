"""SVM fit time: boatray's RbfSvm (one float32 Gram matrix, libsvm on the precomputed kernel)
against scikit-learn's SVC(kernel="rbf") with the same C and gamma.

    python benchmarks/svm_fit.py [--train 4000] [--dim 2048] [--C 10] [--gamma scale]

Features are synthetic but shaped like pooled ResNet50 features: non-negative, 2,048-d, 16
unbalanced classes (largest/smallest 10x) that come from class centres in a 64-d latent space
mapped through a fixed random ReLU layer; seeded, so every run fits the same data. Their
noise makes them about as hard as the real study's features (held-out accuracy near the
seeds' 0.87; scikit-learn's fit near their 15-18 s): libsvm's time grows with the overlap
of the classes, the Gram matrix's does not, so easy data would understate the gap. Both
estimators standardise the features first (StandardScaler, as boatray does). Each fit runs in
its own process; the table shows fit and predict seconds, the fit-time ratio and peak memory,
and the fraction of held-out predictions on which the two agree (the same SVM should agree on
all of them). A third row times the fit the sweep really runs, with the calibrated
probabilities (five out-of-fold fits more), for information: it is not scikit-learn's task.
A fourth row fits the logistic-regression probe (svm.linear_probe) on the same features; its
fit time over the SVM's is checked against issue 15's target (at most 2x).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from boatray.svm.estimators import RbfSvm, linear_probe
from common import isolated, print_footer, print_header, print_table, ratio

NOISE = 2.5
"""Latent noise of the synthetic features (class centres have unit spread): see above."""
TARGET = 10.0
"""Issue 7: the SVM fit at least 10x faster than scikit-learn's SVC(kernel='rbf')."""
KINDS = {"sklearn": "scikit-learn SVC(kernel='rbf')",
         "boatray": "boatray RbfSvm (precomputed Gram)",
         "boatray+proba": "boatray RbfSvm + calibrated proba (the sweep's fit)",
         "probe": "boatray linear probe (logistic regression, C=1)"}
"""The fits timed, scikit-learn's first (the reference of the ratios and the agreement)."""
PROBE_C = 1.0
"""The probe's C: the largest of the default grid, its slowest fit."""
PROBE_TARGET = 2.0
"""Issue 15: the probe fits within 2x the time of the SVM on the same features."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training rows (4000)")
    parser.add_argument("--test", type=int, default=1000, help="held-out rows (1000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (2048)")
    parser.add_argument("--classes", type=int, default=16, help="classes (16)")
    parser.add_argument("--C", type=float, default=10.0, help="SVM C (10)")
    parser.add_argument("--gamma", default="scale", help="scale, auto or a number (scale)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_features(rows: int, dim: int, classes: int, seed: int,
                       split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (rows, dim), y) with class structure; `seed` fixes the classes and the
    mapping, `split_seed` the draw (train and test share `seed`, differ in `split_seed`)."""
    rng = np.random.default_rng(seed)
    latent = 64
    centres = rng.normal(0.0, 1.0, (classes, latent))
    mapping = rng.normal(0.0, 1.0 / np.sqrt(latent), (latent, dim))
    weights = np.power(10.0, -np.linspace(0.0, 1.0, classes))
    draw = np.random.default_rng([seed, split_seed])
    y = draw.choice(classes, size=rows, p=weights / weights.sum())
    z = centres[y] + draw.normal(0.0, NOISE, (rows, latent))
    return np.maximum(z @ mapping, 0.0).astype(np.float32), y


def make_estimator(kind: str, C: float, gamma: float | str):
    """`boatray`, `boatray+proba` or `sklearn`: an unfitted estimator."""
    if kind == "sklearn":
        return make_pipeline(StandardScaler(), SVC(kernel="rbf", C=C, gamma=gamma))
    if kind == "probe":
        return linear_probe(PROBE_C, None)
    return RbfSvm(C=C, gamma=gamma, probability=kind == "boatray+proba")


def fit_and_predict(kind: str, args: argparse.Namespace) -> tuple[float, float, np.ndarray]:
    """Fit on the training rows, predict the held-out ones: (fit s, predict s, predictions)."""
    x, y = synthetic_features(args.train, args.dim, args.classes, args.seed, 1)
    x_test, _ = synthetic_features(args.test, args.dim, args.classes, args.seed, 2)
    estimator = make_estimator(kind, args.C, args.gamma)
    start = time.perf_counter()
    estimator.fit(x, y)
    fitted = time.perf_counter() - start
    start = time.perf_counter()
    predictions = estimator.predict(x_test)
    return fitted, time.perf_counter() - start, predictions


def main() -> None:
    args = build_parser().parse_args()
    try:
        args.gamma = float(args.gamma)
    except ValueError:
        pass
    print_header(f"SVM fit, {args.train} x {args.dim} features, {args.classes} classes, "
                 f"C={args.C}, gamma={args.gamma}")
    _, y_test = synthetic_features(args.test, args.dim, args.classes, args.seed, 2)
    runs = {kind: isolated(fit_and_predict, kind, args) for kind in KINDS}
    (sklearn_fit, _, sklearn_predictions), _ = runs["sklearn"]
    rows = {kind: {"path": KINDS[kind], "fit s": fitted, "predict s": predicted,
                   "fit speed-up": ratio(sklearn_fit, fitted),
                   "test accuracy": float((predictions == y_test).mean()),
                   "agreement": float((predictions == sklearn_predictions).mean()), **memory}
            for kind, ((fitted, predicted, predictions), memory) in runs.items()}
    print_table(list(rows.values()))
    speedup, agreement = rows["boatray"]["fit speed-up"], rows["boatray"]["agreement"]
    print(f"target  : fit >= {TARGET:.0f}x scikit-learn: {speedup:.1f}x "
          f"({'met' if speedup >= TARGET else 'NOT met'}); same predictions on "
          f"{agreement:.2%} of {args.test} held-out rows")
    probe = ratio(rows["probe"]["fit s"], rows["boatray"]["fit s"])
    print(f"target  : probe fit <= {PROBE_TARGET:.0f}x the SVM's: {probe:.2f}x "
          f"({'met' if probe <= PROBE_TARGET else 'NOT met'})")
    print_footer()


if __name__ == "__main__":
    main()
