"""The main job end to end: the smoke experiment, resume, ASHA with more trials than slots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from boatray import tuning
from boatray.results import PROBA_PREFIX, find_runs, read_run

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[1]
README_JOB = [sys.executable, "-m", "boatray.sweep"]  # the README's main job, verbatim


def sweep_command(storage: Path, *overrides: str) -> list[str]:
    """The main job with its own storage_path: for tests that need a results folder of their
    own beside the shared smoke run's (the README's job itself runs in `smoke_run`)."""
    args = [*README_JOB, "--set", f"storage_path={storage}"]
    for item in overrides:
        args += ["--set", item]
    return args


def user_env() -> dict[str, str]:
    """A user's environment: no RAY_ADDRESS, so the sweep starts its own local Ray instance."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def repository_copy(target: Path) -> Path:
    """The repository's files (no venv, git data or results) copied to `target`."""
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(
        ".venv", ".git", "results", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))
    return target


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's main job as written: `python -m boatray.sweep`, no arguments, from a fresh
    copy of the repository as the working directory; run once for every test here."""
    copy = repository_copy(tmp_path_factory.mktemp("user") / "boatray")
    done = subprocess.run(README_JOB, cwd=copy, env=user_env(), capture_output=True, text=True,
                          timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return copy / "results" / "smoke", log


def test_smoke_says_its_data_is_synthetic(smoke_run):
    _, log = smoke_run
    assert "GENERATED (synthetic)" in log


def test_smoke_says_where_results_are_at_start_and_end(smoke_run):
    results, log = smoke_run
    lines = [line for line in log.splitlines() if line.startswith("[boatray] results: ")]
    assert lines == [f"[boatray] results: {results}"] * 2


def test_results_files_follow_the_umask(smoke_run):
    results, _ = smoke_run
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("report/report.html", "trials.parquet", "experiment.json"):
        assert (results / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_smoke_trials_table_has_every_trial(smoke_run):
    results, log = smoke_run
    trials = pd.read_parquet(results / tuning.TRIALS)
    assert trials["trial_id"].nunique() == 4
    assert set(trials["freeze"]) == {"fc", "layer4"} and set(trials["lr"]) == {0.01, 0.001}
    for column in ("epoch", "valid_loss", "valid_macro_f1", "train_loss", "epoch_seconds"):
        assert column in trials.columns
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    assert log.count(" finished after ") == 4
    assert "done 4, running 0, pending 0" in log


def test_smoke_writes_every_approach_and_the_report(smoke_run):
    results, _ = smoke_run
    runs = {read_run(path)[1]["approach"]: read_run(path) for path in find_runs(results)}
    assert set(runs) == {"finetune", "svm", "probe", "baseline"}
    for predictions, run in runs.values():
        assert set(predictions["split"]) >= {"test"}
        assert [c for c in predictions.columns if c.startswith(PROBA_PREFIX)]
        assert run["wall_seconds"] > 0
    selected = [read_run(p)[1] for p in find_runs(results)
                if read_run(p)[1]["approach"] == "finetune"]
    assert {r["selected"] for r in selected} == {"best", "best_per_freeze"}
    assert {r["freeze"] for r in selected} == {"fc", "layer4"}
    report = (results / "report" / "report.md").read_text()
    assert (results / "report" / "report.html").is_file()
    for approach in ("svm", "baseline", "finetune"):
        assert approach in report.lower()


def test_existing_results_need_resume(smoke_run):
    results, _ = smoke_run
    done = subprocess.run(README_JOB, cwd=results.parents[1], env=user_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--resume" in done.stderr


def saved_finished_trials(tune_dir: Path) -> set[str]:
    """The trials Tune's saved experiment state records as finished (what a restore skips)."""
    finished = set()
    for state in tune_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # being rewritten right now
        for trial in trials:
            record = json.loads(trial[0])
            if record.get("status") == "TERMINATED":
                finished.add(record["trial_id"])
    return finished


def test_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path):
    # trials that train from pixels for 2 epochs: one reused trial process runs cached `fc`
    # trials in a second or two each, done before this test could interrupt the sweep
    overrides = ("sweep.freeze=[all]", "sweep.lr=[0.01, 0.003, 0.001]",
                 "sweep.max_concurrent_trials=1", "sweep.asha.enabled=false",
                 "features.enabled=false", "baseline.enabled=false", "train.epochs=2")
    tune_dir = tmp_path / "smoke" / tuning.TUNE_DIR
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen(sweep_command(tmp_path, *overrides), env=user_env(),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not saved_finished_trials(tune_dir):
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 10 minutes"
            time.sleep(1)
        finished_first = saved_finished_trials(tune_dir)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = subprocess.run([*sweep_command(tmp_path, *overrides), "--resume"], env=user_env(),
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    rerun = {line.split(" trial ")[1].split()[0]
             for line in second.stdout.splitlines() if " finished after " in line}
    assert rerun and not finished_first & rerun
    trials = pd.read_parquet(tmp_path / "smoke" / tuning.TRIALS)
    assert trials["trial_id"].nunique() == 3
    assert not trials.duplicated(["trial_id", "epoch"]).any()


def test_selection_uses_the_mean_over_repeats():
    table = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "epoch": [2, 2, 2, 2],
        "freeze": ["fc", "fc", "layer4", "layer4"], "lr": [0.01, 0.01, 0.001, 0.001],
        "scheduler": ["none"] * 4, "repeat": [0, 1, 0, 1],
        "valid_macro_f1": [0.9, 0.1, 0.6, 0.6]})
    chosen = tuning.select(table, "valid_macro_f1")
    assert [(c["freeze"], c["selected"]) for c in chosen] == [
        ("layer4", "best"), ("fc", "best_per_freeze")]
    assert len(chosen[0]["trials"]) == 2


def test_bad_config_key_is_one_line(tmp_path):
    done = subprocess.run(sweep_command(tmp_path, "train.lrr=1"), env=user_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: unknown key 'train.lrr' (allowed in train: ")
