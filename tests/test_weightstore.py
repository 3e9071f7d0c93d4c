"""Frozen weights stored once: the weight store, and the checkpoints and models that refer to it."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from boatray import approaches, export, freezing, models, weightstore
from boatray.config import TrainConfig
from boatray.errors import BoatrayError
from boatray.finetune import checkpoints, engine

META = {"classes": list("abcd"), "image_size": [32, 96],
        "model": {"name": "resnet18", "pooling": "avg", "weights": "none"}}


def resnet(spec: str = "last1") -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build("resnet18", "none", 4, "avg")
    freezing.freeze(model, spec)
    return model


def with_optimizer(spec: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and its optimizer as the training loop has them: every stage in the optimizer,
    then `spec` frozen."""
    model = resnet(spec)
    optimizer = engine.optimizer_over_all_stages(model, TrainConfig())
    freezing.freeze(model, spec)
    return model, optimizer


def stored_files(results) -> list:
    return sorted((results / weightstore.STORE_DIR).iterdir())


def test_what_did_not_train_is_named_by_the_freeze_spec():
    model = resnet("last1")
    names = weightstore.untrained(model)
    assert {"conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
            "layer3.1.conv2.weight", "layer3.1.bn2.running_var"} <= names
    assert not {n for n in names if n.startswith(("layer4", "fc"))}
    assert weightstore.untrained(resnet("all")) == set()


def test_two_checkpoints_and_a_model_store_the_frozen_trunk_once(tmp_path):
    results = tmp_path / "results" / "exp"
    store = weightstore.location(results)
    model, optimizer = with_optimizer("last1")
    first = checkpoints.save_checkpoint(results / "tune" / "t1" / "checkpoint_000000", model,
                                        optimizer, None, 1, [], META, store)
    once = stored_files(results)
    with torch.no_grad():
        model.layer4[0].conv1.weight.add_(1.0)  # it trained
    second = checkpoints.save_checkpoint(results / "tune" / "t2" / "checkpoint_000000", model,
                                         optimizer, None, 1, [], META, store)
    assert stored_files(results) == once  # the frozen tensors were there already
    for blob in once:  # content-addressed: the file's name is the sha256 of its bytes
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    trained = torch.load(second / checkpoints.MODEL_FILE, weights_only=True)
    assert "layer4.0.conv1.weight" in trained and "layer1.0.conv1.weight" not in trained
    refs = json.loads(weightstore.refs_path(second / checkpoints.MODEL_FILE).read_text())
    assert "layer1.0.conv1.weight" in refs["tensors"] and refs["store"] == store
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kept = (second / checkpoints.MODEL_FILE).stat().st_size
    frozen = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                 if n in weightstore.untrained(model))
    assert kept < total - 0.95 * frozen  # what trained, plus a few KB of small frozen tensors

    loaded, _ = checkpoints.load_model(second)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    exported = export.export_checkpoint(first, results / "models" / "run", "finetune")
    assert stored_files(results) == once
    network = approaches.load_model(exported).network
    x = torch.randn(2, 3, 32, 96)
    restored, _ = checkpoints.load_model(first)
    assert torch.equal(network(x), restored(x))


def test_a_copied_results_folder_uses_its_own_store_and_one_without_it_is_one_line(tmp_path):
    results = tmp_path / "a" / "exp"
    trunk = models.trunk(resnet("head"), "pool")
    features = results / "features" / "features.parquet"
    export.save_trunk(trunk, features, weightstore.location(results))
    copied = tmp_path / "b" / "exp"
    shutil.copytree(results, copied)
    shutil.rmtree(results)  # where the refs say the store was
    state = weightstore.load(export.trunk_path(copied / "features" / "features.parquet"))
    for name, value in trunk.state_dict().items():
        assert torch.equal(value, state[name]), name

    shutil.rmtree(copied / weightstore.STORE_DIR)
    with pytest.raises(BoatrayError, match="weight store") as error:
        weightstore.load(export.trunk_path(copied / "features" / "features.parquet"))
    assert "\n" not in str(error.value)


def test_a_damaged_or_missing_stored_tensor_is_one_line_when_read(tmp_path):
    store = weightstore.location(tmp_path)
    state = {"w": torch.ones(256, 256), "v": torch.zeros(256, 256)}
    file = weightstore.save(state, tmp_path / "w.pt", store, state)
    refs = json.loads(weightstore.refs_path(file).read_text())["tensors"]
    blob = tmp_path / weightstore.STORE_DIR / refs["v"]["sha256"]
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(BoatrayError, match="damaged"):
        weightstore.load(file)
    blob.unlink()  # the store is found (it holds "w"), "v" is not in it
    with pytest.raises(BoatrayError, match="missing"):
        weightstore.load(file)


def test_any_dtype_round_trips_and_without_a_store_the_file_holds_everything(tmp_path):
    state = {"half": torch.randn(200, 200).to(torch.bfloat16), "int": torch.arange(40000),
             "small": torch.ones(3)}
    stored = weightstore.save(state, tmp_path / "s.pt", weightstore.location(tmp_path), state)
    assert set(torch.load(stored, weights_only=True)) == {"small"}
    plain = weightstore.save(state, tmp_path / "p.pt", None, state)
    assert set(torch.load(plain, weights_only=True)) == set(state)
    assert not weightstore.refs_path(plain).exists()
    for file in (stored, plain):
        loaded = weightstore.load(file)
        for name, value in state.items():
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value)


def test_an_exported_model_is_a_weights_file_for_a_new_run(tmp_path):
    results = tmp_path / "exp"
    model, optimizer = with_optimizer("head")
    checkpoint = checkpoints.save_checkpoint(results / "tune" / "t" / "c", model, optimizer,
                                             None, 1, [], META, weightstore.location(results))
    folder = export.export_checkpoint(checkpoint, results / "models" / "run", "finetune")
    again = models.build("resnet18", str(folder / export.WEIGHTS), 4, "avg")
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), again.state_dict()[name].numpy()), name
