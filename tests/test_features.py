"""features/pipeline.py: Ray Data extraction equals a plain loop; failures reported; the heads
on the features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boatray import approaches, models
from boatray.config import ProbeConfig, SvmConfig, SyntheticConfig
from boatray.data import synthetic
from boatray.data.images import decode_batch, normalize, to_chw
from boatray.data.manifest import prepare, read_manifest
from boatray.features import __main__ as features_cli
from boatray.features import featurefile, pipeline
from boatray.results import PROBA_PREFIX, read_run

SIZE = (32, 96)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A generated set's manifest with one test image broken after preparation, and a
    resnet18 state-dict file (random weights, seeded)."""
    root = tmp_path_factory.mktemp("features")
    tree = synthetic.generate(root / "images", SyntheticConfig(
        classes=4, train_per_class=16, test_per_class=6, image_size=SIZE, imbalance=2.0), 0)
    manifest = prepare(tree, root / "data", valid_fraction=0.25, seed=0)
    frame, classes = read_manifest(manifest)
    broken = frame.path[frame.split == "test"].iloc[0]
    Path(broken).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    torch.manual_seed(0)
    weights = root / "resnet18.pt"
    torch.save(models.build("resnet18", num_classes=len(classes)).state_dict(), weights)
    return {"root": root, "manifest": manifest, "frame": frame, "classes": classes,
            "broken": broken, "weights": weights}


@pytest.fixture(scope="module")
def extracted(dataset, ray_local):
    """`python -m boatray.features` (in-process) with two CPU actors."""
    out = dataset["root"] / "out" / "features.parquet"
    code = features_cli.main([
        "--manifest", str(dataset["manifest"]), "--out", str(out),
        "--set", "model.name=resnet18", "--set", f"model.weights={dataset['weights']}",
        "--set", f"data.image_size=[{SIZE[0]}, {SIZE[1]}]", "--set", "features.batch_size=8",
        "--set", "features.num_actors=2", "--set", "features.cpus_per_actor=0.5",
        # fp32 (not bf16 on a CPU that has it): the features are compared with an fp32 loop
        "--set", "features.amp=false"])
    assert code == 0
    return out


def test_ray_data_features_equal_a_plain_loop(dataset, extracted):
    x, frame = featurefile.read_features(extracted)
    kept = dataset["frame"][dataset["frame"].path != dataset["broken"]]
    assert frame.path.tolist() == kept.path.tolist()  # every good image, in manifest order
    assert frame.label_idx.tolist() == kept.label_idx.tolist()
    assert frame.split.tolist() == kept.split.tolist()
    model = models.build("resnet18", str(dataset["weights"]), len(dataset["classes"]))
    trunk = models.trunk(model, "pool").eval()
    with torch.inference_mode():
        expected = trunk(normalize(to_chw(decode_batch(frame.path.tolist(), SIZE)))).numpy()
    assert x.shape == (len(kept), 512) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


def test_an_image_that_fails_to_decode_is_reported(dataset, extracted, capsys):
    stats = json.loads(featurefile.stats_path(extracted).read_text())
    assert [f["path"] for f in stats["failed"]] == [dataset["broken"]]
    assert "cannot decode image" in stats["failed"][0]["error"]
    assert stats["images"] == len(dataset["frame"]) - 1 and stats["images_per_second"] > 0
    assert 0 < stats["first_batch_images"] <= 8 and 0 < stats["startup_seconds"] < stats["seconds"]
    assert stats["steady_images_per_second"] > 0  # start-up apart from the steady state
    assert stats["decode_images_per_second_per_cpu"] > stats["steady_images_per_second"] / 2
    info = featurefile.feature_info(extracted)
    assert info["classes"] == dataset["classes"] and info["shape"] == [512]
    assert info["extraction"]["failed"] == stats["failed"]


