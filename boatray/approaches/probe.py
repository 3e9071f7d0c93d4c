"""The linear probe on the extracted features: a multinomial logistic regression on
standardised features, C chosen on valid."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from boatray.approaches.heads import FeatureHead, logistic_proba
from boatray.config import ProbeConfig


class OneThreadLogisticRegression(LogisticRegression):
    """scikit-learn's LogisticRegression (lbfgs), fitted on one BLAS/OpenMP thread.

    Each lbfgs step is a few small matrix products (n x d by d x classes); with torch's and
    NumPy's thread pools both loaded, more threads only contend: one fit of 3,869 x 512
    features took 12.3 s with 2 threads and 0.8 s with 1 on 2 busy cores, with
    the same iterations and result.
    """

    def fit(self, x, y, sample_weight=None):
        with threadpool_limits(1):
            return super().fit(x, y, sample_weight)


def linear_probe(C: float, class_weight: str | None) -> Pipeline:
    """StandardScaler + multinomial logistic regression: the linear probe."""
    return make_pipeline(StandardScaler(),
                         OneThreadLogisticRegression(C=C, class_weight=class_weight,
                                                     max_iter=2000))


class Probe(FeatureHead):
    """The linear probe on the features (`probe` section)."""

    name = "probe"
    title = "linear probe on features"
    stage = "linear probe on features"
    section = "probe"

    def grid(self, cfg: ProbeConfig) -> list[dict[str, Any]]:
        return [{"C": C} for C in cfg.C]

    def make(self, params: dict[str, Any], cfg: ProbeConfig, seed: int) -> Pipeline:
        return linear_probe(params["C"], cfg.class_weight)

    def arrays(self, estimator: Pipeline) -> dict[str, np.ndarray]:
        scaler, logistic = estimator[0], estimator[-1]
        return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": logistic.coef_,
                "intercept": logistic.intercept_, "classes": logistic.classes_}

    def proba(self, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        return logistic_proba((x - arrays["mean"]) / arrays["scale"], arrays["coef"],
                              arrays["intercept"])
