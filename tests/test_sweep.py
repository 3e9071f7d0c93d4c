"""The main job end to end: the smoke experiment, resume, ASHA with more trials than slots."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from boatray import approaches, estimate
from boatray.finetune import trials as sweep_trials
from boatray.results import PROBA_PREFIX, Layout, find_runs, read_run

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
    trials = pd.read_parquet(Layout(results).trials)
    assert trials["trial_id"].nunique() == 4
    assert set(trials["freeze"]) == {"head", "last1"} and set(trials["lr"]) == {0.01, 0.001}
    for column in ("epoch", "valid_loss", "valid_macro_f1", "train_loss", "epoch_seconds"):
        assert column in trials.columns
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    assert log.count(" done after ") == 4
    assert "4/4 trials ended" in log
    epochs = [line for line in log.splitlines() if " epoch " in line and "valid macro-F1" in line]
    assert len(epochs) == trials.groupby("trial_id")["epoch"].max().sum()  # one per epoch


def test_smoke_writes_every_approach_and_the_report(smoke_run):
    results, _ = smoke_run
    runs = {read_run(path)[1]["approach"]: read_run(path) for path in find_runs(results)}
    assert set(runs) == set(approaches.names())
    for predictions, run in runs.values():
        assert set(predictions["split"]) >= {"test"}
        assert [c for c in predictions.columns if c.startswith(PROBA_PREFIX)]
        assert run["wall_seconds"] > 0
    selected = [read_run(p)[1] for p in find_runs(results)
                if read_run(p)[1]["approach"] == "finetune"]
    assert {r["selected"] for r in selected} == {"best", "best_per_freeze"}
    assert {r["freeze"] for r in selected} == {"head", "last1"}
    assert (results / "report" / "report.html").is_file()
    headline = pd.read_csv(results / "report" / "tables" / "headline.csv")
    assert list(dict.fromkeys(headline["approach"])) == list(approaches.names())
    assert headline["configuration"].is_unique and len(headline) == len(
        {read_run(p)[1].get("config_id") or read_run(p)[1]["name"] for p in find_runs(results)})


BOATRAY_LINE = re.compile(r"\[[a-z][a-z-]*\] ")
"""How every line boatray prints to the console starts: whose it is ([boatray], [data],
[sweep], [cache], [features], an approach's); Ray's start with a timestamp or a process."""


def test_smoke_console_is_quiet_and_ends_with_a_summary(smoke_run):
    results, log = smoke_run
    lines = log.splitlines()
    assert len(lines) <= 100, log
    assert [line for line in lines if not BOATRAY_LINE.match(line)] == [], log
    assert f"[boatray] Ray's output: {results / 'logs'}" in log
    assert list((results / "logs").glob("worker-*.out"))
    driver = (results / "logs" / "driver.log").read_text()  # Ray's own lines went here
    assert "Started a local Ray instance" in driver
    assert "Experiment state snapshotting has been triggered" not in driver
    summary = log[log.index("[boatray] done in "):]
    for what in ("winner: ", "95% CI", "McNemar p = ", "fastest: ",
                 f"report: {(results / 'report' / 'report.html').as_uri()}",
                 "predict with it: python -m boatray.predict --model "):
        assert what in summary, summary


def test_the_run_keeps_its_estimate_beside_each_stages_time_and_the_report_shows_it(smoke_run):
    results, log = smoke_run
    timing = json.loads((results / estimate.TIMING_FILE).read_text())
    stages = [line.split(": starting")[0].removeprefix("[boatray] ")
              for line in log.splitlines() if line.endswith(": starting")]
    assert set(stages) | {"start (Ray, data)", "report"} == set(timing["estimate"])
    assert set(timing["actual"]) == set(timing["estimate"])
    assert all(low <= high for low, high in timing["estimate"].values())
    assert "[boatray] estimated wall time: " in log
    cost = (results / "report" / "report.md").read_text().split("## Cost")[1]
    assert "as estimated before the run" in cost and "fine-tuning sweep" in cost


def test_smoke_report_says_the_data_are_synthetic(smoke_run):
    results, _ = smoke_run
    report = (results / "report" / "report.md").read_text()
    assert report.index("SYNTHETIC DATA") < report.index("## Summary")


def test_every_approach_exports_a_model_that_predicts_a_folder(smoke_run, tmp_path):
    results, _ = smoke_run
    folders = {path.name: path for path in (results / "models").iterdir()}
    assert {a.name for a in approaches.APPROACHES if a.uses_features} <= set(folders)
    assert any(name.startswith("baseline-bettercnn-r") for name in folders)
    images = results / "data" / "synthetic" / "test"
    for path in find_runs(results):
        predictions, run = read_run(path)
        out = tmp_path / f"{path.name}.csv"
        done = subprocess.run([sys.executable, "-m", "boatray.predict", "--model",
                               str(folders[path.name]), "--images", str(images), "--out",
                               str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        table = pd.read_csv(out).set_index("path")
        test = predictions[predictions.split == "test"].set_index("path")
        table.index = [str(Path(p).resolve()) for p in table.index]
        table = table.loc[[str(Path(p).resolve()) for p in test.index]]
        names = pd.Series(run["classes"])
        assert (table["class"].to_numpy() == names[test.y_pred].to_numpy()).all(), path.name
        assert abs(table[run["classes"]].to_numpy()
                   - test[[PROBA_PREFIX + c for c in run["classes"]]].to_numpy()).max() < 1e-3


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


# A cached `head` trial (seconds in a reused trial process), then an `all` trial from pixels,
# slow enough to be caught right after its checkpoint; the baseline trains in the driver.
SMALL_SWEEP = ("sweep.freeze=[head, all]", "sweep.lr=[0.01]", "sweep.max_concurrent_trials=1",
               "sweep.asha.enabled=false", "train.epochs=2")


def start_sweep(storage: Path, log_path: Path, *overrides: str,
                resume: bool = False) -> subprocess.Popen:
    """The small sweep in its own session (a kill of its group ends its local Ray too)."""
    command = [*sweep_command(storage, *SMALL_SWEEP, *overrides), *(["--resume"] * resume)]
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=user_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for(process: subprocess.Popen, log_path: Path, reached, what: str) -> None:
    deadline = time.monotonic() + 900
    while not reached():
        assert process.poll() is None, f"ended before {what}:\n" + log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} in 15 minutes"
        time.sleep(0.2)


def session_processes(session: int, name: str = "") -> list[int]:
    """The processes of a sweep started in its own session (whose command starts with
    `name`): its local Ray's too."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if (os.getsid(proc.pid) == session and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and (proc.info["cmdline"] or [""])[0].startswith(name)):
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def kill_what_is_left(session: int) -> None:
    """SIGKILL the Ray processes a killed sweep leaves behind (its workers have process groups
    of their own, and a trial's process would go on writing checkpoints for a while)."""
    for pid in session_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)


