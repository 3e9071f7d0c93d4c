"""One run per results folder, signals, failed stages, the trials table from checkpoints."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from boatray import approaches, config, interrupt, run_state, sweep
from boatray.errors import BoatrayError
from boatray.finetune import checkpoints
from boatray.finetune import trials as sweep_trials
from boatray.report.sections import status_section
from boatray.results import Layout


def test_a_second_run_on_one_folder_is_refused_in_one_line(tmp_path):
    with run_state.RunLock(tmp_path / "smoke"):
        with pytest.raises(BoatrayError, match=f"in use by another run \\(pid {os.getpid()} on "
                                               f"{socket.gethostname()}\\)"):
            with run_state.RunLock(tmp_path / "smoke"):
                pass
        done = subprocess.run(
            [sys.executable, "-m", "boatray.sweep", "--set", f"storage_path={tmp_path}"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
        assert "in use by another run" in done.stderr
    with run_state.RunLock(tmp_path / "smoke"):  # released on exit
        pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = Layout(tmp_path).lock
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    with run_state.RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over {lock} from pid {int(gone.stdout)}" in capsys.readouterr().out


@pytest.fixture
def handlers():
    """Put the test process's signal handlers back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in interrupt.EXIT_CODES}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    interrupt._installed.clear()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_outside_the_sweep_stops_at_once(handlers, signum, code):
    interrupt.install()
    with pytest.raises(interrupt.Interrupted) as stop:
        os.kill(os.getpid(), signum)
    assert stop.value.exit_code == code


def test_a_signal_during_the_sweep_goes_to_tunes_graceful_stop(handlers):
    interrupt.install()
    calls = []

    def tune_handler(signum, frame):  # what Tune does: note the stop, put the old one back
        calls.append(signum)
        signal.signal(signal.SIGINT, interrupt._on_signal)

    signal.signal(signal.SIGINT, tune_handler)
    interrupt.during_tune()
    os.kill(os.getpid(), signal.SIGTERM)  # no exception: Tune stops the sweep and returns
    assert calls == [signal.SIGINT]
    with pytest.raises(interrupt.Interrupted) as stop:
        interrupt.after_tune()
    assert stop.value.exit_code == 143


def test_an_uninterrupted_sweep_puts_our_handler_back(handlers):
    interrupt.install()
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # Tune's, still in force
    interrupt.during_tune()
    interrupt.after_tune()  # no signal: nothing raised
    assert signal.getsignal(signal.SIGINT) is interrupt._on_signal


def test_a_failed_stage_of_any_kind_does_not_stop_the_others(tmp_path, monkeypatch):
    exp = config.load(None, [f"storage_path={tmp_path}"])
    ran = []

    def broken(*args):
        raise KeyError("features")

    for approach in approaches.APPROACHES:
        if not approach.uses_features:
            monkeypatch.setattr(approach, "fit", lambda context, a=approach: ran.append(a.name))
    monkeypatch.setattr(sweep, "stage_features", broken)
    failures = sweep.run_stages(exp, tmp_path / "manifest.parquet", resume=False)
    assert ran == ["finetune", "baseline"]  # the heads on features are skipped, not failed
    assert len(failures) == 1
    assert failures[0].startswith("feature extraction: KeyError: 'features'")
    log = exp.layout.logs / "feature-extraction.traceback.txt"
    assert str(log) in failures[0] and "KeyError" in log.read_text()


def _checkpoint(folder: Path, epochs: int) -> str:
    history = [{"epoch": e, "valid_loss": 1.0 / e, "valid_macro_f1": 0.1 * e,
                "epoch_seconds": 2.0} for e in range(1, epochs + 1)]
    folder.mkdir(parents=True)
    (folder / checkpoints.META_FILE).write_text(json.dumps({"epoch": epochs, "history": history}))
    (folder / checkpoints.MODEL_FILE).write_bytes(b"weights" * epochs)
    checkpoints.write_manifest(folder)
    return str(folder)


