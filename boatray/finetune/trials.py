"""The sweep's results as a table, one row per trial per epoch (results.Layout.trials), and
the configurations it selects (the best overall and the best per freeze spec).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from boatray import storage
from boatray.config import Experiment
from boatray.errors import BoatrayError
from boatray.finetune.checkpoints import META_FILE
from boatray.results import atomic_write_parquet

CONFIG_KEYS = ("freeze", "lr", "scheduler", "repeat")
CHECKPOINT_PATH = "checkpoint_path"
METRIC_MODES = {"valid_loss": "min", "valid_accuracy": "max", "valid_macro_f1": "max"}


def trial_checkpoint(exp: Experiment, path: str):
    """A trial's checkpoint from the `checkpoint_path` Tune reports (a path without the scheme
    of a remote storage_path)."""
    from ray.train import Checkpoint

    return Checkpoint(storage.same_kind(exp.storage_path, path))


def trials_table(exp: Experiment, results: tune.ResultGrid) -> pd.DataFrame:
    """One row per trial per epoch: trial_id, the trial's config, status, its last checkpoint,
    every metric the loop records, and `time_total_s` (`_time_total`).

    The rows come from the history in each trial's last checkpoint, not from what Tune
    recorded: Tune starts a restored trial's record afresh, the checkpoint holds every epoch.
    A trial Tune restored twice under one id appears once.
    """
    frames: dict[str, pd.DataFrame] = {}
    for result in results:
        path = _last_checkpoint_path(result)
        history = _checkpoint_history(exp, path) if path else []
        trial_id = (result.metrics or {}).get("trial_id", Path(result.path).name)
        if not history or len(frames.get(trial_id, ())) >= len(history):
            continue
        history = pd.DataFrame(history)
        history["trial_id"] = trial_id
        for key in CONFIG_KEYS:
            history[key] = result.config[key]
        history["status"] = "error" if result.error else "finished"
        history["checkpoint_path"] = path
        history["time_total_s"] = _time_total(result, history)
        frames[trial_id] = history
    if not frames:
        raise BoatrayError("the sweep produced no results: every trial failed before epoch 1")
    table = pd.concat(frames.values(), ignore_index=True)
    first = ["trial_id", "epoch", *CONFIG_KEYS, "status"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


def _time_total(result: tune.Result, history: pd.DataFrame) -> pd.Series:
    """Tune's `time_total_s` at each epoch (start-up included); for epochs Tune no longer
    records (a restored trial), the cumulated epoch seconds."""
    reported = result.metrics_dataframe
    summed = history["epoch_seconds"].cumsum()
    if reported is None or not {"epoch", "time_total_s"} <= set(reported.columns):
        return summed
    by_epoch = reported.drop_duplicates("epoch", keep="last").set_index("epoch")["time_total_s"]
    return history["epoch"].map(by_epoch).fillna(summed)


def _last_checkpoint_path(result: tune.Result) -> str | None:
    """The checkpoint of a trial's last report: Tune's own for a trial that trained in its
    process, else the `checkpoint_path` metric of its Train run (see TuneReportCallback)."""
    last = (result.metrics or {}).get(CHECKPOINT_PATH)
    if not last and result.checkpoint is not None:
        return result.checkpoint.path
    frame = result.metrics_dataframe
    if last or frame is None or CHECKPOINT_PATH not in frame:
        return last
    reported = frame[CHECKPOINT_PATH].dropna()
    return reported.iloc[-1] if len(reported) else None


def _checkpoint_history(exp: Experiment, path: str) -> list[dict]:
    """The per-epoch metrics a checkpoint's meta.json records ([] when it cannot be read)."""
    meta = storage.join(storage.same_kind(exp.storage_path, path), META_FILE)
    try:
        return list(json.loads(storage.read_bytes(meta))["history"])
    except (OSError, ValueError, KeyError):
        return []


def write_trials(exp: Experiment, table: pd.DataFrame) -> Path:
    """Write the trials table into the results folder, atomically."""
    return atomic_write_parquet(exp.layout.trials, table)


def final_epochs(table: pd.DataFrame) -> pd.DataFrame:
    """Each trial's last reported epoch (the state its last checkpoint holds)."""
    return table.sort_values("epoch").groupby("trial_id", as_index=False).tail(1)


def rank_configs(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Configurations ranked best first by the mean over repeats of the final valid metric."""
    last = final_epochs(table)
    ranked = (last.groupby(["freeze", "lr", "scheduler"], as_index=False)
              .agg(score=(metric, "mean"), score_std=(metric, "std"),
                   repeats=("trial_id", "count"), epochs=("epoch", "max")))
    return ranked.sort_values("score", ascending=METRIC_MODES[metric] == "min",
                              kind="stable").reset_index(drop=True)


def select(table: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """The overall best configuration and the best per freeze spec, each with its trials' rows."""
    ranked = rank_configs(table, metric)
    last = final_epochs(table)
    chosen, seen = [], set()
    for index, row in ranked.iterrows():
        if row["freeze"] in seen:
            continue
        seen.add(row["freeze"])
        match = ((last["freeze"] == row["freeze"]) & (last["lr"] == row["lr"])
                 & (last["scheduler"] == row["scheduler"]))
        chosen.append({"freeze": row["freeze"], "lr": float(row["lr"]),
                       "scheduler": row["scheduler"], "score": float(row["score"]),
                       "selected": "best" if index == 0 else "best_per_freeze",
                       "trials": last[match].sort_values("repeat").to_dict("records")})
    return chosen
