"""Ray's errors in the driver: kept in results/<experiment>/logs/, said in one line.

Ray prints a lost worker's or actor's traceback on the driver's console (Tune's "Trial task
failed", Ray Data's failed operators, the raylet's "A worker died" notices). `keep_in` sends
them to logs/ray-errors.log instead; boatray's own line says what was lost and what it did
(console.TrialLines for a trial, the stage's failure line otherwise), with `describe`.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FILE = "ray-errors.log"
LOGGERS = ("ray", "ray.data")  # the two Ray loggers with console handlers of their own


class _LogFile(logging.FileHandler):
    """The log file; a record it cannot write (a full disk) is dropped, not printed."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _NoTracebacks(logging.Filter):
    """Keeps Ray's errors and tracebacks off the console (they go to the log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.exc_info


def keep_in(logs: Path) -> Path:
    """From now on, Ray's error records and tracebacks in this process, and the raylet's
    notices of dead workers, go to `logs`/ray-errors.log and not to the console; return it."""
    logs.mkdir(parents=True, exist_ok=True)
    target = logs / LOG_FILE
    handler = _LogFile(target, delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for console in logger.handlers:
            if not isinstance(console, logging.FileHandler) and isinstance(
                    console, logging.StreamHandler):
                console.addFilter(_NoTracebacks())
        logger.addHandler(handler)
    _divert_raylet_notices(handler)
    return target


def _divert_raylet_notices(handler: logging.Handler) -> None:
    """The raylet's error notices (a worker died, ...) reach the driver through
    `ray._private.worker.print_to_stdstream`, not through logging."""
    try:
        from ray._private import worker
    except ImportError:  # a Ray without this private module: its notices stay on the console
        return
    printer = worker.print_to_stdstream
    if getattr(printer, "boatray_diverted", False):
        return

    def divert(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            handler.emit(logging.makeLogRecord({"name": "raylet", "levelno": logging.ERROR,
                                                "levelname": "ERROR", "msg": line}))

    divert.boatray_diverted = True
    worker.print_to_stdstream = divert


def describe(error: BaseException | str) -> str:
    """An error from Ray (or the text Tune kept of it) in one line: what was lost, or what was
    raised, without Ray's traceback."""
    if isinstance(error, str):
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        return lines[-1] if lines else "it failed"
    lost = next((e for e in _chain(error) if isinstance(e, _lost_kinds())), None)
    if lost is not None:
        where = "its node went away" if "Node" in type(lost).__name__ else (
            "killed, out of memory, or its node went away")
        return f"a Ray process was lost ({type(lost).__name__}: {where})"
    cause = error
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def is_lost(error: BaseException) -> bool:
    """Whether a Ray process or node was lost behind `error` (nothing the user's input did)."""
    return any(isinstance(e, _lost_kinds()) for e in _chain(error))


def _lost_kinds() -> tuple[type, ...]:
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    return RayActorError, NodeDiedError, WorkerCrashedError


def _chain(error: BaseException):
    """`error` and what caused it, through Ray's wrappers (`cause`) and Python's chaining."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
