"""Where results live: a local folder or a storage URI (s3://, gs://, ...), through pyarrow.fs.

The one module that tells a URI from a path. With a remote `storage_path`, Ray Tune and Train
write their state and checkpoints straight to the storage; what the driver writes goes to a
local staging folder that `mirror_up` copies there after every stage and `mirror_down` copies
back before a resume.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from pyarrow import fs

SEPARATOR = "://"
STAY_REMOTE = ("tune", "train", "cache")
"""Folders of results/<experiment>/ that only Ray and the caches use: never mirrored."""
DATA_DIR = "data"


def is_remote(location: str | Path) -> bool:
    """Whether `location` is a storage URI rather than a local path."""
    return SEPARATOR in str(location)


def absolute(location: str, base: Path) -> str:
    """A URI as it is; a local path joined to `base`, and resolved when that makes it absolute
    (a `~/...` base stays as written: it is the home of the node that runs the driver)."""
    if is_remote(location):
        return location
    path = base / Path(location).expanduser()
    return str(path.resolve() if path.is_absolute() else path)


def staging_dir(name: str) -> Path:
    """The local folder the driver writes a remote experiment's results into."""
    return Path(tempfile.gettempdir()) / "boatray" / name


def open_location(location: str | Path) -> tuple[fs.FileSystem, str]:
    """(the filesystem, the path in it) of a local path or a URI."""
    location = str(location)
    return fs.FileSystem.from_uri(location if is_remote(location)
                                  else str(Path(location).resolve()))


def same_kind(like: str | Path, path: str) -> str:
    """`path` (as pyarrow.fs names it, without a scheme) as a location of the same kind as
    `like`: with `like`'s scheme for a URI, as it is for a local path."""
    like = str(like)
    if not is_remote(like) or is_remote(path):
        return path
    return f"{like.split(SEPARATOR, 1)[0]}{SEPARATOR}{path}"


def location_of(filesystem: fs.FileSystem, path: str) -> str:
    """A (filesystem, path) pair, e.g. a Ray checkpoint's, as one local path or URI."""
    kind = filesystem.type_name
    return path if kind == "local" else f"{kind}{SEPARATOR}{path}"


def is_file(location: str | Path) -> bool:
    """Whether a file exists at a local path or URI."""
    filesystem, path = open_location(location)
    return filesystem.get_file_info(path).type == fs.FileType.File


def files_under(location: str | Path) -> Iterator[tuple[str, PurePosixPath]]:
    """(location, path relative to `location`) of every file below a folder or URI."""
    filesystem, base = open_location(location)
    if filesystem.get_file_info(base).type != fs.FileType.Directory:
        return
    for info in filesystem.get_file_info(fs.FileSelector(base, recursive=True)):
        if info.type == fs.FileType.File:
            yield same_kind(location, info.path), PurePosixPath(info.path).relative_to(base)


def read_bytes(location: str | Path) -> bytes:
    """The content of a file at a local path or URI."""
    filesystem, path = open_location(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def copy(pairs: Iterable[tuple[str | Path, str | Path]]) -> None:
    """Copy files, each (source, target) a local path or URI, creating target folders."""
    for source, target in pairs:
        source_fs, source_path = open_location(source)
        target_fs, target_path = open_location(target)
        target_fs.create_dir(str(PurePosixPath(target_path).parent), recursive=True)
        fs.copy_files(source_path, target_path, source_fs, target_fs)


def local_copy(location: str | Path, folder: Path) -> Path:
    """A folder at a URI downloaded into `folder` (emptied first); a local path as it is."""
    if not is_remote(location):
        return Path(location)
    shutil.rmtree(folder, ignore_errors=True)
    copy((source, folder / relative) for source, relative in files_under(location))
    return folder


def _mirrored(relative: PurePosixPath) -> bool:
    """Ray's folders and the caches stay on the storage; of data/, only its files."""
    parts = relative.parts
    return parts[0] not in STAY_REMOTE and not (parts[0] == DATA_DIR and len(parts) > 2)


def mirror_up(local: Path, remote: str) -> None:
    """Copy the staging folder's results to a remote storage (nothing for a local one)."""
    if not is_remote(remote) or not local.is_dir():
        return
    copy((path, f"{remote}/{path.relative_to(local).as_posix()}")
         for path in sorted(local.rglob("*"))
         if path.is_file() and _mirrored(PurePosixPath(path.relative_to(local).as_posix())))


def mirror_down(local: Path, remote: str) -> None:
    """Copy what a remote storage holds of an experiment into its staging folder."""
    if not is_remote(remote):
        return
    copy((source, local / relative) for source, relative in files_under(remote)
         if _mirrored(relative))
