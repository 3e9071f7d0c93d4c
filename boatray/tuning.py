"""The fine-tuning sweep on Ray Tune: a trial trains in its own process, or drives a Train run.

Three layers, each with its own Ray API (RAY_2.60_NOTES.md): the training loop (train.py), the
trial function here, and the driver's Tuner (`run_sweep`). A trial with one worker (one GPU,
the default) runs the loop in the Tune trial's own process (sessions.TrialSession): Tune keeps
its checkpoints, retries it from the last one (FailureConfig) and, with `reuse_actors`, hands
the process to the next trial, so start-up is paid per slot rather than per trial. A trial
with 2+ workers builds and fits a TorchTrainer (DDP) whose metrics reach Tune through
`TuneReportCallback`. Before the first trial starts, the driver computes every frozen-prefix
cache the trials can use (`sweep_caches`) and hands each trial its location.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from boatray import console, interrupt, prefix_cache, train
from boatray.config import Experiment, from_dict
from boatray.errors import BoatrayError
from boatray.results import atomic_write_parquet

TUNE_DIR = "tune"
TRAIN_DIR = "train"
TRIALS = "trials.parquet"
CONFIG_KEYS = ("freeze", "lr", "scheduler", "repeat")
CHECKPOINT_PATH = "checkpoint_path"
METRIC_MODES = {"valid_loss": "min", "valid_accuracy": "max", "valid_macro_f1": "max"}


def trial_experiment(experiment: dict, config: dict) -> Experiment:
    """The base settings with one trial's freeze, lr, scheduler and seed."""
    exp = from_dict(experiment)
    exp.train.freeze = config["freeze"]
    exp.train.lr = float(config["lr"])
    exp.train.scheduler = config["scheduler"]
    exp.train.seed = exp.seed + int(config["repeat"])
    return exp


def in_trial_process(exp: Experiment) -> bool:
    """Whether the sweep's trials train in their own process (1 worker) or drive a Train run."""
    return exp.train.num_workers <= 1


def trial_resources(exp: Experiment) -> dict[str, float]:
    """What a trial's own process asks for.

    Training in it: one worker's CPUs and GPU. Driving a Train run: `sweep.trial_resource`
    names a custom resource, e.g. `trial_driver` on a cluster's head node (cluster.yaml), one
    unit per trial; otherwise a sliver of a CPU.
    """
    if in_trial_process(exp):
        return train.trial_resources(exp.train)
    if exp.sweep.trial_resource:
        return {exp.sweep.trial_resource: 1.0}
    return {"cpu": 0.01}


def run_trial(config: dict, experiment: dict, manifest: str, train_storage: str,
              caches: dict[str, str | None]) -> None:
    """One Tune trial with this configuration: the training loop here (1 worker), or a
    TorchTrainer whose metrics flow back to Tune (2+ workers).

    The Train run is named after the trial id, which survives a Tuner restore, so a resumed
    trial resumes its Train run from the last checkpoint. `caches`: `sweep_caches`.
    """
    exp = trial_experiment(experiment, config)
    cache = caches.get(_cache_slot(config["freeze"], config["repeat"]))
    if in_trial_process(exp):
        train.train_in_trial(train.loop_config(exp, manifest, cache))
        return
    name = tune.get_context().get_trial_id()
    trainer = train.make_trainer(exp, Path(manifest), name=name, storage_path=train_storage,
                                 callbacks=[TuneReportCallback()], cache=cache)
    trainer.fit()


def sweep_caches(exp: Experiment, manifest: Path) -> dict[str, str | None]:
    """The frozen-prefix cache of every freeze spec and repeat the sweep's trials can have
    (their lr and scheduler change no cache), computed now where missing; None where a trial
    cannot use one."""
    repeats = [0] if exp.sweep.search == "optuna" else range(exp.sweep.repeats)
    raw = exp.to_dict()
    return {_cache_slot(freeze, repeat): prefix_cache.prepare(trial_experiment(raw, {
        "freeze": freeze, "lr": exp.train.lr, "scheduler": exp.train.scheduler,
        "repeat": repeat}), manifest) for freeze in exp.sweep.freeze for repeat in repeats}


def _cache_slot(freeze: str, repeat: int) -> str:
    return f"{freeze}/{int(repeat)}"


def param_space(exp: Experiment) -> dict[str, Any]:
    """The seeds' grid by default, or a random/Optuna search over the same axes."""
    repeat = tune.grid_search(list(range(exp.sweep.repeats)))
    if exp.sweep.search == "grid":
        return {"freeze": tune.grid_search(exp.sweep.freeze), "lr": tune.grid_search(exp.sweep.lr),
                "scheduler": tune.grid_search(exp.sweep.scheduler), "repeat": repeat}
    low, high = min(exp.sweep.lr), max(exp.sweep.lr)
    lr = tune.loguniform(low, high) if high > low else low
    return {"freeze": tune.choice(exp.sweep.freeze), "lr": lr,
            "scheduler": tune.choice(exp.sweep.scheduler),
            "repeat": repeat if exp.sweep.search == "random" else 0}


