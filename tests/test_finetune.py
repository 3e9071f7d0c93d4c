"""Training runs on Ray Train (2 workers, gloo), finetune.py's run folder and predict.py.

The Ray runs are few and shared between tests (module fixtures): each fit() starts a worker
group, which costs 30 to 55 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from boatray import approaches, freezing, models, predict, weightstore
from boatray.config import SyntheticConfig, from_dict
from boatray.data import manifest as manifest_module
from boatray.data import synthetic
from boatray.errors import BoatrayError
from boatray.finetune import __main__ as finetune_cli
from boatray.finetune import checkpoints, loop, sessions, trainer
from boatray.finetune import run as finetune_run
from boatray.results import Layout, proba_of, read_run

SMALL = [32, 96]
METRICS = {"epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy",
           "valid_macro_f1", "lr", "images_per_second", "epoch_seconds",
           "trainable_parameters"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A generated ImageFolder tree of 4 learnable classes at 32x96."""
    cfg = SyntheticConfig(classes=4, train_per_class=30, test_per_class=8,
                          image_size=tuple(SMALL), imbalance=2.0)
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), cfg, seed=0)


@pytest.fixture(scope="module")
def manifest(tree, tmp_path_factory) -> Path:
    return manifest_module.prepare(tree, tmp_path_factory.mktemp("prepared"),
                                   valid_fraction=0.25, seed=0)


def experiment(storage: Path, **train_settings) -> dict:
    """A small 2-worker experiment on CPU (gloo) as a config dict."""
    # library calls, not the CLI: each test keeps its results in its own tmp folder
    return {"name": "tiny", "storage_path": str(storage), "seed": 0,
            "data": {"image_size": SMALL, "valid_fraction": 0.25},
            "model": {"name": "resnet18", "weights": "none"},
            "train": {"epochs": 2, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 1,
                      "loader_workers": 0, "max_failures": 0, **train_settings},
            "baseline": {"image_size": SMALL, "epochs": 4, "lr": 2e-3, "batch_size": 8}}


# ---------------------------------------------------------------- without Ray

def test_baseline_experiment_maps_the_baseline_section_onto_a_training_run(tmp_path):
    exp = from_dict(experiment(tmp_path, scheduler="plateau", class_weighted_loss=True,
                               freeze="last1", num_workers=3, seed=4))
    base = approaches.get("baseline").training(exp)
    assert (base.model.name, base.model.weights) == ("bettercnn", "none")
    assert base.data.image_size == tuple(SMALL)
    assert (base.train.epochs, base.train.lr, base.train.batch_size) == (4, 2e-3, 8)
    assert (base.train.freeze, base.train.scheduler, base.train.class_weighted_loss) == (
        "all", "none", False)
    assert (base.train.num_workers, base.train.seed) == (3, 4)
    assert approaches.get("baseline").run_name(base) == "baseline-bettercnn-r4"
    assert approaches.get("finetune").run_name(exp) == "finetune-last1-lr1e-03-plateau-r4"


def test_finetune_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert finetune_cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"train": {"freez": "fc"}}))
    assert finetune_cli.main(["--config", str(config)]) == 2
    assert "unknown key 'train.freez'" in capsys.readouterr().err


def test_fit_refuses_a_manifest_without_a_valid_split(tmp_path, manifest):
    frame = pd.read_parquet(manifest)
    no_valid = tmp_path / "manifest.parquet"
    frame[frame.split != "valid"].to_parquet(no_valid)
    exp = from_dict(experiment(tmp_path))
    with pytest.raises(BoatrayError, match="no valid images"):
        trainer.fit(exp, no_valid, tmp_path / "run")


def test_fit_refuses_a_freeze_spec_the_model_cannot_take(tmp_path, manifest):
    exp = from_dict({**experiment(tmp_path), "model": {"name": "bettercnn", "weights": "none"}})
    with pytest.raises(BoatrayError, match="bettercnn trains from scratch"):
        trainer.fit(exp, manifest, tmp_path / "run")


def test_predict_cli_reports_a_folder_that_is_not_a_checkpoint(tmp_path, tree, capsys):
    code = predict.main(["--checkpoint", str(tmp_path), "--folder", str(tree / "test"),
                         "--out", str(tmp_path / "p.parquet")])
    assert code == 2
    assert "not a boatray checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- the BetterCNN baseline run

