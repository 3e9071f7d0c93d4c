"""Where results live: a local folder or a storage URI (s3://, gs://, ...), through pyarrow.fs.

The one module that tells a URI from a path. With a remote `storage_path`, Ray Tune and Train
write their state and checkpoints straight to the storage; what the driver writes goes to a
local staging folder that `mirror_up` copies there after every stage and `mirror_down` copies
back before a resume.

A URI may carry pyarrow's options as a query (`s3://bucket/prefix?endpoint_override=...`):
build locations with `join`, `parent` and `name`, which keep the query at the end, never by
pasting strings. The S3 endpoint can also come from `AWS_ENDPOINT_URL`, as in every AWS tool.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs

from pyarrow import fs

from boatray.errors import BoatrayError

SEPARATOR = "://"
RAY_STATE = ("tune", "train", "cache")
"""Folders of results/<experiment>/ that only Ray and the caches use."""
WEIGHT_STORE = "tensors"
"""The weight store's folder (weightstore.py): every process writes it straight to storage."""
STAY_REMOTE = (*RAY_STATE, WEIGHT_STORE)
"""Never mirrored: Ray's state, the caches and the weight store."""
DATA_DIR = "data"
ACCESS_PROBE = ".boatray-access-check"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


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


def _split_query(location: str) -> tuple[str, str]:
    """(a location without its query, the query with its `?`, or "")."""
    if not is_remote(location):
        return location, ""
    base, mark, query = location.partition("?")
    return base, mark + query


def join(location: str | Path, *parts: str) -> str:
    """`location`/`parts`: a local path, or a URI with its query kept at the end."""
    if not is_remote(location):
        return str(Path(location, *parts))
    base, query = _split_query(str(location))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def parent(location: str | Path) -> str:
    """The folder holding `location` (a local path or a URI, its query kept)."""
    if not is_remote(location):
        return str(Path(location).parent)
    base, query = _split_query(str(location))
    return base.rstrip("/").rsplit("/", 1)[0] + query


def name(location: str | Path) -> str:
    """The last part of a local path or URI (without the query)."""
    return PurePosixPath(_split_query(str(location))[0]).name


