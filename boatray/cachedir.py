"""The disk side of a cache folder (decoded images, frozen-prefix activations): whether a new
one fits where it goes, the temporary folder beside it that it is written in, and its
publication by one rename, its info file written last (a folder without one is incomplete)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

FREE_DISK_SHARE = 0.9
"""A new cache may take at most this share of the free space where it is written."""


def nearest_existing(path: str | Path) -> Path:
    """`path`, or its nearest folder that exists."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(folder: str | Path) -> int:
    """The free bytes of the filesystem `folder` is (or will be) on."""
    return shutil.disk_usage(nearest_existing(folder)).free


def fits(needed: int, folder: str | Path) -> bool:
    """Whether `needed` bytes take at most FREE_DISK_SHARE of the free space at `folder`."""
    return needed <= FREE_DISK_SHARE * free_space(folder)


def temporary_beside(folder: Path) -> Path:
    """A new empty folder beside `folder` (`.<name>.<random>.tmp`) to write it in."""
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir(parents=True)
    return temporary


def publish(temporary: Path, folder: Path, info_file: str) -> None:
    """Rename a finished temporary folder (its `info_file` written last) to `folder`; where
    another writer got there first, its equal cache stays and `temporary` is left for the
    caller to remove."""
    try:
        os.rename(temporary, folder)
    except OSError:
        if not (folder / info_file).is_file():
            raise