@pytest.fixture(scope="module")
def baseline_run(ray_local, tree, tmp_path_factory) -> Path:
    """`python -m boatray.finetune --baseline` with 2 DDP workers: BetterCNN, 4 epochs."""
    root = tmp_path_factory.mktemp("baseline")
    config = root / "tiny.yaml"
    settings = experiment(root / "results")
    settings["data"]["source"] = str(tree)
    config.write_text(yaml.safe_dump(settings))
    assert finetune_cli.main(["--config", str(config), "--baseline", "--name", "base"]) == 0
    return Layout(root / "results" / "tiny").run("base")


@pytest.mark.slow
def test_bettercnn_learns_with_two_ddp_workers(baseline_run):
    _, run = read_run(baseline_run)
    history = run["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all(METRICS <= set(h) for h in history)
    assert history[-1]["valid_accuracy"] >= 0.7  # chance is 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert run["approach"] == "baseline" and run["config"]["model"]["name"] == "bettercnn"


@pytest.mark.slow
def test_run_folder_has_valid_and_test_predictions_and_run_json(baseline_run, tree):
    predictions, run = read_run(baseline_run)
    frame, classes = manifest_module.read_manifest(
        Path(run["config"]["storage_path"]) / "tiny" / "data")
    expected = frame[frame.split.isin(["valid", "test"])]
    assert sorted(predictions.path) == sorted(expected.path)
    assert predictions.groupby("split").size().to_dict() == (
        expected.groupby("split").size().to_dict())
    assert run["classes"] == classes
    assert np.allclose(proba_of(predictions).sum(axis=1), 1.0)
    test = predictions[predictions.split == "test"]
    assert (test.y_true == test.y_pred).mean() >= 0.7
    assert run["device_seconds"] == pytest.approx(sum(h["epoch_seconds"] for h in run["history"]))
    assert run["wall_seconds"] > run["device_seconds"] > 0
    assert run["images_per_second"] > 0
    checkpoints = sorted(p.name for p in baseline_run.glob("checkpoint_epoch_*"))
    assert checkpoints == ["checkpoint_epoch_0004"]  # the latest is kept
    assert Path(run["checkpoint"]).name == "checkpoint_epoch_0004"


@pytest.mark.slow
def test_predict_cli_on_a_folder_matches_the_run_predictions(baseline_run, tree, tmp_path):
    predictions, run = read_run(baseline_run)
    out = tmp_path / "folder.parquet"
    assert predict.main(["--checkpoint", str(baseline_run), "--folder", str(tree / "test"),
                         "--out", str(out)]) == 0  # a run folder: its latest checkpoint
    folder = pd.read_parquet(out).set_index("path")
    test = predictions[predictions.split == "test"].set_index("path")
    assert sorted(folder.index) == sorted(str(Path(p).resolve()) for p in test.index)
    folder.index = [str(Path(p).resolve()) for p in folder.index]
    folder = folder.loc[test.index]
    classes = run["classes"]
    names = np.array(classes)
    assert (folder.true_class.to_numpy() == names[test.y_true]).all()  # from the folder names
    assert (folder["class"].to_numpy() == names[test.y_pred]).all()
    assert np.allclose(folder[classes].to_numpy(), proba_of(test), atol=1e-6)

    by_uri = predict.predict_checkpoint(  # a storage URI, as on a cluster's shared storage
        "file://" + run["checkpoint"], Path(run["config"]["storage_path"]) / "tiny" / "data",
        ("test",)).set_index("path").loc[test.index]
    assert np.allclose(proba_of(by_uri), proba_of(test), atol=1e-6)


# ---------------------------------------------------------------- gradual unfreezing, resumed

def worker_measuring_replica_spread(config: dict) -> None:
    """train_loop_per_worker, also reporting the largest difference between the ranks' weights
    and buffers seen so far (`replica_spread`; 0 while DDP keeps the replicas identical)."""
    import torch.distributed as dist



    class Measuring(sessions.WorkerSession):
        worst, module = 0.0, None

        def wrap(self, module):
            self.module = module
            return super().wrap(module)

        def report(self, metrics, write):
            state = torch.cat([t.detach().double().flatten()
                               for t in self.module.state_dict().values()
                               if t.is_floating_point()])
            copies = [torch.empty_like(state) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, state)
            self.worst = max(self.worst, *(float((c - state).abs().max()) for c in copies))
            super().report({**metrics, "replica_spread": self.worst}, write)

    loop.train_loop(config, Measuring(config["experiment"]["storage_path"]))


@pytest.fixture(scope="module")
def gradual_runs(ray_local, manifest, tmp_path_factory) -> dict:
    """Gradual unfreezing with 2 DDP workers: 2 epochs (head, then last1: one phase change,
    measuring the replicas), then the same run resumed to 4 epochs by finetune_run.run."""
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    root = tmp_path_factory.mktemp("gradual")
    settings = experiment(root, freeze="gradual", gradual_every=1, optimizer="adamw",
                          weight_decay=0.05, scheduler="plateau", balanced_sampler=True,
                          class_weighted_loss=True)
    run_dir = root / "runs" / "gradual"
    plain = trainer.make_trainer(from_dict(settings), manifest, run_dir.name, str(run_dir.parent))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        first = TorchTrainer(worker_measuring_replica_spread,
                             train_loop_config=plain.train_loop_config,
                             scaling_config=plain.scaling_config,
                             run_config=plain.run_config).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    first_history = checkpoints.read_meta(first.checkpoint.path)["history"]
    settings["train"]["epochs"] = 4
    exp = from_dict(settings)
    finetune_run.run(exp, manifest, run_dir, {"approach": "finetune"})
    return {"exp": exp, "run_dir": run_dir, "first": first, "first_history": first_history}


@pytest.mark.slow
def test_ddp_replicas_stay_identical_across_a_phase_change(gradual_runs):
    metrics = gradual_runs["first"].metrics
    assert metrics["epoch"] == 2 and metrics["replica_spread"] == 0.0


@pytest.mark.slow
def test_resumed_run_continues_from_the_last_checkpoint(gradual_runs):
    _, run = read_run(gradual_runs["run_dir"])
    history = run["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == gradual_runs["first_history"]  # epochs 1-2 were not trained again
    assert checkpoints.read_meta(run["checkpoint"])["epoch"] == 4


@pytest.mark.slow
def test_gradual_unfreezing_changes_the_trainable_set_at_the_right_epochs(gradual_runs):
    exp = gradual_runs["exp"]
    _, run = read_run(gradual_runs["run_dir"])
    model = models.build("resnet18", "none", 4)
    expected = []
    for epoch in range(4):
        freezing.freeze(model, freezing.gradual_schedule(epoch, 1))
        expected.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert [h["trainable_parameters"] for h in run["history"]] == expected
    assert len(set(expected)) == 4  # head, then layer4, layer3, layer2 joined

    torch.manual_seed(exp.train.seed)  # the workers' initial model
    initial = models.build("resnet18", "none", 4).state_dict()
    final = weightstore.load(Path(run["checkpoint"]) / checkpoints.MODEL_FILE)
    for key, value in initial.items():
        if key.startswith(("conv1", "bn1", "layer1")) and "num_batches" not in key:
            assert torch.equal(value, final[key]), f"frozen {key} changed"  # incl. BN stats
        if key.startswith(("layer2", "fc")) and key.endswith("weight"):
            assert not torch.equal(value, final[key]), f"{key} did not train"


# ---------------------------------------------------------------- a worker's bad input

@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1], ids=["worker-group", "trial-process"])
def test_a_corrupt_image_is_a_one_line_error(ray_local, manifest, tmp_path, workers):
    frame = pd.read_parquet(manifest)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    frame.loc[frame.index[frame.split == "train"][0], "path"] = str(broken)
    corrupt = tmp_path / "manifest.parquet"
    frame.to_parquet(corrupt)
    exp = from_dict(experiment(tmp_path, epochs=1, num_workers=workers))
    with pytest.raises(BoatrayError, match="cannot decode image .*broken.jpg") as error:
        trainer.fit(exp, corrupt, tmp_path / "run")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- one worker: a trial's process