def assert_complete_histories(results: Path, trials: int, epochs: int) -> pd.DataFrame:
    """Every trial exactly once in trials.parquet, its epochs 1..last with none missing."""
    table = pd.read_parquet(Layout(results).trials)
    assert table["trial_id"].nunique() == trials
    for trial_id, rows in table.groupby("trial_id"):
        assert rows["epoch"].tolist() == list(range(1, epochs + 1)), trial_id
    return table


def test_sigkill_at_any_point_then_resume_finishes_the_run(tmp_path):
    """The driver is SIGKILLed while the pooled features are extracted, right after a trial
    finished, right after a trial's checkpoint, during features, during the baseline and
    during the report; each time `--resume` carries on, and the finished run equals an
    uninterrupted one (same config and seed, same numbers).

    On the way, two damages a kill (or a disk) can leave: the finished trial's checkpoint is
    cut short (it trains again, said in one line), and Tune's experiment state is cut short
    once the sweep has finished (the sweep is rebuilt from its trial folders, keeping both
    finished trials)."""
    results = tmp_path / "killed" / "smoke"

    def log_has(text):
        return lambda: text in log_path.read_text()

    def mid_trial():
        return any((results / Layout.TUNE).glob("*-all-*/checkpoint_*/meta.json"))

    points = [("the pooled features' extraction (the head cache's source)",
               lambda: log_has("[cache] one pass over the images")()),
              ("a finished trial", lambda: log_has(" done after ")()),
              ("a trial's checkpoint", mid_trial),
              ("the features stage", lambda: log_has("[boatray] feature extraction: starting")()),
              ("the baseline", lambda: log_has("[boatray] BetterCNN baseline: starting")()),
              ("the report", lambda: log_has("[boatray] report: writing")())]
    finished_before = set()
    for number, (what, reached) in enumerate(points):
        log_path = tmp_path / f"run{number}.log"
        process = start_sweep(tmp_path / "killed", log_path, resume=number > 0)
        wait_for(process, log_path, reached, what)
        if what == "a finished trial":
            finished_before = saved_finished_trials(results / Layout.TUNE)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kill_what_is_left(process.pid)  # nothing of it still writes what is damaged next
        if what == "a finished trial":
            cut_short(max((results / Layout.TUNE).glob("*-head-*/checkpoint_*/model.pt")))
        if what == "the features stage":
            cut_short(max((results / Layout.TUNE).glob("experiment_state-*.json")))
    logs = [(tmp_path / f"run{number}.log").read_text() for number in range(len(points))]
    assert re.search(r"\(head lr=1e-02 none r0\)[^\n]* checkpoint is damaged \(model.pt has "
                     r"[\d,]+ bytes, its manifest says", logs[2])
    assert "cannot be read (JSONDecodeError): the sweep is rebuilt from its trial folders: " \
           "2 kept as they ended" in logs[4]
    last = subprocess.run([*sweep_command(tmp_path / "killed", *SMALL_SWEEP), "--resume"],
                          env=user_env(), capture_output=True, text=True, timeout=900)
    assert last.returncode == 0, (last.stdout + last.stderr)[-5000:]
    rerun = {line.split(" trial ")[1].split()[1]  # trial N/M <trial id> ...
             for line in last.stdout.splitlines() if " done after " in line}
    assert not finished_before & rerun
    killed = assert_complete_histories(results, trials=2, epochs=2)
    assert "## This run" not in (results / "report" / "report.md").read_text()

    clean = subprocess.run(sweep_command(tmp_path / "clean", *SMALL_SWEEP), env=user_env(),
                           capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-5000:]
    once = assert_complete_histories(tmp_path / "clean" / "smoke", trials=2, epochs=2)
    assert_same_numbers(results, tmp_path / "clean" / "smoke", killed, once)


