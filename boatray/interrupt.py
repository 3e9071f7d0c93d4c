"""Ctrl-C (SIGINT) and SIGTERM: stop the run cleanly, and know that it was stopped.

Outside the sweep a signal raises `Interrupted` at once. During the sweep, a SIGINT or
SIGTERM is recorded and handed to Ray Tune's own SIGINT handler, which stops the trials, saves
the experiment state and makes `Tuner.fit()` return the partial results; `after_tune()` then
raises `Interrupted`, so no stage treats a partial sweep as the study.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """The run was stopped by a signal (a BaseException, like KeyboardInterrupt: no
    `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


_received: list[int] = []
_installed: list[bool] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM (call once, in the driver's main thread)."""
    _received.clear()
    _installed[:] = [True]
    for signum in EXIT_CODES:
        signal.signal(signum, _on_signal)


def during_tune() -> None:
    """Call once Tune has put its SIGINT handler in place (a Tune callback's `setup`): a
    SIGINT or SIGTERM is then recorded and handed to Tune's handler, which stops the sweep
    gracefully and puts ours back (so a second Ctrl-C stops at once)."""
    tune_handler = signal.getsignal(signal.SIGINT)
    if not _installed or not callable(tune_handler) or tune_handler is _on_signal:
        return

    def graceful(signum: int, frame: FrameType | None) -> None:
        _received.append(signum)
        signal.signal(signal.SIGTERM, _on_signal)
        tune_handler(signal.SIGINT, frame)

    for signum in EXIT_CODES:
        signal.signal(signum, graceful)


def after_tune() -> None:
    """Call right after `Tuner.fit()` returns: raise `Interrupted` when a signal stopped it."""
    if _installed:
        for signum in EXIT_CODES:
            signal.signal(signum, _on_signal)
    if _received:
        raise Interrupted(_received[0])
