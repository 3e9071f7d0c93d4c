"""What the sweep prints: boatray's own lines, Ray's output kept in files.

Quiet by default: Ray's workers and actors write to Ray's session log files, not to the
console (`ray.init(log_to_driver=False)`); Ray's, Tune's and Ray Data's own log lines in the
driver and Python's warnings go to results/<experiment>/logs/driver.log (`route_driver_logs`),
and `keep_ray_logs` copies the session's logs into the same folder at the end of the run;
`--verbose` shows them live, as Ray does. `TrialLines` is the Tune callback that prints one
compact line per trial epoch and one per trial end, with an ETA from the sweep's own pace.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ray import tune

from boatray.results import Layout


def ray_logs_dir() -> Path | None:
    """The running local Ray session's log folder (None when unknown, e.g. a remote cluster)."""
    try:
        from ray._private import worker

        node = worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (ImportError, AttributeError):  # a Ray without this private handle
        return None


def keep_ray_logs(results_dir: Path) -> Path | None:
    """Copy the local Ray session's worker and actor output (*.out, *.err) into
    results_dir/logs/; return that folder, or None when there is no local session."""
    source = ray_logs_dir()
    if source is None or not source.is_dir():
        return None
    target = Layout(Path(results_dir)).logs
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*"):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            shutil.copyfile(path, target / path.name)
    return target


DRIVER_LOG = "driver.log"
"""Ray's own log lines in the driver and Python's warnings, in results/<experiment>/logs/."""


def route_driver_logs(results_dir: Path, verbose: bool = False) -> Path:
    """Send Ray's, Tune's and Ray Data's log lines in this (the driver's) process, INFO and up,
    and Python's warnings to results_dir/logs/driver.log (returned); with `verbose` they still
    reach the console too. Call it before Ray starts: `ray.init` itself warns."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which this then reroutes)

    path = Layout(Path(results_dir)).logs / DRIVER_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in ("ray", "ray.data", "py.warnings"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.FileHandler) and old.baseFilename.endswith(DRIVER_LOG):
                logger.removeHandler(old)  # an earlier run's, in this process
            elif not verbose and _to_console(old):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("ray").setLevel(logging.INFO)
    return path


class _Prefixed(io.TextIOBase):
    """A text stream that writes every line to `target` with `prefix` in front."""

    def __init__(self, target: TextIO, prefix: str) -> None:
        self.target, self.prefix, self.pending = target, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.target.write(f"{self.prefix}{line}\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.target.write(f"{self.prefix}{self.pending}\n")
            self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Inside the block, every line printed to stdout starts with `prefix` (`[data] `), so that
    the console says whose each line is."""
    stream = _Prefixed(sys.stdout, prefix)
    with contextlib.redirect_stdout(stream):
        yield
    stream.flush()