@pytest.fixture(scope="module")
def trial_runs(ray_local, manifest, tmp_path_factory) -> dict:
    """A 1-worker run (on this one-node CPU cluster: in this process, no Tune experiment) of 1
    epoch, then the same run resumed to 2 epochs by finetune_run.run."""
    root = tmp_path_factory.mktemp("trial")
    settings = experiment(root, num_workers=1, epochs=1, freeze="last1")
    run_dir = root / "runs" / "single"
    first = trainer.fit(from_dict(settings), manifest, run_dir)
    first_meta = checkpoints.read_meta(first.checkpoint.path)
    settings["train"]["epochs"] = 2
    finetune_run.run(from_dict(settings), manifest, run_dir, {"approach": "finetune"})
    return {"run_dir": run_dir, "first": first, "first_meta": first_meta}


@pytest.mark.slow
def test_a_one_worker_run_trains_here_without_tune_and_resumes(trial_runs):
    first = trial_runs["first"]
    assert first.metrics["epoch"] == 1 and METRICS <= set(first.metrics)
    assert Path(first.checkpoint.path).parent == trial_runs["run_dir"]  # no trial folder
    assert not list(trial_runs["run_dir"].glob("experiment_state*"))  # no Tune experiment
    _, run = read_run(trial_runs["run_dir"])
    history = run["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[:1] == trial_runs["first_meta"]["history"]  # epoch 1 was not trained again
    assert checkpoints.read_meta(run["checkpoint"])["epoch"] == 2
    latest = checkpoints.latest_checkpoint(trial_runs["run_dir"])
    assert Path(latest) == Path(run["checkpoint"])
    with predict.local_checkpoint(trial_runs["run_dir"]) as directory:  # a run folder
        assert directory == Path(run["checkpoint"])


class CrashOnce(sessions.TrialSession):
    """A trial session whose process dies right after its first checkpoint, once."""

    def __init__(self, marker: Path, storage_path: str) -> None:
        super().__init__(torch.device("cpu"), storage_path)
        self.marker = marker

    def report(self, metrics, write):
        super().report(metrics, write)
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)


