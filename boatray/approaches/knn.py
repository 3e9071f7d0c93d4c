"""k-NN on the extracted features: the standard frozen-feature check of representation learning.

Cosine similarity on L2-normalised features; the k nearest training images vote, each with
weight exp(similarity / temperature), and the class probabilities are the normalised votes
(the weighted k-NN of Wu et al. 2018 and DINO, Caron et al. 2021, whose temperature 0.07 is
the default). k is chosen on valid from `knn.k`. The exported model keeps the normalised
training features (the neighbour bank) as arrays, from which the same classifier is rebuilt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from boatray.approaches.heads import FeatureHead
from boatray.config import KnnConfig


class SimilarityVote:
    """KNeighborsClassifier's `weights`: exp((1 - cosine distance) / temperature)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, distances: np.ndarray) -> np.ndarray:
        return np.exp((1.0 - distances) / self.temperature)


class CosineKnn(ClassifierMixin, BaseEstimator):
    """Similarity-weighted k-NN on L2-normalised features (scikit-learn's brute-force
    KNeighborsClassifier with the cosine distance); k is capped at the training images."""

    def __init__(self, k: int = 20, temperature: float = 0.07) -> None:
        self.k = k
        self.temperature = temperature

    def fit(self, x: np.ndarray, y: np.ndarray) -> CosineKnn:
        self.bank_ = normalize(np.asarray(x, dtype=np.float32))
        self.labels_ = np.asarray(y)
        self.knn_ = KNeighborsClassifier(
            n_neighbors=min(self.k, len(self.bank_)), metric="cosine", algorithm="brute",
            weights=SimilarityVote(self.temperature)).fit(self.bank_, self.labels_)
        self.classes_ = self.knn_.classes_
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.knn_.predict_proba(normalize(np.asarray(x, dtype=np.float32)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


class Knn(FeatureHead):
    """k-NN on the features (`knn` section)."""

    name = "knn"
    title = "k-NN on features"
    stage = "k-NN on features"
    section = "knn"

    def grid(self, cfg: KnnConfig) -> list[dict[str, Any]]:
        return [{"k": k} for k in cfg.k]

    def make(self, params: dict[str, Any], cfg: KnnConfig, seed: int) -> CosineKnn:
        return CosineKnn(params["k"], cfg.temperature)

    def arrays(self, estimator: CosineKnn) -> dict[str, np.ndarray]:
        return {"bank": estimator.bank_, "labels": estimator.labels_,
                "k": np.int64(estimator.knn_.n_neighbors),
                "temperature": np.float64(estimator.temperature), "classes": estimator.classes_}

    def proba(self, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        knn = CosineKnn(int(arrays["k"]), float(arrays["temperature"]))
        return knn.fit(arrays["bank"], arrays["labels"]).predict_proba(x)
