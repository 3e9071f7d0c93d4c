"""A resumed sweep whose experiment state is older than its trials' checkpoints.

Tune saves its experiment state every so often, in the background (and when a trial has
written KEEP_CHECKPOINTS checkpoints since the last save), and deletes a trial's oldest
checkpoint as soon as it registers a newer one. A driver killed in between leaves a state that
names an older checkpoint of a trial than its newest, one that is gone (Tune would fail the
trial: "does not exist on storage anymore"), or none at all (the trial would train again from
epoch 1). `RecoverCheckpoints` points every trial that has not ended at its newest intact
checkpoint (its files match its manifest: checkpoints.folder_problem) before anything restarts:
Ray 2.60's record of the trial's latest checkpoint is changed in place.
"""

from __future__ import annotations

from pyarrow import fs
from ray import tune

from boatray.finetune.checkpoints import folder_problem

RAY_CHECKPOINT_PREFIX = "checkpoint_"
"""How Tune names a trial's checkpoint folders: checkpoint_000001, ..."""


def checkpoint_index(path: str) -> int | None:
    """The index in a Tune checkpoint folder's name (checkpoint_000001 -> 1)."""
    suffix = path.rstrip("/").rsplit("/", 1)[-1].removeprefix(RAY_CHECKPOINT_PREFIX)
    return int(suffix) if suffix.isdigit() else None


def newest_intact(filesystem: fs.FileSystem, trial_path: str
                  ) -> tuple[tuple[int, str] | None, str | None]:
    """((index, path) of a trial's newest checkpoint whose files match its manifest, or None
    where it has none; why its newest checkpoint is not that one, or None where it is): a newer
    one may be half written, or damaged. One listing of the trial's folder."""
    found = sorted(((index, info.path) for info in filesystem.get_file_info(
        fs.FileSelector(trial_path, allow_not_found=True))
        if info.type == fs.FileType.Directory
        and (index := checkpoint_index(info.path)) is not None), reverse=True)
    damage = None
    for index, path in found:
        problem = folder_problem(filesystem, path)
        if problem is None:
            return (index, path), damage
        damage = damage or problem
    return None, damage


class RecoverCheckpoints(tune.Callback):
    """Before a resumed sweep restarts anything: every trial that has not ended continues from
    its newest intact checkpoint, whatever the experiment state recorded."""

    def __init__(self) -> None:
        self.checked = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.checked:
            return
        self.checked = True
        for trial in trials:
            if trial.status != trial.TERMINATED:
                _point_at_newest(trial)


def _point_at_newest(trial) -> None:
    """Make a Tune trial's latest checkpoint its newest intact one, where that is another; one
    line where its newest is damaged."""
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    from boatray.finetune.rebuild import describe_config

    filesystem = trial.storage.storage_filesystem
    newest, damage = newest_intact(filesystem, trial.storage.trial_fs_path)
    if damage:
        print(f"[sweep] trial {trial.trial_id} ({describe_config(trial.config)}): its newest "
              f"checkpoint is damaged ({damage}); it "
              + (f"resumes from {newest[1]}" if newest else "trains again from epoch 1"),
              flush=True)
    recorded = trial.checkpoint
    if newest is None or (recorded is not None and recorded.path.rstrip("/") == newest[1]):
        return
    index, path = newest
    checkpoint = Checkpoint(path, filesystem)
    if trial.latest_checkpoint_result is not None:
        trial.latest_checkpoint_result.checkpoint = checkpoint
    else:  # none recorded: as Tune registers one a trial reports
        trial.run_metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=checkpoint, metrics={}))
    trial.storage.current_checkpoint_index = index  # the next one is index + 1
    trial.invalidate_json_state()
    trial.run_metadata.invalidate_cache()
