"""Exported models: self-contained folders (no pickle) that predict as the fitted model did."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from boatray import approaches, export, models, precision, predict
from boatray.approaches import heads
from boatray.config import Experiment, SyntheticConfig
from boatray.data.synthetic import class_names, generate
from boatray.errors import BoatrayError
from boatray.finetune import checkpoints, engine

CLASSES = class_names(4)
SIZE = (24, 32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny ImageFolder tree of generated boat images: test/<class>/*.jpg, 6 per class."""
    root = tmp_path_factory.mktemp("images") / "tree"
    generate(root, SyntheticConfig(classes=4, train_per_class=2, test_per_class=6,
                                   image_size=SIZE, imbalance=1.0), seed=0)
    return root / "test"


def trunk_features(trunk: torch.nn.Module, paths: list[str]) -> np.ndarray:
    """The trunk's features as predict computes them (amp: auto, precision.py)."""
    from boatray.data.images import ImageDataset

    loader = torch.utils.data.DataLoader(ImageDataset(paths, [0] * len(paths), SIZE),
                                         batch_size=8)
    amp = precision.uses_bf16("auto", "cpu")
    trunk = trunk.to(memory_format=torch.channels_last if amp else torch.preserve_format)
    outputs, _ = engine.predict_logits(trunk.eval(), loader, torch.device("cpu"), amp=amp,
                                       channels_last=amp)
    return outputs.flatten(1).numpy()


HEADS = [a for a in approaches.APPROACHES if a.uses_features]


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.name)
def test_a_head_exported_as_arrays_predicts_like_the_fitted_model(head, images, tmp_path):
    torch.manual_seed(0)
    network = models.build("resnet18", "none", len(CLASSES), "avg")
    trunk = models.trunk(network, "pool")
    features = tmp_path / "features" / "features.parquet"
    export.save_trunk(trunk, features)
    paths = sorted(str(p) for p in images.rglob("*.jpg"))
    labels = np.array([CLASSES.index(p.split("/")[-2]) for p in paths])
    x = trunk_features(trunk, paths)
    cfg = head.settings(Experiment())  # the defaults; the first setting of the grid
    fitted = head.make(head.grid(cfg)[0], cfg, 0).fit(x, labels)
    info = {"classes": CLASSES, "image_size": list(SIZE), "stage": "pool",
            "model": {"name": "resnet18", "weights": "none", "pooling": "avg"}}
    folder = head.export(fitted, info, features, tmp_path / "models" / head.name)

    assert json.loads((folder / export.SPEC).read_text())["approach"] == head.name
    np.load(folder / heads.HEAD, allow_pickle=False)  # plain arrays: no pickle needed
    torch.load(folder / export.WEIGHTS, weights_only=True)
    table, _ = predict.predict_folder(approaches.load_model(folder), images)
    expected = heads.full_proba(fitted, x, len(CLASSES))
    order = [paths.index(p) for p in table.path]
    np.testing.assert_allclose(table[[f"proba::{c}" for c in CLASSES]].to_numpy(),
                               expected[order], atol=1e-4)
    assert (table.y_pred.to_numpy() == expected[order].argmax(axis=1)).all()


def test_the_predict_cli_writes_class_names_as_csv_or_parquet(images, tmp_path, capsys):
    network = models.build("bettercnn", "none", len(CLASSES), "avg")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(network.state_dict(), checkpoint / checkpoints.MODEL_FILE)
    (checkpoint / checkpoints.META_FILE).write_text(json.dumps({
        "classes": CLASSES, "image_size": list(SIZE),
        "model": {"name": "bettercnn", "pooling": "avg"}}))
    folder = export.export_checkpoint(checkpoint, tmp_path / "models" / "baseline", "baseline")
    for out in (tmp_path / "p.csv", tmp_path / "p.parquet"):
        assert predict.main(["--model", str(folder), "--images", str(images),
                             "--out", str(out)]) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["path", "split", "class", "true_class", *CLASSES]
    assert set(table["class"]) <= set(CLASSES) and len(table) == 24
    assert set(table.true_class) == set(CLASSES)  # from the class folders
    assert np.allclose(table[CLASSES].sum(axis=1), 1.0)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), table,
                                  check_dtype=False)
    assert predict.main(["--model", str(folder), "--images", str(images),
                         "--out", str(tmp_path / "p.txt")]) == 2
    assert "must end in .csv or .parquet" in capsys.readouterr().err


def test_a_folder_that_is_no_exported_model_is_one_line(tmp_path):
    with pytest.raises(BoatrayError, match="not an exported boatray model"):
        approaches.load_model(tmp_path)


@pytest.mark.parametrize("missing", [heads.HEAD, export.WEIGHTS])
def test_a_head_model_folder_missing_a_file_is_one_line_naming_it(missing, tmp_path, capsys):
    folder = tmp_path / "svm"
    folder.mkdir()
    np.savez(folder / heads.HEAD, classes=np.arange(4))
    torch.save({}, folder / export.WEIGHTS)
    export.write_spec(folder, {"kind": "features+head", "approach": "svm", "classes": CLASSES,
                               "image_size": list(SIZE), "stage": "pool",
                               "model": {"name": "resnet18", "pooling": "avg"}})
    (folder / missing).unlink()
    assert predict.main(["--model", str(folder), "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"lacks {missing}" in err, err


def test_a_model_of_an_unknown_approach_is_one_line(tmp_path):
    export.write_spec(tmp_path, {"kind": "network", "approach": "magic", "classes": CLASSES})
    with pytest.raises(BoatrayError, match="approach 'magic', which this boatray does not know"):
        approaches.load_model(tmp_path)