def _result(path: Path, trial_id: str, reported: list[dict], metrics: dict,
            checkpoint: str | None = None, error: BaseException | None = None):
    """A Tune Result as trials_table reads it (`checkpoint`: Tune's own, for a trial that
    trained in its process)."""
    return SimpleNamespace(path=str(path / trial_id), error=error, metrics=metrics,
                           checkpoint=checkpoint and SimpleNamespace(path=checkpoint),
                           metrics_dataframe=pd.DataFrame(reported),
                           config={"freeze": "head", "lr": 0.01, "scheduler": "none",
                                   "repeat": 0})


def test_trials_table_comes_from_the_checkpoints(tmp_path):
    exp = config.load(None, [f"storage_path={tmp_path}"])
    first = _checkpoint(tmp_path / "a" / "checkpoint_epoch_0003", 3)
    second = _checkpoint(tmp_path / "b" / "checkpoint_epoch_0002", 2)
    third = _checkpoint(tmp_path / "d" / "checkpoint_000001", 2)
    results = [
        # restored after epoch 2: Tune's own record holds only epoch 3
        _result(tmp_path, "a", [{"epoch": 3, "checkpoint_path": first, "time_total_s": 50.0}],
                {"trial_id": "a", "checkpoint_path": first}),
        # restored twice under one id: once with its history, once re-reporting its end
        _result(tmp_path, "b", [{"epoch": 2, "checkpoint_path": second}],
                {"trial_id": "b", "checkpoint_path": second}),
        _result(tmp_path, "b", [{"epoch": 2}], {"trial_id": "b", "checkpoint_path": second}),
        _result(tmp_path, "c", [], {}),  # failed before its first epoch
        # trained in its trial's process: Tune holds the checkpoint, no checkpoint_path metric
        _result(tmp_path, "d", [{"epoch": 2}], {"trial_id": "d"}, checkpoint=third),
    ]
    table = sweep_trials.trials_table(exp, results)
    assert table.groupby("trial_id")["epoch"].apply(list).to_dict() == {
        "a": [1, 2, 3], "b": [1, 2], "c": [0], "d": [1, 2]}
    assert table.loc[table.trial_id == "a", "time_total_s"].tolist() == [2.0, 4.0, 50.0]
    assert set(table.checkpoint_path.dropna()) == {first, second, third}
    status = table.groupby("trial_id")["status"].first().to_dict()
    assert status == {"a": "finished", "b": "finished", "c": "failed", "d": "finished"}
    assert sweep_trials.failures(table) == [
        "trial c (head lr=1e-02 none r0) failed after 0 epoch(s): it saved no checkpoint"]


def test_failed_and_damaged_trials_are_listed_and_never_selected(tmp_path):
    """A trial that failed past its retries, and one whose only checkpoint is cut short,
    are rows of trials.parquet with their cause; selection uses only the finished ones; a
    damaged last checkpoint falls back to the newest intact one beside it."""
    exp = config.load(None, [f"storage_path={tmp_path}"])
    best = _checkpoint(tmp_path / "best" / "checkpoint_000001", 2)
    killed = _checkpoint(tmp_path / "killed" / "checkpoint_000001", 2)
    cut = _checkpoint(tmp_path / "cut" / "checkpoint_000001", 2)
    (Path(cut) / checkpoints.MODEL_FILE).write_bytes(b"w")  # truncated after its manifest
    older = _checkpoint(tmp_path / "older" / "checkpoint_000000", 1)
    newer = _checkpoint(tmp_path / "older" / "checkpoint_000001", 2)
    (Path(newer) / checkpoints.META_FILE).write_text("{")
    from ray.exceptions import ActorDiedError

    results = [_result(tmp_path, trial, [{"epoch": 1, "valid_macro_f1": 0.9,
                                          "epoch_seconds": 1.0}],
                       {"trial_id": trial}, checkpoint=path, error=error)
               for trial, path, error in (("best", best, None), ("killed", killed,
                                                                 ActorDiedError()),
                                          ("cut", cut, None), ("older", newer, None))]
    for result, freeze in zip(results, ("head", "last1", "last2", "all")):
        result.config = {**result.config, "freeze": freeze}
    for result in results[1:3]:  # better on paper than the trial that finished
        result.metrics_dataframe["valid_macro_f1"] = 1.0
    table = sweep_trials.trials_table(exp, results)
    last = table.groupby("trial_id").last()
    assert last["status"].to_dict() == {"best": "finished", "cut": "failed",
                                        "killed": "failed", "older": "finished"}
    assert last.loc["killed", "cause"].startswith("a Ray process was lost (ActorDiedError")
    assert "model.pt has 1 bytes, its manifest says 14" in last.loc["cut", "cause"]
    assert last.loc["older", "checkpoint_path"] == older and last.loc["older", "epoch"] == 1
    chosen = sweep_trials.select(table, "valid_macro_f1")
    assert {c["freeze"] for c in chosen} == {"head", "all"}
    assert [line.split(" (")[0] for line in sweep_trials.failures(table)] == [
        "trial cut", "trial killed"]