def test_svm_on_the_features_beats_chance_widely(dataset, extracted, tmp_path):
    svm_dir = approaches.get("svm").fit_file(extracted, tmp_path / "svm", SvmConfig(C=[1.0, 10.0]))
    probe_dir = approaches.get("probe").fit_file(extracted, tmp_path / "probe",
                                                 ProbeConfig(C=[0.1]))
    for run_dir in (svm_dir, probe_dir):
        predictions, record = read_run(run_dir)
        test = predictions[predictions.split == "test"]
        majority = np.bincount(test.y_true).max() / len(test)
        assert (test.y_true == test.y_pred).mean() >= max(0.8, majority + 0.3), run_dir.name
        assert list(predictions.columns[4:]) == [PROBA_PREFIX + c for c in dataset["classes"]]
        assert record["skipped_images"][0]["path"] == dataset["broken"]
        assert record["images_per_second"] > 0 and record["extraction_seconds"] > 0


def test_trunk_runner_gives_stage_maps_in_float16(dataset, tmp_path, ray_local):
    """The frozen-prefix cache's format: any cut point, fp16, shape kept in the metadata."""
    model = models.build("resnet18", str(dataset["weights"]), 4)
    trunk = models.trunk(model, "layer3")
    shape = pipeline.output_shape(trunk, SIZE)
    paths = dataset["frame"].path[:3].to_numpy()
    batch = pipeline.decode_rows({"path": np.append(paths, "/missing.jpg"),
                                  "label_idx": np.arange(4), "split": np.array(["train"] * 4)},
                                 SIZE)
    out = pipeline.TrunkRunner([ray_local.put(trunk)], False, False, True, 1, "float16")(batch)
    assert out["features"].dtype == np.float16 and out["features"].shape == (4, np.prod(shape))
    meta = {"classes": ["a"], "shape": list(shape), "dtype": "float16"}
    written, failed = featurefile.write_features([out], tmp_path / "maps.parquet", meta)
    assert written == 3 and failed[0]["path"] == "/missing.jpg"
    x, frame = featurefile.read_features(tmp_path / "maps.parquet")
    assert x.shape == (3, *shape) == (3, 256, 2, 6) and x.dtype == np.float16
    with torch.inference_mode():
        expected = trunk(normalize(to_chw(decode_batch(list(paths), SIZE)))).numpy()
    np.testing.assert_allclose(x.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_trunk_runner_falls_back_to_eager_when_compiling_fails(dataset, ray_local, monkeypatch,
                                                                 capsys):
    """features.compile on a node where torch.compile cannot work: one line, eager results."""
    trunk = models.trunk(models.build("resnet18", str(dataset["weights"]), 4), "pool")

    def broken_compile(module, options):
        assert options == {"freezing": True}

        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nlong traceback")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    paths = dataset["frame"].path[:2].to_numpy()
    batch = pipeline.decode_rows({"path": paths, "label_idx": np.arange(2),
                                  "split": np.array(["train"] * 2)}, SIZE)
    runner = pipeline.TrunkRunner([ray_local.put(trunk)], False, False, True, 1, "float32",
                                  compile=True)
    out = runner(batch)
    assert "torch.compile failed (RuntimeError: no C++ compiler found); running eager" in (
        capsys.readouterr().out)
    assert runner.trunk is runner.eager
    with torch.inference_mode():
        expected = trunk.eval()(normalize(to_chw(decode_batch(list(paths), SIZE)))).flatten(1)
    np.testing.assert_allclose(out["features"], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_compiled_trunk_gives_the_eager_features(dataset, ray_local):
    """features.compile (torch.compile with inductor freezing) changes speed, not features."""
    trunk = models.trunk(models.build("resnet18", str(dataset["weights"]), 4), "pool")
    paths = dataset["frame"].path[:4].to_numpy()
    batch = pipeline.decode_rows({"path": paths, "label_idx": np.arange(4),
                                  "split": np.array(["train"] * 4)}, SIZE)
    runs = {compiled: pipeline.TrunkRunner([ray_local.put(trunk)], False, False, True, None,
                                           "float32", compile=compiled)(batch)["features"]
            for compiled in (False, True)}
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-3, atol=1e-3)