def _to_console(handler: logging.Handler) -> bool:
    """Whether a log handler writes to the console (stderr or stdout), not to a file."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler)


def duration(seconds: float) -> str:
    """`42 s`, `3.5 min` or `1.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


EPOCH_LINE_EVERY_S = 5.0
"""A trial's epoch lines on cached activations come at most this often, but for its first and
last epochs."""


class TrialLines(tune.Callback):
    """One line per trial epoch (for a trial on cached activations, one every
    EPOCH_LINE_EVERY_S and the first and last) and one per trial end.

    Rates say what they count: images through the network, or cached activations for a trial
    that trains on the frozen-prefix cache. `epochs`: each freeze spec's. The ETA is the
    sweep's measured pace (elapsed time per finished epoch, all trials together, start-up
    included) times the epochs still to run (a trial not started yet counted at the mean of
    `epochs`); a trial that ASHA stops early makes it shorter than shown.
    """

    def __init__(self, total_trials: int, epochs: dict[str, int], metric: str,
                 cached: set[tuple[str, int]] = frozenset()) -> None:
        self.total, self.epochs, self.metric = total_trials, epochs, metric
        self.cached = cached  # (freeze, repeat) of the trials that train on cached activations
        self.start = time.monotonic()
        self.done_epochs: dict[str, int] = {}
        self.numbers: dict[str, int] = {}
        self.lengths: dict[str, int] = {}  # trial id -> its epochs
        self.shown: dict[str, float] = {}  # trial id -> when its last epoch line was printed
        self.finished: set[str] = set()

    def _eta(self) -> str:
        done = sum(self.done_epochs.values())
        left = sum(self.lengths[t] - self.done_epochs.get(t, 0) for t in self.numbers
                   if t not in self.finished)
        left += (self.total - len(self.numbers)) * sum(self.epochs.values()) / len(self.epochs)
        if not done:
            return "ETA unknown"
        return f"ETA {duration((time.monotonic() - self.start) / done * max(left, 0))}"

    def _name(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        cfg = trial.config
        self.lengths[trial.trial_id] = self.epochs[cfg["freeze"]]
        return (f"trial {number}/{self.total} {trial.trial_id} {cfg['freeze']} lr={cfg['lr']:.0e} "
                f"{cfg['scheduler']} r{cfg['repeat']}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        name = self._name(trial)
        epoch = int(result.get("epoch", 0))
        self.done_epochs[trial.trial_id] = epoch
        now, length = time.monotonic(), self.lengths[trial.trial_id]
        cached = (trial.config["freeze"], int(trial.config["repeat"])) in self.cached
        recent = now - self.shown.get(trial.trial_id, -EPOCH_LINE_EVERY_S) < EPOCH_LINE_EVERY_S
        if cached and recent and epoch not in (1, length):
            return  # quick epochs on cached activations: a line every few seconds
        self.shown[trial.trial_id] = now
        unit = "cached activations/s" if cached else "images/s"
        print(f"[sweep] {name} {epoch_text(result, length, unit)}, "
              f"{duration(float(result.get('time_total_s', 0.0)))} | {self._eta()}", flush=True)

    def _end(self, trial, what: str) -> None:
        name = self._name(trial)
        self.finished.add(trial.trial_id)
        result = trial.last_result or {}
        epoch = int(result.get("epoch", 0))
        early = (" (stopped early by ASHA)" if what == "done"
                 and epoch < self.lengths[trial.trial_id] else "")
        print(f"[sweep] {name} {what} after {epoch} epoch(s){early}: {self.metric} "
              f"{_num(result, self.metric)} in {duration(float(result.get('time_total_s', 0)))}"
              f" | {len(self.finished)}/{self.total} trials ended, {self._eta()}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, f"FAILED ({_error(trial)}; no retry left)")


def _error(trial) -> str:
    """What stopped a trial, in one line (its traceback is under logs/ and tune/), from the
    error files Tune just wrote in the trial's local folder."""
    import ray.cloudpickle

    from boatray.ray_errors import describe

    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).is_file():
            return describe(ray.cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()))
        if trial.error_file and Path(trial.error_file).is_file():
            return describe(Path(trial.error_file).read_text())
    except Exception:  # noqa: BLE001 - an error Tune kept in a form this Ray cannot load
        pass
    return "it failed (its error.txt is in its folder under tune/)"


def epoch_text(result: dict, epochs: int, unit: str = "images/s") -> str:
    """`epoch 2/3: loss 0.812 / valid 0.934, valid macro-F1 0.713, 480 images/s` of one
    epoch's reported metrics."""
    rate = result.get("images_per_second")
    return (f"epoch {int(result.get('epoch', 0))}/{epochs}: loss {_num(result, 'train_loss')}"
            f" / valid {_num(result, 'valid_loss')}, valid macro-F1 "
            f"{_num(result, 'valid_macro_f1')}, "
            f"{f'{rate:,.0f}' if isinstance(rate, (int, float)) else '?'} {unit}")


def _num(result: dict, key: str) -> str:
    value = result.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"
