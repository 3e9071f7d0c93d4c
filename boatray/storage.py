"""Results on shared storage: the driver writes locally and mirrors to a remote storage_path.

With `storage_path: s3://bucket/prefix`, Ray Tune and Train write their experiment state and
checkpoints straight to `<storage_path>/<experiment>/{tune,train}`; everything the driver
writes (experiment.json, trials.parquet, runs/, features/, report/, the manifest) goes to a
local staging folder (`Experiment.results_dir`) that is copied up after every stage and copied
down before a resume. A local storage_path needs none of this.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pyarrow import fs

from boatray.config import Experiment

RAY_DIRS = ("tune", "train", "cache")
DATA_DIR = "data"


def _mirrored(relative: PurePosixPath) -> bool:
    """Ray's folders and the prefix cache stay on the storage; of data/, only its files."""
    parts = relative.parts
    return parts[0] not in RAY_DIRS and not (parts[0] == DATA_DIR and len(parts) > 2)


def _copy(files: list[tuple[str, str]], source: fs.FileSystem, target: fs.FileSystem) -> None:
    for source_path, target_path in files:
        target.create_dir(str(PurePosixPath(target_path).parent), recursive=True)
        fs.copy_files(source_path, target_path, source, target)


def mirror_up(exp: Experiment) -> None:
    """Copy the staging folder's results to the remote storage."""
    if not exp.remote_storage or not exp.results_dir.is_dir():
        return
    remote, base = fs.FileSystem.from_uri(exp.storage_uri)
    local = exp.results_dir
    files = [(str(path), f"{base}/{path.relative_to(local).as_posix()}")
             for path in sorted(local.rglob("*"))
             if path.is_file() and _mirrored(PurePosixPath(path.relative_to(local).as_posix()))]
    _copy(files, fs.LocalFileSystem(), remote)


def mirror_down(exp: Experiment) -> None:
    """Copy what the remote storage holds of this experiment into the staging folder."""
    if not exp.remote_storage:
        return
    remote, base = fs.FileSystem.from_uri(exp.storage_uri)
    if remote.get_file_info(base).type != fs.FileType.Directory:
        return
    infos = remote.get_file_info(fs.FileSelector(base, recursive=True))
    files = []
    for info in infos:
        relative = PurePosixPath(info.path).relative_to(base)
        if info.type == fs.FileType.File and _mirrored(relative):
            files.append((info.path, str(exp.results_dir / relative)))
    _copy(files, remote, fs.LocalFileSystem())
