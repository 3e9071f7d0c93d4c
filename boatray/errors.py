"""The one user-facing exception and the thin CLI wrapper that turns it into one line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class BoatrayError(Exception):
    """A failure caused by the user's input: its message is written for a person."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a `main(argv=None)`: a BoatrayError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except BoatrayError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