def crashing_trial(_: dict, config: dict, marker: str) -> None:
    loop.train_loop(config, CrashOnce(Path(marker), config["experiment"]["storage_path"]))


@pytest.mark.slow
def test_tune_retries_a_killed_trial_from_its_last_checkpoint(ray_local, manifest, tmp_path):
    from ray import cloudpickle, tune

    exp = from_dict(experiment(tmp_path, num_workers=1, epochs=2, max_failures=1))
    config = loop.loop_config(exp, manifest, None, stops=[1])  # epoch 1 ends with a checkpoint
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = tune.Tuner(
            tune.with_resources(tune.with_parameters(
                crashing_trial, config=config, marker=str(tmp_path / "crashed")),
                trainer.worker_resources(exp.train)),
            run_config=tune.RunConfig(  # Tune wants an absolute path; tmp_path is one
                name="retried", storage_path=str(tmp_path), verbose=0,
                failure_config=tune.FailureConfig(max_failures=exp.train.max_failures))).fit()[0]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "crashed").exists() and result.error is None
    assert result.metrics_dataframe["epoch"].tolist() == [1, 2]  # epoch 1 ran once
    assert [h["epoch"] for h in checkpoints.read_meta(result.checkpoint.path)["history"]] == [1, 2]


def test_a_run_without_workers_trains_here_and_resumes(manifest, tmp_path):
    """train.num_workers 0: the loop in this process, no Ray; checkpoints in the run folder."""
    settings = experiment(tmp_path, num_workers=0, epochs=1, freeze="head", cache_prefix=False)
    first = trainer.fit(from_dict(settings), manifest, tmp_path / "run")
    settings["train"]["epochs"] = 2
    second = trainer.fit(from_dict(settings), manifest, tmp_path / "run")
    assert (first.metrics["epoch"], second.metrics["epoch"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_epoch_0002"]
    history = checkpoints.read_meta(second.checkpoint.path)["history"]
    assert history[0] == first.metrics


def test_a_run_restored_after_its_last_epoch_keeps_its_frozen_trunk_in_the_store(manifest,
                                                                                 tmp_path):
    settings = experiment(tmp_path, num_workers=0, epochs=1, freeze="head", cache_prefix=False)
    trainer.fit(from_dict(settings), manifest, tmp_path / "run")
    again = trainer.fit(from_dict(settings), manifest, tmp_path / "run")  # reports it again
    refs = weightstore.refs_path(Path(again.checkpoint.path) / checkpoints.MODEL_FILE)
    assert "layer4.1.conv2.weight" in json.loads(refs.read_text())["tensors"]
