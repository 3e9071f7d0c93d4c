"""The study's fine-tuning stage: the sweep, its trials table, and the test evaluation of the
selected configurations (the best overall and the best per freeze spec), each repeat a run.
The finished trials' checkpoints then drop their optimizer state (checkpoints.finalize)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from boatray import results, storage
from boatray.config import Experiment
from boatray.finetune import checkpoints, trials, tuning
from boatray.finetune.run import evaluate_and_write
from boatray.finetune.trainer import check_inputs


def run_stage(exp: Experiment, manifest: Path, resume: bool, approach: str) -> None:
    """Fine-tuning sweep, its trials table, and test evaluation of the selected configurations
    (their run records say `approach`)."""
    check_inputs(exp, manifest)
    grid = tuning.run_sweep(exp, manifest, resume=resume)
    table = trials.trials_table(exp, grid)
    written = trials.write_trials(exp, table)
    errors = [r.error for r in grid if r.error]
    print(f"[sweep] {table['trial_id'].nunique()} trials, {len(errors)} failed; "
          f"{written.name} written", flush=True)
    for choice in trials.select(table, exp.sweep.metric):
        for trial in choice["trials"]:
            evaluate_trial(exp, manifest, choice, trial, table, approach)
    for path in table.loc[table["status"] == "finished", trials.CHECKPOINT_PATH].unique():
        checkpoints.finalize(storage.same_kind(exp.storage_uri, path))


def evaluate_trial(exp: Experiment, manifest: Path, choice: dict, trial: dict,
                   table: pd.DataFrame, approach: str) -> None:
    """Predict valid and test with a selected trial's last checkpoint; write its run folder."""
    config_id = results.finetune_config_id(choice["freeze"], choice["lr"], choice["scheduler"])
    name = results.run_name(config_id, trial["repeat"])
    run_dir = exp.layout.run(name)
    if results.is_run(run_dir):
        return
    history = table[table["trial_id"] == trial["trial_id"]]
    wall = float(history["time_total_s"].max())
    evaluate_and_write(
        tuning.trial_experiment(exp, trial), manifest,
        trials.trial_checkpoint(exp, trial["checkpoint_path"]), run_dir,
        {"approach": approach, "selected": choice["selected"], "valid_score": choice["score"],
         "search_space": {"lr": list(exp.sweep.lr)},
         "config_id": config_id, "trial_id": trial["trial_id"],
         "wall_seconds": wall}, time.perf_counter() - wall)
    print(f"[sweep] evaluated {name} ({choice['selected']}) on the test split", flush=True)
