"""k-NN on features (approaches/knn.py): similarity-weighted votes on L2-normalised features,
k chosen on valid, the exported neighbour bank predicting like the fitted model."""

from __future__ import annotations

import numpy as np
import pytest

from boatray import approaches
from boatray.approaches.heads import score
from boatray.config import KnnConfig, from_dict
from boatray.errors import BoatrayError

KNN = approaches.get("knn")


def test_probabilities_are_the_normalised_similarity_weighted_votes_of_the_k_nearest():
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(30, 8)) * 5 + 2, rng.integers(0, 3, 30)
    queries = rng.normal(size=(7, 8)) * 5 + 2
    model = KNN.make({"k": 4}, KnnConfig(temperature=0.1), 0).fit(bank, labels)

    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    similarity = queries / np.linalg.norm(queries, axis=1, keepdims=True) @ unit.T
    expected = np.zeros((7, 3))
    for row, sims in enumerate(similarity):
        for neighbour in np.argsort(-sims)[:4]:
            expected[row, labels[neighbour]] += np.exp(sims[neighbour] / 0.1)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict_proba(queries), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.predict(queries), expected.argmax(axis=1))
    # cosine: a scaled query has the same neighbours and votes
    np.testing.assert_allclose(model.predict_proba(queries * 10), expected, rtol=1e-4, atol=1e-6)


def test_k_is_chosen_on_valid_from_the_grid_and_capped_at_the_training_images():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 16)) * 2
    y = rng.integers(0, 4, 240)
    x = centers[y] + rng.normal(size=(240, 16))
    cfg = KnnConfig(k=[1, 5, 25, 500])
    chosen, table = KNN.select(x[:160], y[:160], x[160:], y[160:], cfg, 0)
    direct = [score(cfg.metric, y[160:], KNN.make({"k": k}, cfg, 0).fit(x[:160], y[:160])
                    .predict(x[160:])) for k in cfg.k]
    assert [row["valid_score"] for row in table] == pytest.approx(direct)
    assert chosen == {"k": cfg.k[direct.index(max(direct))]}
    assert KNN.make({"k": 500}, cfg, 0).fit(x[:160], y[:160]).knn_.n_neighbors == 160


def test_the_exported_bank_predicts_like_the_fitted_model():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 12)), rng.choice([0, 2, 3], 50)  # class 1 never seen
    model = KNN.make({"k": 7}, KnnConfig(), 0).fit(x, y)
    arrays = KNN.arrays(model)
    assert all(isinstance(value, np.ndarray | np.generic) for value in arrays.values())
    np.testing.assert_allclose(KNN.proba(arrays, x[:9]), model.predict_proba(x[:9]), atol=1e-6)
    assert list(arrays["classes"]) == [0, 2, 3]


@pytest.mark.parametrize("settings, message", [
    ({"k": [0]}, "knn.k must be >= 1"), ({"k": []}, "knn.k must not be empty"),
    ({"temperature": 0}, "knn.temperature must be > 0")])
def test_bad_knn_settings_are_one_line_errors_naming_the_key(settings, message):
    with pytest.raises(BoatrayError, match=message):
        from_dict({"knn": settings})
    assert from_dict({"knn": {"k": [3, 9], "temperature": 0.2}}).knn.k == [3, 9]
