"""The training engine without Ray (finetune/engine.py, freezing.py, checkpoints.py): epochs,
freezing, evaluation, samplers, schedules, checkpoints, trainer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from boatray import freezing, models
from boatray.config import TrainConfig, from_dict
from boatray.finetune import checkpoints, engine, trainer

CPU = torch.device("cpu")
SMALL = (32, 96)
CLASSES = 4


def image_loader(count: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Random uint8 images and labels, as the ImageDataset loader yields them."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 3, *SMALL), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % CLASSES
    return DataLoader(TensorDataset(pixels, labels), batch_size=batch_size)


def stage_of(name: str) -> str:
    head = name.split(".")[0]
    return "stem" if head in ("conv1", "bn1") else head


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", ["head", "last1", "last2", "last3", "last4", "all"])
def test_each_freeze_spec_trains_exactly_its_stages(spec):
    torch.manual_seed(0)
    model = models.build("resnet18", "none", CLASSES)
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, lr_decay=0.5)
    optimizer = engine.optimizer_over_all_stages(model, cfg)
    freezing.freeze(model, spec)
    before = snapshot(model)

    engine.train_one_epoch(model, image_loader(), nn.CrossEntropyLoss(), optimizer, CPU)

    stages = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
    trainable = set(stages[freezing.GRADUAL[::-1].index(spec):])
    after = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    assert freezing.trainable_names(model) == {n for n in params if stage_of(n) in trainable}
    for key, value in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        if stage_of(key) in trainable:
            assert not torch.equal(value, after[key]), f"{key} did not train under {spec}"
        else:  # frozen weights and frozen BatchNorm statistics: bit-identical
            assert torch.equal(value, after[key]), f"{key} changed under {spec}"


def test_unfreezing_keeps_the_optimizer_and_its_state():
    torch.manual_seed(0)
    model = models.build("resnet18", "none", CLASSES)
    optimizer = engine.optimizer_over_all_stages(model, TrainConfig(lr=1e-3, lr_decay=0.1))
    freezing.freeze(model, "head")
    engine.train_one_epoch(model, image_loader(), nn.CrossEntropyLoss(), optimizer, CPU)
    head_state = {k: v.clone() for k, v in optimizer.state[model.fc.weight].items()}
    assert not optimizer.state[model.layer4[0].conv1.weight]

    freezing.freeze(model, "last1")
    engine.train_one_epoch(model, image_loader(), nn.CrossEntropyLoss(), optimizer, CPU)
    assert optimizer.state[model.fc.weight]["step"] == head_state["step"] + 2
    assert optimizer.state[model.layer4[0].conv1.weight]["step"] == 2
    assert {g["stage"]: g["lr"] for g in optimizer.param_groups}["layer4"] == pytest.approx(1e-4)


def test_evaluate_equals_sklearn_and_passes_float_features_through():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(50, CLASSES, generator=generator)
    labels = torch.randint(0, CLASSES, (50,), generator=generator)
    loader = DataLoader(TensorDataset(features, labels), batch_size=7)
    criterion = nn.CrossEntropyLoss()

    metrics = engine.evaluate(nn.Identity(), loader, criterion, CPU)

    predicted = features.argmax(1).numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert metrics["loss"] == pytest.approx(criterion(features, labels).item(), rel=1e-6)


def test_class_weights_are_inverse_frequency():
    labels = [0] * 6 + [1] * 3 + [3] * 1
    weights = engine.class_weights(labels, 4).numpy()
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=np.array(labels))
    assert weights[[0, 1, 3]] == pytest.approx(expected)
    assert weights[2] == 0.0


def test_shard_sampler_splits_one_seeded_order_between_ranks():
    shares = [list(engine.ShardSampler(10, rank, 3, seed=5)) for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]  # padded: DDP needs equal batch counts
    assert set(sum(shares, [])) == set(range(10))
    again = [list(engine.ShardSampler(10, rank, 3, seed=5)) for rank in range(3)]
    assert again == shares
    later = engine.ShardSampler(10, 0, 3, seed=5)
    later.set_epoch(1)
    assert list(later) != shares[0]

    unpadded = [list(engine.ShardSampler(10, r, 3, shuffle=False, pad=False)) for r in range(3)]
    assert sorted(sum(unpadded, [])) == list(range(10))
    assert [len(engine.ShardSampler(10, r, 3, pad=False)) for r in range(3)] == [4, 3, 3]


def test_class_balanced_sampler_draws_classes_evenly_across_ranks():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    weights = engine.class_weights(labels, 3)[labels].tolist()
    drawn = []
    for epoch in range(10):
        for rank in range(2):
            sampler = engine.ShardSampler(len(labels), rank, 2, seed=0, weights=weights)
            sampler.set_epoch(epoch)
            drawn += list(sampler)
    counts = np.bincount(labels[drawn], minlength=3) / len(drawn)
    assert counts == pytest.approx([1 / 3] * 3, abs=0.05)


@pytest.mark.parametrize("kind, lrs", [
    ("none", [0.1, 0.1, 0.1, 0.1]),
    ("step", [0.1, 0.1, 0.01, 0.01]),
    ("cosine", [0.1, 0.085355, 0.05, 0.014645]),
    ("plateau", [0.1, 0.1, 0.1, 0.05]),
])
def test_schedulers_step_once_per_epoch(kind, lrs):
    cfg = TrainConfig(lr=0.1, epochs=4, scheduler=kind, step_size=2, gamma=0.1,
                      plateau_factor=0.5, plateau_patience=1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = engine.make_scheduler(optimizer, cfg)
    seen = []
    for valid_loss in (1.0, 1.0, 1.0, 1.0):  # a plateau from the first epoch
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        engine.step_scheduler(scheduler, valid_loss)
    assert seen == pytest.approx(lrs, rel=1e-4)


def test_gradual_freeze_spec_follows_the_schedule():
    cfg = TrainConfig(freeze="gradual", gradual_every=2)
    assert [engine.freeze_spec_at(cfg, e) for e in range(5)] == [
        "head", "head", "last1", "last1", "last2"]
    assert engine.freeze_spec_at(TrainConfig(freeze="last2"), 7) == "last2"


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_checkpoint_restores_model_optimizer_scheduler_and_epoch(tmp_path, scheduler):
    cfg = TrainConfig(lr=1e-2, epochs=5, scheduler=scheduler, plateau_patience=0)
    torch.manual_seed(0)
    model = models.build("resnet18", "none", CLASSES)
    optimizer = engine.optimizer_over_all_stages(model, cfg)
    freezing.freeze(model, "last2")
    schedule = engine.make_scheduler(optimizer, cfg)
    for _ in range(2):
        engine.train_one_epoch(model, image_loader(), nn.CrossEntropyLoss(), optimizer, CPU)
        engine.step_scheduler(schedule, 1.0)
    history = [{"epoch": 1, "valid_loss": 1.0}, {"epoch": 2, "valid_loss": 1.0}]
    meta = {"classes": list("abcd"), "image_size": list(SMALL),
            "model": {"name": "resnet18", "pooling": "avg", "weights": "none"}}
    checkpoints.save_checkpoint(tmp_path, model, optimizer, schedule, 2, history, meta)

    torch.manual_seed(1)
    fresh = models.build("resnet18", "none", CLASSES)
    fresh_optimizer = engine.optimizer_over_all_stages(fresh, cfg)
    fresh_schedule = engine.make_scheduler(fresh_optimizer, cfg)
    epoch, restored = checkpoints.restore_checkpoint(tmp_path, fresh, fresh_optimizer,
                                                     fresh_schedule)

    assert (epoch, restored) == (2, history)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert fresh_schedule.state_dict() == schedule.state_dict()
    assert fresh_optimizer.param_groups[-1]["lr"] == optimizer.param_groups[-1]["lr"]
    for mine, theirs in zip(model.parameters(), fresh.parameters()):
        state, other = optimizer.state[mine], fresh_optimizer.state[theirs]
        assert state.keys() == other.keys()
        for key in state:
            assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(other[key]))
    assert checkpoints.read_meta(tmp_path)["epoch"] == 2


def test_a_checkpoint_is_verified_by_its_manifest_and_a_damaged_one_never_used(tmp_path,
                                                                             capsys):
    """manifest.json (written last) records every file's size and sha256: a checkpoint cut
    short or changed does not match it; a run resumes from the newest intact one beside it,
    or from epoch 1 where there is none; `latest_checkpoint` passes damaged ones over."""
    model = models.build("bettercnn", "none", CLASSES)
    optimizer = engine.optimizer_over_all_stages(model, TrainConfig())
    meta = {"classes": list("abcd"), "image_size": [30, 100],
            "model": {"name": "bettercnn", "pooling": "avg", "weights": "none"}}
    first, second = (checkpoints.save_checkpoint(tmp_path / checkpoints.checkpoint_name(e),
                                                 model, optimizer, None, e, [], meta)
                     for e in (1, 2))
    listed = json.loads((second / checkpoints.MANIFEST_FILE).read_text())["files"]
    assert set(listed) == {checkpoints.MODEL_FILE, checkpoints.STATE_FILE, checkpoints.META_FILE}
    assert checkpoints.checkpoint_problem(second) is None
    model_file = second / checkpoints.MODEL_FILE
    size = model_file.stat().st_size
    os.truncate(model_file, size // 2)
    assert checkpoints.checkpoint_problem(second) == (
        f"model.pt has {size // 2:,} bytes, its manifest says {size:,}")
    assert checkpoints.resume_point(str(second)) == str(first)
    assert checkpoints.latest_checkpoint(tmp_path) == str(first)
    flipped = bytearray((first / checkpoints.STATE_FILE).read_bytes())
    flipped[-1] ^= 1  # same size, other bytes
    (first / checkpoints.STATE_FILE).write_bytes(bytes(flipped))
    assert checkpoints.checkpoint_problem(first) == (
        "train_state.pt does not match the sha256 in its manifest")
    assert checkpoints.resume_point(str(second)) is None
    assert checkpoints.latest_checkpoint(tmp_path) is None
    (first / checkpoints.MANIFEST_FILE).unlink()
    assert "no manifest.json" in checkpoints.checkpoint_problem(first)
    printed = capsys.readouterr().out
    assert f"[checkpoint] {second} is damaged (model.pt has" in printed
    assert "training again from epoch 1" in printed


def test_checkpoint_model_round_trips_through_the_weights_path(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet18", "none", CLASSES, "max")
    optimizer = engine.optimizer_over_all_stages(model, TrainConfig())
    meta = {"classes": list("abcd"), "image_size": list(SMALL),
            "model": {"name": "resnet18", "pooling": "max", "weights": "none"}}
    checkpoints.save_checkpoint(tmp_path, model, optimizer, None, 1, [], meta)

    loaded, read = checkpoints.load_model(tmp_path)
    as_weights = models.build("resnet18", str(tmp_path / checkpoints.MODEL_FILE), CLASSES, "max")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
        assert torch.equal(value, as_weights.state_dict()[key]), key
    assert read["classes"] == list("abcd") and not loaded.training
    x = torch.randn(2, 3, *SMALL)
    assert torch.equal(model.eval()(x), loaded(x))


def test_load_model_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from boatray.errors import BoatrayError

    with pytest.raises(BoatrayError, match="not a boatray checkpoint"):
        checkpoints.load_model(tmp_path)


def test_make_trainer_takes_workers_resources_and_failures_from_the_config(tmp_path):
    exp = from_dict({"train": {"num_workers": 3, "cpus_per_worker": 0.5, "max_failures": 2}})
    made = trainer.make_trainer(exp, tmp_path / "manifest.parquet", "run-a", str(tmp_path))
    scaling, run = made.scaling_config, made.run_config
    assert (scaling.num_workers, scaling.use_gpu) == (3, False)
    assert scaling.resources_per_worker == {"CPU": 0.5}
    assert (run.name, run.storage_path) == ("run-a", str(tmp_path))
    assert run.failure_config.max_failures == 2
    assert run.failure_config.controller_failure_limit == trainer.CONTROLLER_FAILURE_LIMIT
    assert run.checkpoint_config.num_to_keep == checkpoints.KEEP_CHECKPOINTS
    config = made.train_loop_config
    assert from_dict(config["experiment"]) == exp
    assert config["manifest"] == str(tmp_path / "manifest.parquet")


def test_a_bad_weights_file_is_found_before_the_workers(tmp_path):
    from boatray.config import load
    from boatray.data import synthetic
    from boatray.data.manifest import prepare
    from boatray.errors import BoatrayError

    small = from_dict({"data": {"synthetic": {"classes": 2, "train_per_class": 4,
                                              "test_per_class": 1, "image_size": [16, 32]}}})
    tree = synthetic.generate(tmp_path / "tree", small.data.synthetic, seed=0)
    manifest = prepare(tree, tmp_path / "data", valid_fraction=0.5)
    weights = tmp_path / "random.pt"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    exp = load(None, [f"model.weights={weights}", "train.cache_prefix=false"])
    with pytest.raises(BoatrayError, match=f"{weights}"):
        trainer.check_inputs(exp, manifest)
