"""The classical heads on features (approaches/heads.py, svm.py, probe.py): the SVM's
precomputed-Gram fast path equals SVC(kernel='rbf'); selection, calibration, run folders, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from boatray import approaches, export
from boatray.approaches import heads
from boatray.approaches import svm as estimators
from boatray.config import KnnConfig, ProbeConfig, SvmConfig, from_dict
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.results import PROBA_PREFIX, read_run
from boatray.svm import __main__ as svm_cli

SVM, PROBE = approaches.get("svm"), approaches.get("probe")

CLASSES = ["alpha", "beta", "gamma", "delta"]


def blobs(n: int, dim: int = 64, spread: float = 0.25, seed: int = 0):
    """Overlapping, unbalanced Gaussian classes with an offset and scale (so scaling matters)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(CLASSES), dim)) * spread
    y = rng.choice(len(CLASSES), n, p=[0.4, 0.3, 0.2, 0.1])
    x = (centers[y] + rng.normal(size=(n, dim))) * 3.0 + 5.0
    return x.astype(np.float32), y


@pytest.mark.parametrize("gamma", ["scale", 0.004])
@pytest.mark.parametrize("C", [0.5, 10.0])
def test_precomputed_gram_predicts_like_sklearn_rbf(C, gamma):
    x, y = blobs(600)
    fast = estimators.RbfSvm(C=C, gamma=gamma, probability=False).fit(x[:400], y[:400])
    reference = make_pipeline(StandardScaler(), SVC(C=C, gamma=gamma)).fit(x[:400], y[:400])
    scaled = StandardScaler().fit_transform(x[:400])
    expected_gamma = 1.0 / (scaled.shape[1] * scaled.var()) if gamma == "scale" else gamma
    assert fast.gamma_ == pytest.approx(expected_gamma, rel=1e-5)
    np.testing.assert_array_equal(fast.predict(x[400:]), reference.predict(x[400:]))
    assert 0.4 < np.mean(fast.predict(x[400:]) == y[400:]) < 1.0  # a problem with errors


def test_squared_distances_match_the_direct_formula():
    x, _ = blobs(50)
    direct = ((x[:, None, :].astype(np.float64) - x[None, :20, :]) ** 2).sum(-1)
    np.testing.assert_allclose(estimators.squared_distances(x, x[:20]), direct,
                               rtol=1e-4, atol=1e-2)


