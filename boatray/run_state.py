"""One run per results folder, and what state the last run left it in.

`run.lock` names the driver (pid and host) and is held with an exclusive `flock` while the
sweep runs: a second sweep on the same folder is refused in one line naming the holder, and
the lock of a process that is gone (killed, crashed) is released by the system and taken
over. `run_state.json` says whether the folder's run is `running`, `interrupted` or
`finished` (with its failed stages), so a report written from the folder can say when it is
not the whole study.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from boatray.errors import BoatrayError
from boatray.results import Layout, atomic_write_text


class RunLock:
    """The driver's hold on a results folder (a context manager): an exclusive `flock` on
    run.lock, which the system releases when the process ends however it ends."""

    def __init__(self, results_dir: Path) -> None:
        self.path = Layout(Path(results_dir)).lock
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _holder(self.path)
            raise BoatrayError(f"{self.path.parent} is in use by another run ({holder}); "
                               "wait for it to end, or use another --set name=...") from None
        previous = _holder(self.path)
        if previous != "nobody":
            print(f"[boatray] taking over {self.path} from {previous}, which is gone", flush=True)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file stays: unlinking it would race the next run
            os.close(self.fd)  # releases the lock
            self.fd = None


def _holder(path: Path) -> str:
    """Who a lock file names, as words."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "nobody"
    return f"pid {holder['pid']} on {holder.get('host', 'an unknown host')}"


def write_state(results_dir: Path, status: str, **details: Any) -> None:
    """Record the run's state: running, interrupted (with the signal) or finished (with the
    failed stages)."""
    atomic_write_text(Layout(Path(results_dir)).state,
                      json.dumps({"status": status, **details}, indent=2) + "\n")


def read_state(results_dir: Path) -> dict[str, Any] | None:
    """The recorded state, or None when the folder has none (or it cannot be read)."""
    try:
        state = json.loads(Layout(Path(results_dir)).state.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