def endpoint(location: str | Path) -> str | None:
    """The S3-compatible endpoint a URI goes to: its `endpoint_override`, else the
    environment's `AWS_ENDPOINT_URL`; None for AWS itself and for local paths."""
    if not str(location).startswith("s3://"):
        return None
    given = parse_qs(_split_query(str(location))[1].lstrip("?")).get("endpoint_override")
    return given[0] if given else next(
        (os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def staging_dir(name: str) -> Path:
    """The local folder the driver writes a remote experiment's results into."""
    return Path(tempfile.gettempdir()) / "boatray-staging" / name


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
    return f"{like.split(SEPARATOR, 1)[0]}{SEPARATOR}{path}{_split_query(like)[1]}"


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


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file at a local path or URI, creating its folder. Readers never see half of it:
    a local file is renamed into place, an object store shows an upload once it is complete."""
    filesystem, path = open_location(location)
    folder = str(PurePosixPath(path).parent)
    filesystem.create_dir(folder, recursive=True)
    target = path if filesystem.type_name != "local" else (
        f"{folder}/.{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp")
    with filesystem.open_output_stream(target) as stream:
        stream.write(data)
    if target != path:
        filesystem.move(target, path)


def delete(location: str | Path) -> None:
    """Delete a file, or a folder with what it holds, at a local path or URI, if it is there."""
    filesystem, path = open_location(location)
    kind = filesystem.get_file_info(path).type
    if kind == fs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == fs.FileType.File:
        filesystem.delete_file(path)


AWS_ERRORS = {"NETWORK_CONNECTION": "the endpoint does not answer",
              "INVALID_ACCESS_KEY_ID": "the credentials are refused (unknown access key)",
              "SIGNATURE_DOES_NOT_MATCH": "the credentials are refused (wrong secret key)",
              "ACCESS_DENIED": "the credentials are refused (access denied)",
              "NO_SUCH_BUCKET": "the bucket does not exist"}


def _cause(exc: Exception) -> str:
    """What went wrong with a storage, in a few words, from pyarrow's message."""
    text = str(exc)
    if re.search(r"Bucket '[^']+' not found", text):
        return AWS_ERRORS["NO_SUCH_BUCKET"]
    code = re.search(r"AWS Error (\w+)", text)
    if code:
        return AWS_ERRORS.get(code.group(1), code.group(1))
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def check_access(location: str | Path, write: bool = True) -> None:
    """Make sure a storage URI can be used, or say why in one line (BoatrayError) before any
    work starts: an endpoint that does not answer, refused credentials, a missing bucket or, to
    read (`write` false), nothing there. To write, a small file is written, read back and
    deleted. Nothing to check for a local path."""
    if not is_remote(location):
        return
    probe = join(location, ACCESS_PROBE)
    try:
        if write:
            write_bytes(probe, b"boatray")
            read_bytes(probe)
            delete(probe)
        else:
            filesystem, path = open_location(location)
            found = filesystem.get_file_info(path).type != fs.FileType.NotFound
    except (OSError, ValueError) as exc:
        where = endpoint(location)
        raise BoatrayError(
            f"storage {_split_query(str(location))[0]} cannot be "
            f"{'written' if write else 'read'}: {_cause(exc)}"
            + (f" (endpoint {where})" if where else "")
            + "; check the URI, the endpoint (AWS_ENDPOINT_URL or ?endpoint_override=) and "
              "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None
    if not write and not found:
        raise BoatrayError(f"nothing at {_split_query(str(location))[0]}")


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
    check_access(location, write=False)
    shutil.rmtree(folder, ignore_errors=True)
    copy((source, folder / relative) for source, relative in files_under(location))
    return folder


def _mirrored(relative: PurePosixPath, stay: tuple[str, ...] = STAY_REMOTE) -> bool:
    """Ray's folders, the caches and the weight store stay on the storage (`stay`); of data/,
    only its files."""
    parts = relative.parts
    return parts[0] not in stay and not (parts[0] == DATA_DIR and len(parts) > 2)


def mirror_up(local: Path, remote: str) -> None:
    """Copy the staging folder's results to a remote storage (nothing for a local one)."""
    if not is_remote(remote) or not local.is_dir():
        return
    copy((path, join(remote, path.relative_to(local).as_posix()))
         for path in sorted(local.rglob("*"))
         if path.is_file() and _mirrored(PurePosixPath(path.relative_to(local).as_posix())))


def mirror_down(local: Path, remote: str) -> None:
    """Copy what a remote storage holds of an experiment into its staging folder."""
    if not is_remote(remote):
        return
    copy((source, local / relative) for source, relative in files_under(remote)
         if _mirrored(relative))


def fetch(remote: str, local: Path, only: Iterable[str] | None = None) -> int:
    """Download an experiment's results from a storage URI into `local`: everything a person
    reads or predicts with (report, runs, models and the weight store they refer to, trials,
    configs), not Ray's state or the caches, or only the files and folders named in `only`;
    return the number of files."""
    check_access(remote, write=False)
    wanted = None if only is None else set(only)
    pairs = [(source, local / relative) for source, relative in files_under(remote)
             if _mirrored(relative, RAY_STATE) and relative.name != ACCESS_PROBE
             and (wanted is None or relative.parts[0] in wanted)]
    copy(pairs)
    return len(pairs)


def replace_folder(local: Path, remote: str) -> None:
    """Make a folder at a URI hold exactly the files of a local folder."""
    written = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
    stale = [source for source, relative in files_under(remote)
             if relative.as_posix() not in written]
    copy((local / relative, join(remote, relative)) for relative in sorted(written))
    for source in stale:
        delete(source)