def test_probabilities_are_calibrated_and_cope_with_a_single_image_class():
    x, y = blobs(700, seed=1)
    y[0] = 3
    y[1:][y[1:] == 3] = 2  # class 3 has one training image
    model = estimators.RbfSvm(C=10.0, random_state=0).fit(x[:500], y[:500])
    proba = model.predict_proba(x[500:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert proba.shape == (200, 4) and list(model.classes_) == [0, 1, 2, 3]
    assert log_loss(y[500:], proba, labels=range(4)) < 0.8 * log_loss(
        y[500:], np.tile(np.bincount(y[:500], minlength=4) / 500, (200, 1)), labels=range(4))
    again = estimators.RbfSvm(C=10.0, random_state=0).fit(x[:500], y[:500]).predict_proba(x[500:])
    np.testing.assert_array_equal(proba, again)  # seeded


def write_features(path, x, y, splits):
    """A features file in the format boatray.features writes."""
    meta = {"classes": CLASSES, "shape": [x.shape[1]], "stage": "pool", "dtype": "float32",
            "image_size": [32, 96], "model": {"name": "test", "pooling": "avg"}}
    batch = {"path": np.array([f"/img/{i}.jpg" for i in range(len(y))]), "label_idx": y,
             "split": np.array(splits), "error": np.array([""] * len(y)), "features": x}
    featurefile.write_features([batch], path, meta)
    featurefile.stats_path(path).write_text(json.dumps({"seconds": 2.0, "images_per_second": 5.0,
                                                     "failed": []}))
    return path


@pytest.fixture
def features_file(tmp_path):
    x, y = blobs(500, seed=2)
    splits = ["train"] * 300 + ["valid"] * 100 + ["test"] * 100
    return write_features(tmp_path / "features.parquet", x, y, splits)


@pytest.mark.parametrize("head, cfg, settings", [
    (SVM, SvmConfig(C=[0.1, 1.0, 10.0], gamma=["scale", 0.001]), 6),
    (PROBE, ProbeConfig(C=[0.1, 1.0]), 2),
    (approaches.get("knn"), KnnConfig(k=[1, 5, 15]), 3)])
def test_a_head_writes_its_run_folder_in_the_common_format(head, cfg, settings, tmp_path,
                                                           features_file):
    run_dir = head.fit_file(features_file, tmp_path / "runs" / head.name, cfg, seed=0)
    predictions, record = read_run(run_dir)
    assert list(predictions.columns) == ["path", "split", "y_true", "y_pred",
                                         *[PROBA_PREFIX + c for c in CLASSES]]
    assert predictions.split.value_counts().to_dict() == {"valid": 100, "test": 100}
    assert (predictions.y_true == predictions.y_pred).mean() > 0.5  # chance: 0.4 at best
    assert record["approach"] == head.name and record["classes"] == CLASSES
    assert record["extraction_seconds"] == 2.0 and record["images_per_second"] == 5.0
    assert record["wall_seconds"] >= record["fit_seconds"] + 2.0
    assert len(record["grid"]) == settings
    assert set(record["selected"]) == set(head.grid(cfg)[0])
    assert record["own_label_agreement"] > 0.9


def test_refit_on_train_predicts_valid_and_test_with_one_model(tmp_path, features_file):
    run_dir = SVM.fit_file(features_file, tmp_path / "svm", SvmConfig(C=[1.0], refit="train"))
    predictions, record = read_run(run_dir)
    assert record["refit"] == "train" and record["selected"] == {"C": 1.0, "gamma": "scale"}
    x, frame = featurefile.read_features(features_file)
    train = frame.split == "train"
    model = estimators.RbfSvm(1.0, "scale").fit(x[train], frame.label_idx[train])
    proba = model.predict_proba(x[~train])
    np.testing.assert_array_equal(predictions.y_pred, model.classes_[proba.argmax(axis=1)])
    assert record["label_rule"] == heads.LABEL_RULE
    agree = np.mean(model.predict(x[~train][frame.split[~train] == "test"])
                    == predictions.y_pred[predictions.split == "test"])
    assert record["own_label_agreement"] == pytest.approx(agree)


def test_bad_settings_are_one_line_errors(tmp_path, features_file):
    with pytest.raises(BoatrayError, match="svm.gamma entries must be numbers or scale, auto"):
        from_dict({"svm": {"gamma": ["wide"]}})
    with pytest.raises(BoatrayError, match="svm.gamma must be > 0"):
        from_dict({"svm": {"gamma": [0.1, -1]}})
    x, y = blobs(60)
    no_valid = write_features(tmp_path / "nv.parquet", x, y, ["train"] * 40 + ["test"] * 20)
    with pytest.raises(BoatrayError, match=r"grid \(svm\) needs a valid split"):
        SVM.fit_file(no_valid, tmp_path / "svm", SvmConfig(C=[1.0, 10.0]))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(BoatrayError, match="not a boatray features file"):
        SVM.fit_file(tmp_path / "plain.parquet", tmp_path / "svm", SvmConfig())


def test_cli_writes_the_run_folders_and_the_models_under_out(tmp_path, features_file, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # models once went to ./results/<experiment>/models, not --out
    torch.save({"weight": torch.zeros(2)}, export.trunk_path(features_file))
    out = tmp_path / "out"
    code = svm_cli.main(["--features", str(features_file), "--out", str(out),
                         "--set", "svm.C=[1.0]", "--set", "probe.enabled=false"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    predictions = pd.read_parquet(out / "svm" / "predictions.parquet")
    assert len(predictions) == 200
    assert (out / "models" / "svm" / export.SPEC).is_file()
    assert not (out / "probe").exists() and not (tmp_path / "results").exists()
    assert svm_cli.main(["--features", str(tmp_path / "missing.parquet"), "--out", "x"]) == 2


def test_the_probe_chooses_the_c_and_scores_of_a_plain_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(500, seed=2)
    cfg = ProbeConfig(C=[0.001, 0.01, 0.1, 1.0], metric="macro_f1")
    chosen, table = PROBE.select(x[:350], y[:350], x[350:], y[350:], cfg, 0)
    plain = [heads.score("macro_f1", y[350:], make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(x[:350], y[:350])
        .predict(x[350:])) for C in cfg.C]
    assert [row["valid_score"] for row in table] == pytest.approx(plain)
    assert chosen == {"C": cfg.C[plain.index(max(plain))]}
    assert len(set(plain)) > 1  # the choice is a real one
