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

import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from boatray import prefix_cache, train
from boatray.config import Experiment, from_dict
from boatray.errors import BoatrayError
from boatray.results import atomic_write_parquet

TUNE_DIR = "tune"
TRAIN_DIR = "train"
TRIALS = "trials.parquet"
CONFIG_KEYS = ("freeze", "lr", "scheduler", "repeat")
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
        callbacks.append(MLflowLoggerCallback(experiment_name=exp.name))
    return callbacks


class ProgressCallback(tune.Callback):
    """A line per finished trial with its metric, counts of done/running/pending, elapsed, ETA."""

    def __init__(self, metric: str, epochs: int, concurrency: int) -> None:
        self.metric, self.epochs, self.concurrency = metric, epochs, concurrency
        self.start = time.monotonic()
        self.durations: list[float] = []

    def _line(self, trials: list, trial, what: str) -> None:
        elapsed = time.monotonic() - self.start
        states = ["TERMINATED" if t is trial else t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in states)
        running = states.count("RUNNING")
        pending = states.count("PENDING")
        result = trial.last_result or {}
        self.durations.append(float(result.get("time_total_s", 0.0)))
        mean = sum(self.durations) / len(self.durations)
        eta = mean * (running / 2 + pending) / max(1, min(self.concurrency, running + pending))
        cfg = trial.config
        value = result.get(self.metric)
        shown = f"{self.metric}={value:.4f}" if isinstance(value, (int, float)) else "no metric"
        epoch = result.get("epoch", 0)
        early = " (stopped early by ASHA)" if what == "finished" and epoch < self.epochs else ""
        print(f"[sweep {elapsed / 60:5.1f} min] trial {trial.trial_id} freeze={cfg['freeze']} "
              f"lr={cfg['lr']:.2g} sched={cfg['scheduler']} repeat={cfg['repeat']} {what} after "
              f"{epoch} epoch(s): {shown}{early} | done {done}, running {running}, "
              f"pending {pending}, about {eta / 60:.1f} min left", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trials, trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trials, trial, "FAILED")


def run_sweep(exp: Experiment, manifest: Path, resume: bool = False) -> tune.ResultGrid:
    """Run (or resume) the Tune sweep of fine-tuning trials and return its results."""
    root = exp.storage_uri
    tune_path = f"{root}/{TUNE_DIR}"
    restore = tune.Tuner.can_restore(tune_path)
    if restore and not resume:
        raise BoatrayError(f"{tune_path} holds an earlier sweep: pass --resume to finish it, "
                           f"or give this experiment a new name (--set name=...)")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiment=exp.to_dict(), manifest=str(manifest),
                             train_storage=f"{root}/{TRAIN_DIR}",
                             caches=sweep_caches(exp, manifest)),
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
                callbacks=[ProgressCallback(exp.sweep.metric, exp.train.epochs, concurrency),
                           *_logger_callbacks(exp)]))
    return tuner.fit()


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


def trials_table(results: tune.ResultGrid) -> pd.DataFrame:
    """One row per trial per epoch: trial_id, the trial's config, every reported metric."""
    frames = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        history = history.copy()
        history["trial_id"] = (result.metrics or {}).get("trial_id", Path(result.path).name)
        if "checkpoint_path" not in history and result.checkpoint is not None:
            history["checkpoint_path"] = result.checkpoint.path  # a trial that trained itself
        for key in CONFIG_KEYS:
            history[key] = result.config[key]
        history["status"] = "error" if result.error else "finished"
        frames.append(history)
    if not frames:
        raise BoatrayError("the sweep produced no results: every trial failed before epoch 1")
    table = pd.concat(frames, ignore_index=True)
    first = ["trial_id", "epoch", *CONFIG_KEYS, "status"]
    rest = [c for c in table.columns if c not in first and not c.startswith("config/")]
    table = table[first + rest]
    return table.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


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
