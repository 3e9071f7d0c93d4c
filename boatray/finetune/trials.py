"""The sweep's results as a table, one row per trial per epoch (results.Layout.trials), and
the configurations it selects (the best overall and the best per freeze spec) from the trials
that finished: a failed trial is listed with its cause and never selected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from boatray import ray_errors, storage
from boatray.config import Experiment
from boatray.finetune.checkpoints import META_FILE, intact_or_beside, latest_checkpoint
from boatray.results import atomic_write_parquet

CONFIG_KEYS = ("freeze", "lr", "scheduler", "repeat")
CHECKPOINT_PATH = "checkpoint_path"
METRIC_MODES = {"valid_loss": "min", "valid_accuracy": "max", "valid_macro_f1": "max"}
FINISHED, FAILED = "finished", "failed"
REPORTED = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy",
            "valid_macro_f1", "lr", "images_per_second", "epoch_seconds",
            "trainable_parameters")
"""The metrics the training loop reports each epoch (loop.train_loop), as Tune records them."""


def trial_checkpoint(exp: Experiment, path: str):
    """A trial's checkpoint from the `checkpoint_path` Tune reports (a path without the scheme
    of a remote storage_path)."""
    from ray.train import Checkpoint

    return Checkpoint(storage.same_kind(exp.storage_path, path))


def trials_table(exp: Experiment, results: list[tune.Result]) -> pd.DataFrame:
    """One row per trial per epoch: trial_id, the trial's config, status (`finished` or
    `failed`), `cause` (why it failed), its last intact checkpoint, every metric the loop
    records, and `time_total_s` (`_time_total`).

    The rows come from the history in each trial's last intact checkpoint, not from what Tune
    recorded: Tune starts a restored trial's record afresh, the checkpoint holds every epoch.
    A trial Tune restored twice under one id appears once. A trial that failed (its error, or
    no intact checkpoint) keeps the epochs it reported, or one row of epoch 0 without metrics.
    """
    frames: dict[str, pd.DataFrame] = {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("-")[0]
        history = _trial_rows(exp, result)
        earlier = frames.get(trial_id)
        if earlier is None or _rank(history) > _rank(earlier):
            frames[trial_id] = history.assign(trial_id=trial_id)
    table = pd.concat(frames.values(), ignore_index=True)
    first = ["trial_id", "epoch", *CONFIG_KEYS, "status", "cause"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


def _rank(history: pd.DataFrame) -> tuple[bool, int]:
    return bool((history["status"] == FINISHED).all()), int(history["epoch"].max())


def _trial_rows(exp: Experiment, result: tune.Result) -> pd.DataFrame:
    """One trial's rows: from its last intact checkpoint, else from what Tune recorded."""
    cause = ray_errors.describe(result.error) if result.error else None
    checkpoint, history = None, []
    path = _last_checkpoint_path(result) or latest_checkpoint(
        storage.same_kind(exp.storage_path, result.path))  # one Tune had no time to record
    if path:
        checkpoint, problem = intact_or_beside(storage.same_kind(exp.storage_path, path))
        try:
            history = _checkpoint_history(exp, checkpoint) if checkpoint else []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            checkpoint, problem = None, f"its {META_FILE} cannot be read ({type(exc).__name__})"
        if checkpoint is None:
            cause = cause or f"its checkpoint {path} is damaged ({problem})"
    elif cause is None:
        cause = "it saved no checkpoint"
    frame = pd.DataFrame(history) if history else _reported(result)
    config = result.config or json.loads(storage.read_bytes(
        storage.join(storage.same_kind(exp.storage_path, result.path), "params.json")))
    frame = frame.assign(**{key: config[key] for key in CONFIG_KEYS},
                         status=FAILED if cause else FINISHED, cause=cause,
                         checkpoint_path=checkpoint)
    frame["time_total_s"] = _time_total(result, frame)
    return frame


def _reported(result: tune.Result) -> pd.DataFrame:
    """The per-epoch metrics Tune recorded for a trial, or one row of epoch 0 without any."""
    reported = result.metrics_dataframe
    if reported is None or "epoch" not in reported or reported["epoch"].isna().all():
        return pd.DataFrame({"epoch": [0], "epoch_seconds": [0.0]})
    reported = reported[[c for c in REPORTED if c in reported.columns]].dropna(subset=["epoch"])
    return reported.drop_duplicates("epoch", keep="last").astype({"epoch": int})


def _time_total(result: tune.Result, history: pd.DataFrame) -> pd.Series:
    """Tune's `time_total_s` at each epoch (start-up included); for epochs Tune no longer
    records (a restored trial), the cumulated epoch seconds."""
    reported = result.metrics_dataframe
    seconds = history["epoch_seconds"] if "epoch_seconds" in history else history["epoch"] * 0.0
    summed = seconds.fillna(0.0).cumsum()
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
    """The per-epoch metrics a checkpoint's meta.json records."""
    meta = storage.join(storage.same_kind(exp.storage_path, path), META_FILE)
    return list(json.loads(storage.read_bytes(meta))["history"])


def failures(table: pd.DataFrame) -> list[str]:
    """One line per failed trial: which, after how many epochs, and why."""
    failed = table[table["status"] == FAILED].sort_values("epoch").groupby("trial_id").last()
    return [f"trial {trial_id} ({row['freeze']} lr={row['lr']:.0e} {row['scheduler']} "
            f"r{row['repeat']}) failed after {int(row['epoch'])} epoch(s): {row['cause']}"
            for trial_id, row in failed.iterrows()]


def write_trials(exp: Experiment, table: pd.DataFrame) -> Path:
    """Write the trials table into the results folder, atomically."""
    return atomic_write_parquet(exp.layout.trials, table)


def final_epochs(table: pd.DataFrame) -> pd.DataFrame:
    """Each finished trial's last reported epoch (the state its last checkpoint holds)."""
    if "status" in table.columns:
        table = table[table["status"] == FINISHED]
    return table.sort_values("epoch").groupby("trial_id", as_index=False).tail(1)


def rank_configs(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Configurations ranked best first by the mean over their finished repeats of the final
    valid metric."""
    last = final_epochs(table)
    ranked = (last.groupby(["freeze", "lr", "scheduler"], as_index=False)
              .agg(score=(metric, "mean"), score_std=(metric, "std"),
                   repeats=("trial_id", "count"), epochs=("epoch", "max")))
    return ranked.sort_values("score", ascending=METRIC_MODES[metric] == "min",
                              kind="stable").reset_index(drop=True)


def select(table: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """The overall best configuration and the best per freeze spec, each with its finished
    trials' rows (none when no trial finished)."""
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
