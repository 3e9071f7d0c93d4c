"""The frozen-prefix cache: when it is used, its key, exactness, reuse, and its checkpoints.

The training runs are in-process (`train.num_workers=0`: sessions.LocalSession) on a tiny
generated set, so they cost seconds; the caches of so few images are computed by the features
pipeline in process (pipeline.runs_here); one run with 2 DDP workers proves the cached path
under Ray Train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from boatray import cachedir, freezing, models, precision, predict
from boatray.config import SyntheticConfig, from_dict
from boatray.data import manifest as manifest_module
from boatray.data import synthetic
from boatray.features import featurefile, pipeline
from boatray.finetune import checkpoints, engine, loop, prefix_cache, trainer, tuning
from boatray.finetune import run as finetune_run
from boatray.results import proba_of

SIZE = [32, 96]
CLASSES = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """4 classes of 12 generated training images at 32x96: 36 train, 12 valid."""
    root = tmp_path_factory.mktemp("cache-data")
    tree = synthetic.generate(root / "images", SyntheticConfig(
        classes=CLASSES, train_per_class=12, test_per_class=2, image_size=tuple(SIZE),
        imbalance=1.0), seed=0)
    return manifest_module.prepare(tree, root / "data", valid_fraction=0.25, seed=0)


def settings(storage: Path, **train_settings) -> dict:
    """An in-process run (num_workers 0) of resnet18 with random weights, SGD, 2 epochs, fp32."""
    # library calls, not the CLI: each test keeps its results in its own tmp folder; fp32
    # (amp false, not bf16 on a CPU that has it): the paths are compared at float32 precision
    return {"name": "cache", "storage_path": str(storage), "seed": 0,
            "data": {"image_size": SIZE},
            "model": {"name": "resnet18", "weights": "none"},
            "features": {"num_actors": 1, "cpus_per_actor": 0.5, "batch_size": 16,
                         "amp": False},
            "train": {"epochs": 2, "batch_size": 12, "optimizer": "sgd", "lr": 0.01,
                      "num_workers": 0, "loader_workers": 0, "max_failures": 0, "amp": False,
                      **train_settings}}


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return models.build("resnet18", "none", CLASSES).state_dict()


def suffix_keys(state: dict, cut: str) -> set[str]:
    """The state-dict keys of the stages after `cut` (the trained suffix)."""
    cuts = models.cut_points("resnet18")
    trained = {"fc", *cuts[cuts.index(cut) + 1:]}
    return {k for k in state if k.split(".")[0] in trained}


# ---------------------------------------------------------------- without Ray

def test_the_cache_is_used_only_for_a_frozen_prefix_without_augmentation(tmp_path):
    def stage(**overrides) -> tuple[str | None, str]:
        raw = settings(tmp_path)
        raw["train"].update(overrides.pop("train", {}))
        raw["data"].update(overrides.pop("data", {}))
        return prefix_cache.cached_stage(from_dict(raw))

    assert stage(train={"freeze": "head"})[0] == "pool"
    assert stage(train={"freeze": "last1"})[0] == "layer3"
    assert stage(train={"freeze": "last4"})[0] == "stem"
    for overrides, why in [({"train": {"freeze": "head", "cache_prefix": False}}, "cache_prefix"),
                           ({"train": {"freeze": "head"}, "data": {"augment": True}}, "augment"),
                           ({"train": {"freeze": "all"}}, "no stage frozen"),
                           ({"train": {"freeze": "gradual"}}, "gradual")]:
        found, reason = stage(**overrides)
        assert found is None and why in reason


def test_the_key_names_everything_the_activations_depend_on(tmp_path, manifest):
    frame, _ = manifest_module.read_manifest(manifest)
    rows = prefix_cache.cached_rows(frame)
    assert set(rows.split) == {"train", "valid"}

    def key(weights="none", seed=0, stage="layer3", rows=rows, **data) -> str:
        raw = settings(tmp_path, seed=seed)
        raw["model"]["weights"] = weights
        raw["data"].update(data)
        return prefix_cache.cache_key(from_dict(raw), rows, stage)

    base = key()
    assert base.startswith("resnet18-layer3-32x96-") and key() == base
    raw = settings(tmp_path)
    raw["model"]["name"] = "timm/resnet18"  # one folder, not timm/...
    assert prefix_cache.cache_key(from_dict(raw), rows, "pool").startswith("timm-resnet18-pool-")
    assert len({base, key(seed=1), key(stage="pool"), key(image_size=[64, 96]),
                key(rows=rows.iloc[1:])}) == 5
    weights = tmp_path / "w.pt"
    torch.save(initial_state(), weights)
    pretrained = key(weights=str(weights))
    assert key(weights=str(weights), seed=1) == pretrained  # the seed only moves random inits
    torch.save({k: v + 1 for k, v in initial_state().items()}, weights)
    assert key(weights=str(weights)) != pretrained  # a weights file by its content


def test_the_key_names_the_device_and_compute_dtype_that_extract_it(tmp_path, manifest,
                                                                    monkeypatch):
    """A cache made in fp32 on a CPU is not reused by a bf16 run (a GPU's, or a CPU's with
    native bf16), nor the reverse; `amp: auto` is keyed by what it computes in."""
    rows = prefix_cache.cached_rows(manifest_module.read_manifest(manifest)[0])

    def key(use_gpu: bool, amp: bool | str) -> str:
        raw = settings(tmp_path)
        raw["features"].update(use_gpu=use_gpu, amp=amp)
        return prefix_cache.cache_key(from_dict(raw), rows, "layer3")

    for found in ("AVX512-BF16", None):
        monkeypatch.setattr(precision, "cpu_bf16", lambda found=found: found)
        assert key(False, "auto") == key(False, found is not None)
    assert len({key(False, False), key(False, True), key(True, False), key(True, True)}) == 4
    assert key(True, "auto") == key(True, True)  # bf16 on GPUs


def test_a_cache_that_would_not_fit_on_the_disk_is_not_computed(tmp_path, manifest,
                                                                 monkeypatch, capsys):
    monkeypatch.setattr(prefix_cache, "_compute", lambda *args: pytest.fail("computed"))
    monkeypatch.setattr(cachedir.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 10**5, 10**5))
    exp = from_dict(settings(tmp_path, freeze="last1"))
    assert prefix_cache.prepare(exp, manifest) is None  # 48 x 256x2x6 float16 = 0.3 MB
    assert "not used: its layer3 activations need" in capsys.readouterr().out


def test_a_cache_that_would_not_pay_is_not_computed(tmp_path, manifest, monkeypatch, capsys):
    """layer3 of resnet18 (freeze last2) saves about a quarter of an epoch's FLOPs: below the
    default train.cache_min_speedup; the prefix of last1 saves more than half."""
    by_spec = {spec: prefix_cache.estimated_speedup(
        from_dict(settings(tmp_path, freeze=spec)), freezing.frozen_prefix("resnet18", spec),
        CLASSES) for spec in ("head", "last1", "last2")}
    assert by_spec["head"] > 1000 and by_spec["last1"] > 2 > by_spec["last2"] > 1.2
    monkeypatch.setattr(prefix_cache, "_compute", lambda *args: pytest.fail("computed"))
    assert prefix_cache.prepare(from_dict(settings(tmp_path, freeze="last2")), manifest) is None
    assert (f"not used: training from layer2's activations would make an epoch about "
            f"{by_spec['last2']:.2f}x faster (by FLOPs), below train.cache_min_speedup=1.5"
            ) in capsys.readouterr().out
    computed = []  # the threshold lowered: the layer2 cache is computed
    monkeypatch.setattr(prefix_cache, "_compute", lambda found, *rest: computed.append(
        found.stage) or {"images": {"train": len(found.rows)}, "seconds": 1.0, "bytes": 1})
    assert prefix_cache.prepare(from_dict(settings(tmp_path, freeze="last2",
                                                   cache_min_speedup=1.0)), manifest)
    assert computed == ["layer2"]


def test_the_sweep_computes_one_cache_per_frozen_prefix_and_seed(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(prefix_cache, "plan", lambda exp, manifest: asked.append(
        (exp.train.freeze, exp.train.seed)) or exp.train)
    monkeypatch.setattr(prefix_cache, "ensure", lambda train, features: (
        f"{train.freeze}-{train.seed}"))
    raw = settings(tmp_path)
    raw["features"]["enabled"] = False  # no shared features to extract first
    raw["seed"] = 5
    raw["sweep"] = {"freeze": ["head", "last1", "all"], "lr": [0.1, 0.01], "repeats": 2}
    caches = tuning.sweep_caches(from_dict(raw), tmp_path / "manifest.parquet")
    assert sorted(asked) == sorted((f, s) for f in ("head", "last1", "all") for s in (5, 6))
    assert caches["last1/1"] == "last1-6" and len(caches) == 6


def test_training_on_decoded_images_trains_the_weights_of_decoding_every_epoch(
        manifest, tmp_path, monkeypatch, capsys):
    """The decoded-image cache feeds the loop the same pixels in the same batches as decoding
    the JPEGs every epoch, read from one build per node (in `engine.DECODED_ROOT`)."""
    monkeypatch.setattr(engine, "DECODED_ROOT", tmp_path / "decoded")
    save, states = checkpoints.save_checkpoint, {}

    def keep(directory, module, *rest):
        states[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return save(directory, module, *rest)

    monkeypatch.setattr(loop, "save_checkpoint", keep)
    for name, decoded in (("jpeg", False), ("decoded", True)):
        exp = from_dict(settings(tmp_path / "results", freeze="last1", cache_prefix=False,
                                 cache_decoded=decoded, epochs=1))
        trainer.fit(exp, manifest, tmp_path / "runs" / name)
    assert "[cache] decoded 48 images at 32x96 once" in capsys.readouterr().out
    assert len(list((tmp_path / "decoded").glob("decoded-32x96-*/train.npy"))) == 1
    start = initial_state()
    assert relative_change(states["decoded"], states["jpeg"], start,
                           suffix_keys(start, "layer3")) < 1e-3


def test_one_trunk_pass_serves_the_svm_and_every_cache_of_its_trunk(tmp_path, manifest,
                                                                    monkeypatch, capsys):
    """The sweep extracts the experiment's pooled features with the last1 cache's activations
    in one pass and reads the head trials' cache from the features; a repeat with other random
    weights computes its own caches. A cache filled by that pass holds what a pass of its own
    computes."""
    passes = []
    original = pipeline.trunk_batches
    monkeypatch.setattr(pipeline, "trunk_batches", lambda rows, *a: (
        passes.append(len(rows)), original(rows, *a))[1])
    raw = settings(tmp_path / "results")
    raw["sweep"] = {"freeze": ["head", "last1", "all"], "repeats": 2}
    exp = from_dict(raw)
    caches = tuning.sweep_caches(exp, manifest)
    # the features and the layer3 cache of every image; repeat 1's own trunks (seed 1)
    assert passes == [56, 48, 48]
    assert ("[cache] one pass over the images: the pool features (for the approaches on "
            "features), the layer3, pool "
            "activations of the head, last1 trials and of the selected runs' evaluation"
            ) in capsys.readouterr().out
    x, table = featurefile.read_features(exp.layout.features)
    assert featurefile.feature_info(exp.layout.features)["extraction"]["also_emitted"] == [
        "layer3", "pool"]  # the layer3 cache, both evaluation caches
    folder, info = prefix_cache.open_cache(caches["head/0"])
    assert info["from_features"] == str(exp.layout.features)
    for split in ("train", "valid"):
        cached = np.load(folder / f"{split}.npy")
        np.testing.assert_array_equal(cached, x[(table.split == split).to_numpy()].astype(
            prefix_cache.DTYPE))
    joint, info = prefix_cache.open_cache(caches["last1/0"])
    assert info["one_pass_with"] == str(exp.layout.features)
    alone = from_dict({**raw, "storage_path": str(tmp_path / "alone")})  # a pass of its own
    own = prefix_cache.prepare(tuning.trial_experiment(alone, {
        "freeze": "last1", "lr": 0.01, "scheduler": "none", "repeat": 0}), manifest)
    for split in ("train", "valid"):
        np.testing.assert_allclose(np.load(joint / f"{split}.npy").astype(np.float32),
                                   np.load(Path(own) / f"{split}.npy").astype(np.float32),
                                   rtol=2e-3, atol=1e-3)
    assert caches["all/0"] is None and caches["head/1"] != caches["head/0"]
    assert caches["last1/1"] != caches["last1/0"]
    frame, _ = manifest_module.read_manifest(manifest)
    for freeze, cut in (("head", "pool"), ("last1", "layer3")):  # the selected runs' inputs
        trial = tuning.trial_experiment(exp, {"freeze": freeze, "lr": 0.01, "scheduler": "none",
                                              "repeat": 0})
        folder, info = prefix_cache.open_cache(prefix_cache.evaluation_cache(trial, frame))
        assert (info["stage"], info["dtype"], info["images"]) == (
            cut, "float32", {"valid": 12, "test": 8})
    assert prefix_cache.evaluation_cache(tuning.trial_experiment(exp, {
        "freeze": "head", "lr": 0.01, "scheduler": "none", "repeat": 1}), frame) is None


# ---------------------------------------------------------------- in-process runs

@pytest.fixture(scope="module")
def runs(ray_local, manifest, tmp_path_factory) -> dict:
    """Final states (and last metrics) of in-process runs, cached and on images."""
    root = tmp_path_factory.mktemp("cache-runs")
    save, saved, out = checkpoints.save_checkpoint, {}, {}

    def keep(directory, module, *rest):
        saved["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return save(directory, module, *rest)

    plan = [("head-images", "head", False, "float16"), ("head-cached", "head", True, "float16"),
            ("last1-images", "last1", False, "float16"),
            ("last1-cached", "last1", True, "float16"),
            ("last1-cached-float32", "last1", True, "float32")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", keep)
        for name, freeze, cache, dtype in plan:
            patch.setattr(prefix_cache, "DTYPE", dtype)
            exp = from_dict(settings(root / "results", freeze=freeze, cache_prefix=cache))
            result = trainer.fit(exp, manifest, root / "runs" / name)
            out[name] = {"state": saved.pop("state"), "metrics": result.metrics, "exp": exp}
    return out


def relative_change(ours: dict, theirs: dict, start: dict, keys: set[str]) -> float:
    """The largest |ours - theirs| over the keys, per tensor relative to |theirs - start|."""
    worst = 0.0
    for key in keys:
        if ours[key].is_floating_point():
            moved = (theirs[key] - start[key]).norm()
            assert moved > 0, f"{key} did not train"
            worst = max(worst, float((ours[key] - theirs[key]).norm() / moved))
    return worst


@pytest.mark.slow
def test_the_cached_path_trains_exactly_the_uncached_weights(runs):
    """With float32 storage, training from cached layer3 maps equals training on images:
    same initial model, batches, BatchNorm modes and updates; the prefix never changes."""
    start = initial_state()
    cached, images = runs["last1-cached-float32"]["state"], runs["last1-images"]["state"]
    trained = suffix_keys(start, "layer3")
    assert relative_change(cached, images, start, trained) < 1e-3
    for key in set(start) - trained:  # the frozen prefix, BatchNorm statistics included
        assert torch.equal(cached[key], start[key]) and torch.equal(images[key], start[key])


@pytest.mark.slow
def test_a_float16_cache_trains_nearly_the_same_weights(runs):
    """fp16 rounding of the cached inputs: tiny for the head on pooled features; for layer4 of
    a randomly initialised net it moves each step's gradients by about 5% (the exact float32
    path is tested above), so the tolerance is wider there."""
    start = initial_state()
    fc = relative_change(runs["head-cached"]["state"], runs["head-images"]["state"], start,
                         suffix_keys(start, "pool"))
    layer4 = relative_change(runs["last1-cached"]["state"], runs["last1-images"]["state"],
                             start, suffix_keys(start, "layer3"))
    assert fc < 1e-2 and layer4 < 0.25
    for spec in ("head", "last1"):
        ours, theirs = runs[f"{spec}-cached"]["metrics"], runs[f"{spec}-images"]["metrics"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.05)


@pytest.mark.slow
def test_a_second_run_reuses_the_cache(runs, manifest, monkeypatch, capsys):
    def computing(*args):
        raise AssertionError("the cache was computed again")

    monkeypatch.setattr(prefix_cache, "_compute", computing)
    exp = runs["last1-cached"]["exp"]
    where = prefix_cache.prepare(exp, manifest)
    assert "training from cached layer3 activations" in capsys.readouterr().out
    folder, info = prefix_cache.open_cache(where)
    assert folder == Path(where) and info["stage"] == "layer3" and info["dtype"] == "float16"
    assert info["images"] == {"train": 36, "valid": 12}
    assert np.load(folder / "train.npy", mmap_mode="r").shape == (36, 256, 2, 6)
    assert not list(folder.parent.glob(".*.tmp"))  # no unfinished folders left behind


@pytest.mark.slow
@pytest.mark.parametrize("name", ["head-cached", "last1-cached"])
def test_predictions_from_the_evaluation_cache_equal_those_from_images(runs, manifest, name):
    exp = runs[name]["exp"]
    frame, _ = manifest_module.read_manifest(manifest)
    found = prefix_cache.evaluation_plan(prefix_cache.plan(exp, manifest), frame)
    where = prefix_cache.ensure(found)
    assert prefix_cache.evaluation_cache(exp, frame) == where
    checkpoint = checkpoints.latest_checkpoint(Path(exp.storage_path).parent / "runs" / name)
    cached = finetune_run.predict_cached(checkpoint, str(manifest), where, exp.train)
    images = predict.predict_checkpoint(checkpoint, manifest, ("valid", "test"),
                                        amp=exp.train.amp)
    assert cached[["path", "split", "y_true", "y_pred"]].equals(
        images[["path", "split", "y_true", "y_pred"]])
    np.testing.assert_allclose(proba_of(cached), proba_of(images), atol=1e-5)


@pytest.mark.slow
def test_a_remote_cache_is_read_from_one_local_copy(runs, manifest, tmp_path, monkeypatch):
    exp = runs["head-cached"]["exp"]
    frame, _ = manifest_module.read_manifest(manifest)
    key = prefix_cache.cache_key(exp, prefix_cache.cached_rows(frame), "pool")
    shared = Path(prefix_cache.location(exp, key))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # this node's local folder
    folder, info = prefix_cache.open_cache(f"file://{shared}")
    assert folder.is_relative_to(tmp_path) and info["stage"] == "pool"
    for split in prefix_cache.SPLITS:
        assert np.array_equal(np.load(folder / f"{split}.npy"), np.load(shared / f"{split}.npy"))
    assert prefix_cache.open_cache(f"file://{shared}")[0] == folder


# ---------------------------------------------------------------- under Ray Train

@pytest.mark.slow
def test_a_cached_run_with_two_workers_saves_a_model_that_predicts_images(
        runs, manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prefix_cache, "_compute", lambda *args: pytest.fail("recomputed"))
    raw = settings(Path(runs["last1-cached"]["exp"].storage_path), freeze="last1",
                   num_workers=2, cpus_per_worker=1, epochs=1)
    exp = from_dict(raw)
    result = trainer.fit(exp, manifest, tmp_path / "run")
    assert "training from cached layer3 activations" in capsys.readouterr().out
    meta = json.loads((Path(result.checkpoint.path) / checkpoints.META_FILE).read_text())
    assert meta["prefix_cache"] and "layer3" in meta["prefix_cache"]

    frame, _ = manifest_module.read_manifest(manifest)
    on_images = predict.predict_checkpoint(result.checkpoint.path, manifest, ("valid",))
    model, _ = checkpoints.load_model(result.checkpoint.path)
    folder, _ = prefix_cache.open_cache(meta["prefix_cache"])
    cached = torch.from_numpy(np.load(folder / "valid.npy")).float()
    with torch.inference_mode():
        proba = torch.softmax(models.suffix(model, "layer3").eval()(cached).double(), 1)
    valid = frame[frame.split == "valid"]
    assert on_images.path.tolist() == valid.path.tolist()
    assert np.allclose(proba_of(on_images), proba.numpy(), atol=0.02)
