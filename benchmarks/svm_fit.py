"""SVM fit time: boatray's RbfSvm (one float32 Gram matrix, libsvm on the precomputed kernel)
against scikit-learn's SVC(kernel="rbf") with the same C and gamma, each fit in its own process;
then the whole SVM and probe heads (FeatureHead.fit_on) on the study's feature widths.

    python benchmarks/svm_fit.py [--train 4000] [--dim 2048] [--head-dims 512 1280 2048]

Synthetic features like pooled CNN features (non-negative, 16 classes 10x unbalanced, seeded, as
hard as the study's: held-out accuracy near 0.87); libsvm's time grows with class overlap, so
easy data would understate the gap. The third row adds calibrated probabilities (the sweep's
fit). Each heads shape (`--features FILE` adds a real one) prints `probe/svm time ratio: X`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from boatray import approaches
from boatray.approaches.svm import RbfSvm
from boatray.config import Experiment
from boatray.features import featurefile
from common import isolated, print_footer, print_header, print_table, ratio

NOISE = 2.5
"""Latent noise of the synthetic features (class centres have unit spread): see above."""
TARGET = 10.0
"""Issue 7: the SVM fit at least 10x faster than scikit-learn's SVC(kernel='rbf')."""
KINDS = {"sklearn": "scikit-learn SVC(kernel='rbf')",
         "boatray": "boatray RbfSvm (precomputed Gram)",
         "boatray+proba": "boatray RbfSvm + calibrated proba (the sweep's fit)"}
"""The fits timed, scikit-learn's first (the reference of the ratios and the agreement)."""
HEAD_DIMS = [512, 1280, 2048]
"""Pooled feature widths of resnet18, efficientnet_lite0 and resnet50."""
VALID_FRACTION = 0.15
"""The valid share of the training rows in the heads shapes, as in the lab16 split."""
PROBE_TARGET = 2.0
"""Issue 15: the probe head fits within 2x the time of the SVM head on the same features."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000,
                        help="training rows (4000; the heads hold 15%% of them out as valid)")
    parser.add_argument("--test", type=int, default=1000, help="held-out rows (1000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (2048)")
    parser.add_argument("--classes", type=int, default=16, help="classes (16)")
    parser.add_argument("--C", type=float, default=10.0, help="SVM C (10)")
    parser.add_argument("--gamma", default="scale", help="scale, auto or a number (scale)")
    parser.add_argument("--head-dims", type=int, nargs="*", default=HEAD_DIMS,
                        help="feature widths of the synthetic heads shapes (512 1280 2048)")
    parser.add_argument("--features", type=Path, action="append", default=[],
                        help="a boatray features file, one more heads shape (repeatable)")
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


def heads_shape(shape: int | Path, args: argparse.Namespace
                ) -> tuple[np.ndarray, pd.DataFrame, list[str], str]:
    """(x, frame, classes, description): a features file's own splits, or `shape`-wide synthetic
    features (the training rows, their last 15% as valid, and the held-out rows)."""
    if isinstance(shape, Path):
        x, frame = featurefile.read_features(shape)
        return (x.reshape(len(x), -1).astype(np.float32), frame,
                featurefile.feature_info(shape)["classes"], str(shape))
    x, y = synthetic_features(args.train, shape, args.classes, args.seed, 1)
    x_test, y_test = synthetic_features(args.test, shape, args.classes, args.seed, 2)
    valid = round(args.train * VALID_FRACTION)
    frame = pd.DataFrame({"path": [f"{i}.jpg" for i in range(args.train + args.test)],
                          "label_idx": np.concatenate([y, y_test]),
                          "split": ["train"] * (args.train - valid) + ["valid"] * valid
                          + ["test"] * args.test})
    return (np.concatenate([x, x_test]), frame, [f"class{i}" for i in range(args.classes)],
            f"{shape}-d synthetic")


def time_heads(shapes: list[int | Path], args: argparse.Namespace) -> list[list[dict]]:
    """The SVM and probe heads as the sweep fits them (`FeatureHead.fit_on`: the default grid
    on valid, the final fit and its refit), one after the other in this process: a table row
    each, per shape."""
    exp = Experiment()
    tables = []
    for shape in shapes:
        x, frame, classes, description = heads_shape(shape, args)
        tables.append([])
        for head in (approaches.get("svm"), approaches.get("probe")):
            cfg = head.settings(exp)
            start = time.perf_counter()
            _, record, _ = head.fit_on(x, frame, classes, cfg, args.seed)
            tables[-1].append({
                "features": f"{description} {x.shape[0]} x {x.shape[1]}", "head": head.name,
                "seconds": time.perf_counter() - start, "selected C": record["selected"]["C"],
                f"valid {cfg.metric}": record["valid_score"]})
    return tables


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
    ratios = []
    tables, _ = isolated(time_heads, [*args.head_dims, *args.features], args)
    for svm, probe in tables:
        print_table([svm, probe])
        ratios.append(ratio(probe["seconds"], svm["seconds"]))
        print(f"probe/svm time ratio: {ratios[-1]:.2f}", flush=True)
    if ratios:
        print(f"target  : probe head <= {PROBE_TARGET:.0f}x the SVM head on every shape: "
              f"{max(ratios):.2f}x at most ({'met' if max(ratios) <= PROBE_TARGET else 'NOT met'})")
    print_footer()


if __name__ == "__main__":
    main()