def cut_short(path: Path) -> None:
    """Damage a file as a killed writer or a full disk leaves it: its first half only."""
    os.truncate(path, path.stat().st_size // 2)


def within(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """`frame` with its image paths relative to the results folder (each run generates its
    synthetic images under its own)."""
    return frame.assign(path=frame["path"].str.removeprefix(f"{root}/"))


def assert_same_numbers(a: Path, b: Path, trials_a: pd.DataFrame, trials_b: pd.DataFrame):
    """Features, the sweep's metrics, the SVM's choice and every prediction are equal."""
    def features(root: Path) -> pd.DataFrame:
        return within(pd.read_parquet(root / "features" / "features.parquet"), root)

    pd.testing.assert_frame_equal(features(a), features(b))
    metrics = ["freeze", "lr", "repeat", "epoch", "train_loss", "train_accuracy",
               "valid_loss", "valid_accuracy", "valid_macro_f1"]
    keys = ["freeze", "lr", "repeat", "epoch"]
    pd.testing.assert_frame_equal(trials_a[metrics].sort_values(keys, ignore_index=True),
                                  trials_b[metrics].sort_values(keys, ignore_index=True))
    runs_a = {p.relative_to(a) for p in find_runs(a)}
    assert runs_a == {p.relative_to(b) for p in find_runs(b)} and runs_a
    for run in runs_a:
        predictions_a, record_a = read_run(a / run)
        predictions_b, record_b = read_run(b / run)
        assert record_a.get("selected") == record_b.get("selected"), run
        pd.testing.assert_frame_equal(within(predictions_a, a), within(predictions_b, b))


def test_sigint_stops_cleanly_and_resume_finishes(tmp_path):
    results = tmp_path / "smoke"
    log_path = tmp_path / "first.log"
    first = start_sweep(tmp_path, log_path, "features.enabled=false")
    wait_for(first, log_path, lambda: " done after " in log_path.read_text(),
             "finished trial")
    stopped = time.monotonic()
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=90) == 130
    assert time.monotonic() - stopped < 90
    log = log_path.read_text()
    said = [line for line in log.splitlines() if "stopped by SIGINT" in line]
    assert len(said) == 1 and said[0].endswith("--resume")
    assert "trials.parquet written" not in log and "[boatray] feature extraction" not in log
    assert not (Layout(results).trials).exists() and not find_runs(results)
    assert json.loads((results / "run_state.json").read_text())["status"] == "interrupted"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)  # whatever of its Ray is left
    second = subprocess.run([*sweep_command(tmp_path, *SMALL_SWEEP, "features.enabled=false"),
                             "--resume"], env=user_env(), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    assert_complete_histories(results, trials=2, epochs=2)
    report = (results / "report" / "report.md").read_text()
    assert "## This run" not in report


def test_a_trial_killed_past_its_retries_fails_alone_and_says_so(tmp_path):
    """train.max_failures=0, and the `all` trial's process is killed in its second epoch: one
    console line names what was lost (Ray's traceback goes to logs/), the trial is `failed`
    with its cause in trials.parquet, run_state.json, the report and the closing lines (exit
    2), and only the trial that finished is selected and evaluated."""
    results = tmp_path / "smoke"
    log_path = tmp_path / "run.log"
    process = start_sweep(tmp_path, log_path, "features.enabled=false", "train.max_failures=0")
    wait_for(process, log_path, lambda: " all lr=1e-02 none r0 epoch 1/2" in log_path.read_text(),
             "the all trial's first epoch")
    for pid in session_processes(process.pid, "ray::ImplicitFunc"):
        os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=900) == 2
    log = log_path.read_text()
    failed = [line for line in log.splitlines() if " all lr=1e-02 none r0 FAILED (" in line]
    assert len(failed) == 1 and "a Ray process was lost (ActorDiedError" in failed[0], log
    assert "Traceback" not in log and "(raylet)" not in log
    assert "Trial task failed" in (results / "logs" / "ray-errors.log").read_text()
    table = pd.read_parquet(Layout(results).trials).groupby("freeze").last()
    assert table["status"].to_dict() == {"all": "failed", "head": "finished"}
    assert table.loc["all", "cause"].startswith("a Ray process was lost (ActorDiedError")
    (failure,) = json.loads((results / "run_state.json").read_text())["failures"]
    assert failure.startswith("fine-tuning sweep: trial ") and (
        "(all lr=1e-02 none r0) failed after 1 epoch(s): a Ray process was lost" in failure)
    assert f"error: {failure}" in log
    records = [read_run(p)[1] for p in find_runs(results)]
    assert [r["freeze"] for r in records if r["approach"] == "finetune"] == ["head"]
    report = (results / "report" / "report.md").read_text()
    assert report.index("## Failed stages") < report.index("## Summary")
    assert "(all lr=1e-02 none r0) failed after 1 epoch(s)" in report[:report.index("## Summary")]
    shown = pd.read_csv(results / "report" / "tables" / "trials.csv").set_index("freeze")
    assert shown.loc["all", "status"] == "failed" and shown.loc["head", "status"] == "finished"


def test_selection_uses_the_mean_over_repeats():
    table = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "epoch": [2, 2, 2, 2],
        "freeze": ["head", "head", "last1", "last1"], "lr": [0.01, 0.01, 0.001, 0.001],
        "scheduler": ["none"] * 4, "repeat": [0, 1, 0, 1],
        "valid_macro_f1": [0.9, 0.1, 0.6, 0.6]})
    chosen = sweep_trials.select(table, "valid_macro_f1")
    assert [(c["freeze"], c["selected"]) for c in chosen] == [
        ("last1", "best"), ("head", "best_per_freeze")]
    assert len(chosen[0]["trials"]) == 2


def test_bad_config_key_is_one_line(tmp_path):
    done = subprocess.run(sweep_command(tmp_path, "train.lrr=1"), env=user_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: unknown key 'train.lrr' (allowed in train: ")
