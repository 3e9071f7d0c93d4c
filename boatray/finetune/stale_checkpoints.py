"""A resumed sweep whose experiment state is older than its trials' checkpoints.

Tune deletes a trial's previous checkpoint as soon as it registers a new one, and uploads the
experiment state that names the new one afterwards, in the background. A driver killed in
between leaves a state that names a checkpoint that is gone, and Tune then fails that trial
("does not exist on storage anymore") instead of restoring it. On an object store the upload
takes long enough to be hit: a SIGKILL right after a trial finished loses the trial.
`RecoverCheckpoints` points every such trial at the checkpoint that replaced it before anything
restarts: Ray 2.60's record of the trial's latest checkpoint is changed in place.
"""

from __future__ import annotations

from pyarrow import fs
from ray import tune

from boatray.finetune.checkpoints import META_FILE

RAY_CHECKPOINT_PREFIX = "checkpoint_"
"""How Tune names a trial's checkpoint folders: checkpoint_000001, ..."""


def checkpoint_index(path: str) -> int | None:
    """The index in a Tune checkpoint folder's name (checkpoint_000001 -> 1)."""
    suffix = path.rstrip("/").rsplit("/", 1)[-1].removeprefix(RAY_CHECKPOINT_PREFIX)
    return int(suffix) if suffix.isdigit() else None


def successor(filesystem: fs.FileSystem, trial_path: str, gone: int) -> tuple[int, str] | None:
    """(index, path) of the oldest checkpoint of a trial newer than checkpoint `gone`, with its
    meta.json; None where there is none. Tune deleted `gone` when it registered a newer one, and
    deletes a registered checkpoint only once a newer one is registered: the oldest newer one
    is therefore complete (a newer one still may be half uploaded)."""
    found = sorted((index, info.path) for info in filesystem.get_file_info(
        fs.FileSelector(trial_path, allow_not_found=True))
        if info.type == fs.FileType.Directory
        and (index := checkpoint_index(info.path)) is not None and index > gone)
    for index, path in found:
        if filesystem.get_file_info(f"{path}/{META_FILE}").type == fs.FileType.File:
            return index, path
    return None


class RecoverCheckpoints(tune.Callback):
    """Before a resumed sweep restarts anything: a trial whose recorded checkpoint is gone
    continues from the one that replaced it."""

    def __init__(self) -> None:
        self.checked = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.checked:
            return
        self.checked = True
        from ray.train import Checkpoint

        for trial in trials:
            recorded = trial.checkpoint
            if recorded is None or recorded.filesystem.get_file_info(
                    recorded.path).type != fs.FileType.NotFound:
                continue
            filesystem, gone = trial.storage.storage_filesystem, checkpoint_index(recorded.path)
            found = None if gone is None else successor(filesystem, trial.storage.trial_fs_path,
                                                        gone)
            if found is None:
                continue
            index, path = found
            trial.latest_checkpoint_result.checkpoint = Checkpoint(path, filesystem)
            trial.storage.current_checkpoint_index = index  # the next one is index + 1
            trial.invalidate_json_state()
            trial.run_metadata.invalidate_cache()
