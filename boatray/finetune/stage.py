"""The study's fine-tuning stage: the sweep, its trials table, and the test evaluation of the
selected configurations (the best overall and the best per freeze spec), each repeat a run.
The finished trials' checkpoints then drop their optimizer state (checkpoints.finalize).
Only trials that finished are selected; the failed ones are the stage's partial failures."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from boatray import results, storage
from boatray.config import Experiment
from boatray.errors import BoatrayError
from boatray.finetune import checkpoints, trials, tuning
from boatray.finetune.run import evaluate_and_write
from boatray.finetune.trainer import check_inputs


def run_stage(exp: Experiment, manifest: Path, resume: bool, approach: str) -> list[str]:
    """Fine-tuning sweep, its trials table, and test evaluation of the selected configurations
    (from the trials that finished; their run records say `approach`); return one line per
    failed trial."""
    check_inputs(exp, manifest)
    grid = tuning.run_sweep(exp, manifest, resume=resume)
    table = trials.trials_table(exp, grid)
    written = trials.write_trials(exp, table)
    failed = trials.failures(table)
    print(f"[sweep] {table['trial_id'].nunique()} trials, {len(failed)} failed; "
          f"{written.name} written", flush=True)
    chosen = trials.select(table, exp.sweep.metric)
    if not chosen:
        raise BoatrayError(f"no trial of the sweep finished ({failed[0]}); the others are in "
                           f"{written}")
    for choice in chosen:
        for trial in choice["trials"]:
            evaluate_trial(exp, manifest, choice, trial, table, approach)
    for path in table.loc[table["status"] == trials.FINISHED, trials.CHECKPOINT_PATH].unique():
        checkpoints.finalize(storage.same_kind(exp.storage_uri, path))
    return failed


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
         "search_space": {"lr": list(exp.sweep.rates(choice["freeze"]))},
         "config_id": config_id, "trial_id": trial["trial_id"],
         "wall_seconds": wall}, time.perf_counter() - wall)
    print(f"[sweep] evaluated {name} ({choice['selected']}) on the test split", flush=True)
