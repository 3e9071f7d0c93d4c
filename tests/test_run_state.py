"""One run per results folder, signals, failed stages, the trials table from checkpoints."""

from __future__ import annotations

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
    return str(folder)


def _result(path: Path, trial_id: str, reported: list[dict], metrics: dict,
            checkpoint: str | None = None):
    """A Tune Result as trials_table reads it (`checkpoint`: Tune's own, for a trial that
    trained in its process)."""
    return SimpleNamespace(path=str(path / trial_id), error=None, metrics=metrics,
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
    assert table.groupby("trial_id")["epoch"].apply(list).to_dict() == {"a": [1, 2, 3],
                                                                       "b": [1, 2], "d": [1, 2]}
    assert table.loc[table.trial_id == "a", "time_total_s"].tolist() == [2.0, 4.0, 50.0]
    assert set(table.checkpoint_path) == {first, second, third}