def _search_alg(exp: Experiment):
    if exp.sweep.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise BoatrayError("sweep.search=optuna needs optuna: pip install optuna") from None
    return OptunaSearch(metric=exp.sweep.metric, mode=METRIC_MODES[exp.sweep.metric],
                        seed=exp.seed)


def _scheduler(exp: Experiment):
    if not exp.sweep.asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric="valid_loss", mode="min",
                         max_t=exp.train.epochs, grace_period=min(exp.sweep.asha.grace_period,
                                                                  exp.train.epochs),
                         reduction_factor=exp.sweep.asha.reduction_factor)


def _logger_callbacks(exp: Experiment) -> list:
    callbacks: list = []
    if exp.sweep.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if exp.sweep.mlflow:
        try:
            from ray.air.integrations.mlflow import MLflowLoggerCallback
        except ImportError:
            raise BoatrayError("sweep.mlflow=true needs mlflow: pip install mlflow") from None
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or (exp.results_dir / "mlruns").as_uri()
        callbacks.append(MLflowLoggerCallback(tracking_uri=tracking, experiment_name=exp.name))
    return callbacks


class GracefulStop(tune.Callback):
    """SIGINT and SIGTERM stop the sweep through Tune's own graceful stop (boatray.interrupt)."""

    def setup(self, **info) -> None:
        interrupt.during_tune()


def run_sweep(exp: Experiment, manifest: Path, resume: bool = False) -> tune.ResultGrid:
    """Run (or resume) the Tune sweep of fine-tuning trials and return its results; raise
    `interrupt.Interrupted` when a signal stopped it (its state is saved for --resume)."""
    root = exp.storage_uri
    tune_path = f"{root}/{TUNE_DIR}"
    restore = tune.Tuner.can_restore(tune_path)
    if restore and not resume:
        raise BoatrayError(f"{tune_path} holds an earlier sweep: pass --resume to finish it, "
                           f"or give this experiment a new name (--set name=...)")
    caches = sweep_caches(exp, manifest)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiment=exp.to_dict(), manifest=str(manifest),
                             train_storage=f"{root}/{TRAIN_DIR}", caches=caches),
        trial_resources(exp))
    if restore:
        print(f"[sweep] resuming {tune_path}", flush=True)
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        concurrency = exp.sweep.max_concurrent_trials
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(exp),
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(exp), search_alg=_search_alg(exp),
                num_samples=1 if exp.sweep.search == "grid" else exp.sweep.num_samples,
                max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname,
                reuse_actors=in_trial_process(exp)),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=root, verbose=0,
                # in a trial's process Tune retries it; a Train run retries its workers itself
                failure_config=tune.FailureConfig(
                    max_failures=exp.train.max_failures if in_trial_process(exp) else 0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=train.KEEP_CHECKPOINTS),
                callbacks=[console.TrialLines(
                    trial_count(exp), exp.train.epochs, exp.sweep.metric,
                    {(f, int(r)) for f, r in (slot.split("/") for slot, cache in caches.items()
                                              if cache)}),
                    GracefulStop(), *_logger_callbacks(exp)]))
    results = tuner.fit()
    interrupt.after_tune()
    return results


def trial_count(exp: Experiment) -> int:
    """How many trials the sweep runs: the grid's points, or the samples (x repeats)."""
    if exp.sweep.search == "grid":
        return (len(exp.sweep.freeze) * len(exp.sweep.lr) * len(exp.sweep.scheduler)
                * exp.sweep.repeats)
    return exp.sweep.num_samples * (exp.sweep.repeats if exp.sweep.search == "random" else 1)


def _trial_dirname(trial) -> str:
    cfg = trial.config
    return f"{trial.trial_id}-{cfg['freeze']}-lr{cfg['lr']:.0e}-{cfg['scheduler']}-r{cfg['repeat']}"


def trial_checkpoint(exp: Experiment, path: str):
    """A trial's checkpoint from the `checkpoint_path` Tune reports (a path without the scheme
    of a remote storage_path)."""
    from ray.train import Checkpoint

    if exp.remote_storage and "://" not in path:
        path = f"{exp.storage_path.split('://', 1)[0]}://{path}"
    return Checkpoint(path)


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
    checkpoint = trial_checkpoint(exp, path)
    try:
        with checkpoint.filesystem.open_input_stream(
                f"{checkpoint.path}/{train.META_FILE}") as stream:
            return list(json.loads(stream.read())["history"])
    except (OSError, ValueError, KeyError):
        return []


def write_trials(exp: Experiment, table: pd.DataFrame) -> Path:
    """results/<experiment>/trials.parquet, atomically."""
    return atomic_write_parquet(exp.results_dir / TRIALS, table)


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
