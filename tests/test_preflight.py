"""Before a run starts: devices, resource requests against the cluster, weights, the dry run."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from boatray import config, models, preflight
from boatray.cluster import Capacity
from boatray.errors import BoatrayError
from boatray.nodetypes import NodeType

REPO = Path(__file__).resolve().parents[1]
LAPTOP = Capacity([{"CPU": 2.0}])
GPU_CLUSTER = Capacity([{"CPU": 4.0, "trial_driver": 8.0}],
                       [NodeType("gpu_1x", {"CPU": 8.0, "GPU": 1.0}, 4)])


def lab6(*overrides: str):
    return config.load(REPO / "ray_jobs" / "lab6.yaml", list(overrides))


def test_auto_takes_gpus_only_where_the_cluster_has_or_adds_them():
    exp, lines = preflight.resolve_devices(lab6(), LAPTOP)
    assert (exp.train.use_gpu, exp.features.use_gpu) == (False, False)
    assert lines[0] == "train.use_gpu=auto: CPUs, as no node has or can get a GPU"
    exp, lines = preflight.resolve_devices(lab6(), GPU_CLUSTER)
    assert (exp.train.use_gpu, exp.features.use_gpu) == (True, True)
    assert "the autoscaler can add GPU nodes" in lines[0]
    exp, lines = preflight.resolve_devices(lab6("train.use_gpu=false"), GPU_CLUSTER)
    assert exp.train.use_gpu is False and len(lines) == 1  # only features was auto


@pytest.mark.parametrize("overrides, fix", [
    (("train.use_gpu=true",), "--set train.use_gpu=auto"),
    (("train.cpus_per_worker=4",), "--set train.cpus_per_worker=2"),
    (("features.cpus_per_actor=3",), "--set features.cpus_per_actor=2"),
    (("sweep.trial_resource=trial_driver", "train.num_workers=2", "train.cpus_per_worker=1"),
     "--set sweep.trial_resource=null"),
    (("train.num_workers=2", "train.cpus_per_worker=1"), "--set train.num_workers=1"),
    (("train.num_workers=3",), "--set train.num_workers=1"),
])
def test_a_request_that_can_never_be_met_is_one_line_naming_the_fix(overrides, fix):
    exp, _ = preflight.resolve_devices(lab6(*overrides), LAPTOP)
    with pytest.raises(BoatrayError) as error:
        preflight.check_resources(exp, LAPTOP)
    assert str(error.value).endswith(fix) and "\n" not in str(error.value)


def test_concurrency_is_capped_at_what_the_cluster_holds():
    exp, _ = preflight.resolve_devices(lab6(), LAPTOP)
    capped, lines = preflight.check_resources(exp, LAPTOP)
    assert capped.sweep.max_concurrent_trials == 1
    assert lines == ["sweep.max_concurrent_trials=4 -> 1: the cluster holds 1 trial(s) of "
                     "1 x {CPU: 2} at once"]
    exp, _ = preflight.resolve_devices(lab6("sweep.trial_resource=trial_driver"), GPU_CLUSTER)
    kept, lines = preflight.check_resources(exp, GPU_CLUSTER)  # 4 GPU nodes can be added
    assert kept.sweep.max_concurrent_trials == 4 and lines == []


def test_capacity_counts_live_nodes_and_autoscalable_types():
    assert GPU_CLUSTER.slots({"CPU": 2.0, "GPU": 1.0}) == 4
    assert GPU_CLUSTER.slots({"CPU": 2.0}) == 2 + 4 * 4
    assert Capacity([], [NodeType("cpu", {"CPU": 8.0}, -1)]).slots({"CPU": 1.0}) == float("inf")
    assert GPU_CLUSTER.largest("GPU") == 1 and GPU_CLUSTER.gpus_now() == 0


def test_capacity_says_where_a_request_can_run():
    assert GPU_CLUSTER.where({"CPU": 2.0, "GPU": 1.0}) == (
        "gpu_1x nodes the autoscaler adds (up to 4)")
    assert GPU_CLUSTER.where({"CPU": 2.0}) == (
        "1 live node(s) or gpu_1x nodes the autoscaler adds (up to 4)")
    assert LAPTOP.where({"CPU": 4.0}) == "no node"


def test_weights_without_internet_are_one_line_naming_both_ways_out(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BoatrayError) as error:
        models.fetch_weights("resnet50", "IMAGENET1K_V1")
    message = str(error.value)
    assert "--set model.weights=none" in message and "--set model.weights=/path/to/" in message
    assert f"put resnet50-0676ba61.pth in {tmp_path / 'checkpoints'}" in message
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet50-0676ba61.pth").touch()
    models.fetch_weights("resnet50", "IMAGENET1K_V1")  # cached: nothing to fetch


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_readme_real_data_recipe_and_lab6_dry_run_on_a_cpu_machine(mardct_sample, tmp_path):
    """The README's recipe as written (prepare --out, then the sweep on that folder), as a dry
    run of lab6.yaml: it plans CPUs on this GPU-less machine and asks for nothing it lacks."""
    prepared = tmp_path / "mardct-lab16"
    done = run([sys.executable, "-m", "boatray.data", "prepare", "--source", str(mardct_sample),
                "--protocol", "lab16", "--out", str(prepared)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([sys.executable, "-m", "boatray.sweep", "--config", str(REPO / "ray_jobs" /
                "lab6.yaml"), "--data", str(prepared), "--dry-run"], tmp_path)
    log = done.stdout + done.stderr
    plan = [line for line in done.stdout.splitlines() if line.startswith("[plan] ")]
    assert f"[plan] results: {tmp_path / 'results' / 'lab6'}" in plan
    assert any(line.startswith(f"[plan] data: {prepared}: 16 classes, train ") for line in plan)
    assert "[boatray] train.use_gpu=auto: CPUs, as no node has or can get a GPU" in log
    assert any(line.startswith("[plan] compute estimate: ") and "fine-tuning sweep " in line
               for line in plan)
    assert "can fulfill resource request" not in log and "Traceback" not in log
    # no internet here: the plan is printed, then the weights stop the run in one line
    assert done.returncode in (0, 2)
    if done.returncode == 2:
        assert done.stderr.strip().splitlines()[-1].startswith(
            "error: cannot download the IMAGENET1K_V1 weights of resnet50")


@pytest.mark.slow
def test_lab6_runs_on_a_cpu_machine_without_waiting_for_resources(mardct_sample, tmp_path):
    """lab6.yaml's resource settings as they are (use_gpu auto, CPUs per worker and per actor,
    4 concurrent trials) on this GPU-less machine. The overrides only shrink the work to fit a
    test: no internet for the ImageNet weights, small images, one trial of one epoch."""
    done = run([sys.executable, "-m", "boatray.sweep", "--config",
                str(REPO / "ray_jobs" / "lab6.yaml"), "--data", str(mardct_sample),
                "--set", "model.weights=none", "--set", "data.image_size=[60, 200]",
                "--set", "sweep.freeze=[head]", "--set", "sweep.lr=[0.001]",
                "--set", "train.epochs=1", "--set", "baseline.epochs=1"], tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    for stuck in ("can fulfill resource request", "WorkerGroupStartupTimeoutError",
                  "may hang forever"):
        assert stuck not in log
    assert (tmp_path / "results" / "lab6" / "report" / "report.html").is_file()