def test_resume_means_resume(tmp_path, capsys):
    """Nothing to resume is said and stops; a changed config lists every difference; a moved
    results folder resumes where it is now."""
    exp = config.load(None, [f"storage_path={tmp_path / 'here'}"])
    with pytest.raises(BoatrayError, match="--resume: nothing to resume in .*here/smoke"):
        sweep.check_results_dir(exp, resume=True)
    sweep.check_results_dir(exp, resume=False)  # a new run: nothing to refuse
    before = config.load(None, [f"storage_path={tmp_path / 'there'}"])
    exp.layout.experiment.parent.mkdir(parents=True)
    exp.layout.experiment.write_text(json.dumps(before.to_dict()))
    sweep.check_results_dir(exp, resume=True)
    assert f"it ran under storage_path {tmp_path / 'there'}" in capsys.readouterr().out
    changed = config.load(None, [f"storage_path={tmp_path / 'here'}", "train.lr=0.01", "seed=3"])
    with pytest.raises(BoatrayError, match=r"different config than .*: seed: 0 -> 3; "
                                           r"train.lr: 0.001 -> 0.01 \(resume with"):
        sweep.check_results_dir(changed, resume=True)


def test_a_full_disk_is_one_line_and_the_run_state_says_failed(tmp_path, monkeypatch, capsys):
    """An OSError(ENOSPC) injected where the run writes (a stand-in for a full disk: the README
    says how it was tried on a real 40 MB one): one line naming the folder, exit 2,
    run_state.json `failed` with the cause and the command that finishes the run."""
    full = tmp_path / "smoke" / "features" / "features.parquet"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    monkeypatch.setattr(sweep, "run", no_space)
    assert sweep.main(["--set", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: no space left on device in {tmp_path / 'smoke'} (")  # the folder that exists
    assert err.rstrip().endswith(f"finish the run with: python -m boatray.sweep --set "
                                 f"storage_path={tmp_path} --resume")
    state = run_state.read_state(tmp_path / "smoke")
    assert state["status"] == "failed" and state["cause"].startswith("no space left on device")
    section = status_section(SimpleNamespace(state=state))  # a report of the folder says so
    assert section.title == "This run failed" and state["resume"] in section.blocks[0]

    exp = config.load(None, [f"storage_path={tmp_path}"])
    for approach in approaches.APPROACHES:
        monkeypatch.setattr(approach, "fit", no_space)
    with pytest.raises(OSError):  # a full disk stops every stage, it is not one stage's failure
        sweep.run_stages(exp, tmp_path / "manifest.parquet", resume=False)


def test_data_without_a_config_is_not_called_synthetic_and_one_class_stops(
        tmp_path, monkeypatch, capsys):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "tree" / split / "gondola").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 8)).save(tmp_path / "tree" / split / "gondola" / f"{i}.jpg")
    monkeypatch.setattr(sweep, "start_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(sweep.preflight, "check", lambda exp, weights=True: (exp, None))
    assert sweep.main(["--data", str(tmp_path / "tree"), "--set", f"storage_path={tmp_path}",
                       "--dry-run"]) == 2
    printed = capsys.readouterr()
    assert "GENERATED" not in printed.out and "smoke experiment's small settings" in printed.out
    assert printed.err == ("error: only 1 training class (gondola): a classifier needs at least "
                           "2; add a folder of images per class\n")


def test_rays_tracebacks_go_to_the_log_file_and_lost_processes_are_one_line(tmp_path, capfd):
    import logging

    from ray.exceptions import ActorDiedError, RayTaskError

    from boatray import ray_errors

    target = ray_errors.keep_in(tmp_path)
    try:
        try:
            raise ValueError("inside Ray")
        except ValueError:
            logging.getLogger("ray.tune.execution").error("Trial task failed", exc_info=True)
        logging.getLogger("ray.data").error("actors died during initialization")
    finally:
        for name in ray_errors.LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                handler.filters = [f for f in handler.filters
                                   if not isinstance(f, ray_errors._NoTracebacks)]
                if isinstance(handler, ray_errors._LogFile):
                    logger.removeHandler(handler)
                    handler.close()
    assert "Trial task failed" not in capfd.readouterr().err
    kept = target.read_text()
    assert "Trial task failed" in kept and "ValueError: inside Ray" in kept
    assert "actors died during initialization" in kept
    lost = RayTaskError("run_trial", "Traceback ...", ActorDiedError())
    assert ray_errors.is_lost(lost) and ray_errors.describe(lost).startswith(
        "a Ray process was lost (ActorDiedError: killed, out of memory")
    assert ray_errors.describe("Failure # 1\nTraceback\nValueError: no checkpoint\n") == (
        "ValueError: no checkpoint")


def test_a_sweep_whose_tune_state_cannot_be_read_is_rebuilt_from_its_trial_folders(tmp_path):
    """The trial that ended keeps its results, the unfinished one resumes from its intact
    checkpoint, the one whose only checkpoint is cut short starts again, the one never started
    starts; the unreadable state is set aside."""
    from boatray.finetune import rebuild

    exp = config.load(None, [f"storage_path={tmp_path}", "train.epochs=2"])
    tune_dir = exp.results_dir / Layout.TUNE

    def trial(name: str, freeze: str, lr: float, epochs: int, done: bool) -> Path:
        folder = tune_dir / name
        folder.mkdir(parents=True)
        config_ = {"freeze": freeze, "lr": lr, "scheduler": "none", "repeat": 0}
        (folder / "params.json").write_text(json.dumps(config_))
        (folder / "result.json").write_text(json.dumps({"epoch": epochs, "done": done}) + "\n")
        if epochs:
            _checkpoint(folder / f"checkpoint_00000{epochs - 1}", epochs)
        return folder

    ended = trial("t_00000-head-lr1e-02-none-r0", "head", 0.01, 2, True)
    running = trial("t_00001-last1-lr1e-02-none-r0", "last1", 0.01, 1, False)
    cut = trial("t_00002-head-lr1e-03-none-r0", "head", 0.001, 1, False)
    (cut / "checkpoint_000000" / checkpoints.MODEL_FILE).write_bytes(b"")
    state = tune_dir / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text('{"trial_data": [["{\\"trial_id\\": ')
    folders = rebuild.trial_folders(exp)
    assert rebuild.problem(str(tune_dir), folders) == (
        f"{state.name} cannot be read (JSONDecodeError)")
    assert rebuild.damage_lines(folders) == [
        "trial t_00002 (head lr=1e-03 none r0): its newest checkpoint is damaged (model.pt has "
        "0 bytes, its manifest says 7); it trains again from epoch 1"]
    plan = rebuild.plan(exp, folders, trials=4)
    assert [f.location for f in plan.kept] == [str(ended)]
    assert {key: f.location for key, f in plan.resumed.items()} == {
        "last1/0.01/none/0": str(running)}
    assert [rebuild.describe_config(c) for c in plan.points] == [
        "head lr=1e-03 none r0", "last1 lr=1e-02 none r0", "last1 lr=1e-03 none r0"]
    assert plan.line() == (
        "the sweep is rebuilt from its trial folders: 1 kept as they ended: t_00000 (head "
        "lr=1e-02 none r0); 1 resume from their checkpoints: t_00001 (last1 lr=1e-02 none r0) "
        "at epoch 1; 2 start again from epoch 1: head lr=1e-03 none r0, last1 lr=1e-03 none r0")
    rebuild.set_aside(str(tune_dir))
    assert not state.exists() and state.with_name(state.name + ".damaged").is_file()
    assert rebuild.problem(str(tune_dir), folders) == "it holds no experiment state"
