"""A resumed sweep whose experiment state names a checkpoint Tune has since replaced: the
trial continues from its newest intact one."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from boatray.finetune.checkpoints import META_FILE, write_manifest
from boatray.finetune.stale_checkpoints import RecoverCheckpoints


def two_steps(config: dict) -> None:
    """Two checkpointed steps; the first run fails right after its first checkpoint."""
    from ray import tune

    checkpoint, step = tune.get_checkpoint(), 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = json.loads((Path(folder) / META_FILE).read_text())["epoch"]
    while step < 2:
        step += 1
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / META_FILE).write_text(json.dumps({"epoch": step}))
            write_manifest(folder)
            tune.report({"epoch": step}, checkpoint=tune.Checkpoint.from_directory(folder))
        if checkpoint is None:
            raise RuntimeError("the first run stops after its first checkpoint")


@pytest.mark.slow
def test_a_trial_whose_recorded_checkpoint_is_gone_resumes_from_its_successor(ray_local,
                                                                              tmp_path):
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        tune.Tuner(two_steps, run_config=tune.RunConfig(
            name="stale", storage_path=str(tmp_path), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[RecoverCheckpoints()])).fit()
        (trial,) = [p for p in (tmp_path / "stale").iterdir() if p.is_dir()]
        # what a driver killed at the wrong moment leaves: the state names checkpoint 0, which
        # Tune deleted when it registered checkpoint 1
        shutil.copytree(trial / "checkpoint_000000", trial / "checkpoint_000001")
        shutil.rmtree(trial / "checkpoint_000000")
        results = tune.Tuner.restore(str(tmp_path / "stale"), trainable=two_steps,
                                     resume_errored=True).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (result,) = results
    assert result.error is None and result.metrics["epoch"] == 2
    assert Path(result.checkpoint.path).name == "checkpoint_000002"
