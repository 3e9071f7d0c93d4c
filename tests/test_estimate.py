"""Minutes in the plan: the calibration, how the estimate scales, and estimate against actual."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from boatray import config, estimate
from boatray.cluster import Capacity


def calibration(**changes) -> estimate.Calibration:
    """Round per-image seconds: decode 0.01, trunk 0.1, the head's steps on cached features
    0.001, last1's 0.05 / 0.02, BetterCNN's 0.002 / 0.001."""
    return dataclasses.replace(estimate.Calibration(
        node="test", decode_s=0.01, trunk_s=0.1, trunk_rate="trunk 10 images/s",
        prefix_s={"pool": 0.1, "layer3": 0.08}, train_s={"head": 0.001, "last1": 0.05},
        eval_s={"head": 0.001, "last1": 0.02}, cached={"head": True, "last1": True},
        single={"baseline": (0.001, 0.002, 0.001)}), **changes)


def manifest(train: int, valid: int, test: int) -> pd.DataFrame:
    splits = ["train"] * train + ["valid"] * valid + ["test"] * test
    return pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(splits))], "split": splits,
                         "label_idx": [i % 4 for i in range(len(splits))]})


def smoke(*overrides: str) -> config.Experiment:
    return config.load(overrides=["train.use_gpu=false", "features.use_gpu=false", *overrides])


def test_asha_keeps_one_in_reduction_factor_at_each_rung_at_the_least():
    # 4 trials of 8 epochs, rungs at 2 and 4: 2 stop at 2, 1 at 4, 1 runs 8 epochs
    assert estimate._asha_epochs(4, 8, [2, 4], 2.0) == (2 * 2 + 1 * 4 + 1 * 8, 32)
    assert estimate._asha_epochs(3, 5, [], 2.0) == (15, 15)


def test_each_stage_scales_with_its_images_epochs_and_concurrency():
    def stages(exp, frame, **changes):
        return estimate.estimate(exp, frame, 1, calibration(**changes)).stages

    exp = smoke("sweep.asha.enabled=false")
    small, large = manifest(80, 20, 30), manifest(800, 200, 300)
    fixed = estimate.FIT_OVERHEAD_S + exp.baseline.epochs * estimate.EPOCH_OVERHEAD_S
    assert stages(exp, large)["BetterCNN baseline"][0] - fixed == pytest.approx(
        10 * (stages(exp, small)["BetterCNN baseline"][0] - fixed), rel=0.1)
    def training(exp) -> float:  # the sweep's seconds of training steps
        free = {"head": 0.0, "last1": 0.0}
        return (stages(exp, large)["fine-tuning sweep"][0]
                - stages(exp, large, train_s=free)["fine-tuning sweep"][0])

    one_at_a_time = smoke("sweep.asha.enabled=false", "sweep.max_concurrent_trials=1")
    assert training(one_at_a_time) == pytest.approx(2 * training(exp))  # smoke: 2 at a time
    longer = smoke("sweep.asha.enabled=false", "sweep.per_freeze.last1.epochs=4")
    assert training(longer) > 1.9 * training(exp)  # last1's epochs dominate
    # the features' pass runs in the sweep (it fills the caches): the features stage only reads
    assert stages(exp, large)["feature extraction"][0] == estimate.FIT_OVERHEAD_S
    assert stages(smoke("sweep.enabled=false"), large)["feature extraction"][0] > 1300 * 0.11


def test_asha_gives_the_sweep_a_range_and_the_total_adds_up():
    result = estimate.estimate(smoke(), manifest(800, 200, 300), 1, calibration())
    low, high = result.stages["fine-tuning sweep"]
    assert low < high
    assert result.total == (sum(s[0] for s in result.stages.values()),
                            sum(s[1] for s in result.stages.values()))
    lines = estimate.describe(result, calibration())
    assert lines[0].startswith("estimated wall time (calibrated on this node in ")
    assert any(line.startswith("  fine-tuning sweep: ") and " to " in line for line in lines)
    assert any(line.startswith("  total: ") for line in lines)


def test_a_run_on_gpus_is_not_estimated_from_this_nodes_cpus():
    exp = config.load(overrides=["train.use_gpu=true"])
    result, cal = estimate.for_run(exp, manifest(8, 2, 3), Capacity([{"CPU": 2, "GPU": 1}]))
    assert cal is None and not result.stages
    assert estimate.describe(result, cal) == [
        "estimated wall time: not estimated: the run uses GPUs, and the calibration runs on "
        "this node's CPUs"]


@pytest.mark.parametrize("batches", [(), ("train.batch_size=auto", "features.batch_size=auto")])
def test_the_calibration_takes_seconds_and_times_every_step(tmp_path, batches):
    """Also with lab6's `batch_size: auto` (a GPU's choice): on a CPU, the fixed sizes."""
    from boatray.data import synthetic

    tree = synthetic.generate(tmp_path / "images", config.SyntheticConfig(
        classes=2, train_per_class=2, test_per_class=1, image_size=(48, 160)), seed=0)
    paths = sorted(str(p) for p in tree.rglob("*.jpg"))
    frame = pd.DataFrame({"path": paths, "split": "train", "label_idx": [0, 1] * (len(paths) // 2)})
    cal = estimate.calibrate(smoke(*batches), frame)
    assert cal.seconds < 30
    assert cal.cached == {"head": True, "last1": True}
    assert set(cal.single) == {"baseline"}
    for value in (cal.decode_s, cal.trunk_s, *cal.train_s.values(), *cal.eval_s.values(),
                  *cal.prefix_s.values(), *cal.single["baseline"]):
        assert value > 0
    assert cal.train_s["head"] < cal.train_s["last1"]  # a linear layer on cached features


def test_estimate_against_actual_is_kept_for_the_report(tmp_path):
    result = estimate.Estimate(stages={"fine-tuning sweep": (60.0, 100.0), "report": (4.0, 4.0)})
    estimate.record(tmp_path, result, {"fine-tuning sweep": 90.0})
    table = estimate.stage_times(tmp_path)
    assert table["stage"].tolist() == ["fine-tuning sweep", "report"]
    assert table["estimated_seconds"].tolist() == ["60 to 100", 4.0]
    assert table["actual / estimate"].iloc[0] == pytest.approx(90 / 80)
    assert pd.isna(table["actual_seconds"].iloc[1])
    assert estimate.stage_times(tmp_path / "none") is None
