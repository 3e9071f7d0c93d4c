"""The fine-tuning sweep on Ray Tune: freeze spec x learning rate (x scheduler x repeats).

A trial with one worker (the default: one GPU) runs the training loop in the Tune trial's own
process: Tune keeps its checkpoints, retries it from the last one (FailureConfig) and, with
`reuse_actors`, hands the process to the next trial, so start-up is paid per slot, not per
trial. A trial with 2+ workers drives a TorchTrainer (DDP) whose metrics reach Tune through
`TuneReportCallback`. Every frozen-prefix cache the trials can use is computed first.

A resumed sweep whose Tune state cannot be used is rebuilt from its trial folders
(finetune/rebuild.py): a new Tune experiment runs the trials that did not end with an intact
checkpoint, each from its newest intact checkpoint where it has one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ray import tune
from ray.tune.execution.placement_groups import (
    PlacementGroupFactory,
    resource_dict_to_pg_factory,
)
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from boatray import console, interrupt, sizing, storage
from boatray.config import Experiment
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.features import featurefile
from boatray.finetune import prefix_cache, rebuild
from boatray.finetune.checkpoints import KEEP_CHECKPOINTS, latest_checkpoint
from boatray.finetune.loop import loop_config, train_in_trial
from boatray.finetune.stale_checkpoints import RecoverCheckpoints
from boatray.finetune.trainer import make_trainer, worker_resources
from boatray.finetune.trials import METRIC_MODES
from boatray.results import Layout


def trial_experiment(exp: Experiment, config: dict) -> Experiment:
    """The base settings with one trial's freeze, lr, scheduler and seed, and its freeze
    spec's epochs (`sweep.per_freeze`)."""
    return dataclasses.replace(exp, train=dataclasses.replace(
        exp.train, freeze=config["freeze"], lr=float(config["lr"]),
        scheduler=config["scheduler"], seed=exp.seed + int(config["repeat"]),
        epochs=exp.sweep.epochs(config["freeze"], exp.train.epochs)))


def most_epochs(exp: Experiment) -> int:
    """The epochs of the sweep's longest trials (ASHA's max_t)."""
    return max(exp.sweep.epochs(freeze, exp.train.epochs) for freeze in exp.sweep.freeze)


def grid_points(exp: Experiment) -> list[dict[str, Any]]:
    """The grid's (freeze, lr) points: each freeze spec with its learning rates."""
    return [{"freeze": freeze, "lr": lr} for freeze in exp.sweep.freeze
            for lr in exp.sweep.rates(freeze)]


def in_trial_process(exp: Experiment) -> bool:
    """Whether the sweep's trials train in their own process (1 worker) or drive a Train run."""
    return exp.train.num_workers <= 1


TRIAL_CPU = 0.01
"""The CPU of a trial's own process while it drives a Train run (whose workers hold the rest)."""


def trial_resources(exp: Experiment, caches: dict[str, str | None] | None = None
                    ) -> dict[str, float] | Callable[[dict], PlacementGroupFactory]:
    """What a trial's own process asks for.

    Training in it: one worker's CPUs and GPU, or on GPUs, per trial: a share of a GPU
    (sizing.HEAD_TRIAL_GPU) for a trial that trains the head alone on its cached pooled
    features (`caches`: `sweep_caches`), a whole one otherwise. Driving a Train run:
    `sweep.trial_resource` names a custom resource, e.g. `trial_driver` on a cluster's head
    node (cluster.yaml), one unit per trial; otherwise a sliver of a CPU.
    """
    if in_trial_process(exp):
        if exp.train.use_gpu is not True or not caches:
            return worker_resources(exp.train)

        def per_trial(config: dict) -> PlacementGroupFactory:
            on_features = (caches.get(_cache_slot(config["freeze"], config["repeat"]))
                           and prefix_cache.cached_stage(trial_experiment(exp, config))[0]
                           == "pool")
            share = sizing.HEAD_TRIAL_GPU if on_features else 1.0
            return resource_dict_to_pg_factory(worker_resources(exp.train, share))

        return per_trial
    if exp.sweep.trial_resource:
        return {exp.sweep.trial_resource: 1.0}
    return {"CPU": TRIAL_CPU}


def run_trial(config: dict, experiment: Experiment, manifest: str, train_storage: str,
              caches: dict[str, str | None], earlier: dict[str, str] | None = None) -> None:
    """One Tune trial with this configuration: the training loop here (1 worker), or a
    TorchTrainer whose metrics flow back to Tune (2+ workers).

    The Train run is named after the trial id, which survives a Tuner restore, so a resumed
    trial resumes its Train run from the last checkpoint. `caches`: `sweep_caches`.
    `earlier`: in a rebuilt sweep, the folder of each configuration's earlier trial, whose
    newest intact checkpoint (or Train run) it resumes from when Tune has none for it.
    """
    exp = trial_experiment(experiment, config)
    cache = caches.get(_cache_slot(config["freeze"], config["repeat"]))
    before = (earlier or {}).get(rebuild.config_key(config))
    stops = scheduler_stops(experiment)
    if in_trial_process(exp):
        train_in_trial(loop_config(exp, manifest, cache, stops),
                       before and latest_checkpoint(before))
        return
    name = (storage.name(before).split("-")[0] if before
            else tune.get_context().get_trial_id())
    trainer = make_trainer(exp, Path(manifest), name=name, storage_path=train_storage,
                           callbacks=[TuneReportCallback()], cache=cache, stops=stops)
    trainer.fit()


def sweep_caches(exp: Experiment, manifest: Path) -> dict[str, str | None]:
    """The frozen-prefix cache of every freeze spec and repeat the sweep's trials can have
    (their lr and scheduler change no cache), computed now where missing; None where a trial
    cannot use one. Where the features stage runs the same trunk, its one pass over the images
    also fills every missing cache (`one_pass`)."""
    repeats = [0] if exp.sweep.search == "optuna" else range(exp.sweep.repeats)
    trials = {_cache_slot(freeze, repeat): trial_experiment(exp, {
        "freeze": freeze, "lr": exp.train.lr, "scheduler": exp.train.scheduler,
        "repeat": repeat}) for freeze in exp.sweep.freeze for repeat in repeats}
    plans = {slot: prefix_cache.plan(trial, manifest) for slot, trial in trials.items()}
    features = one_pass(exp, manifest, [found for found in plans.values() if found])
    return {slot: found and prefix_cache.ensure(found, features) for slot, found in plans.items()}


def one_pass(exp: Experiment, manifest: Path, plans: list[prefix_cache.Plan]) -> Path | None:
    """The experiment's features file, extracted now, when the features stage will run and a
    cache needs the same trunk: one pass over the images gives the pooled features, every such
    cache's activations (a pooled cache is then read from the features) and their evaluation
    caches, from which the selected runs predict. None where no cache can come from the
    features."""
    if not exp.features.enabled:
        return None
    source = prefix_cache.FeaturesSource(dataclasses.asdict(exp.model),
                                         list(exp.data.image_size), exp.seed)
    shared = {found.key: found for found in plans if found.same_trunk(source)}
    features = exp.layout.features
    if not shared or features.is_file():
        return features if shared else None
    from boatray.features.pipeline import extract_experiment

    frame, _ = read_manifest(manifest)
    evaluations = [prefix_cache.evaluation_plan(found, frame) for found in shared.values()]
    writers = [prefix_cache.CacheWriter(found) for found in [
        *(found for found in shared.values() if found.stage != exp.features.stage),
        *(found for found in evaluations if found is not None)] if not found.ready]
    cuts = sorted({found.stage for found in shared.values()})
    print(f"[cache] one pass over the images: the {exp.features.stage} features (for the "
          "approaches on features), "
          f"the {', '.join(cuts)} activations of the "
          f"{', '.join(sorted({found.exp.train.freeze for found in shared.values()}))} trials "
          "and of the selected runs' evaluation", flush=True)
    try:
        extract_experiment(exp, manifest, features, sinks=writers)
        seconds = featurefile.feature_info(features)["extraction"]["seconds"]
        for writer in writers:
            writer.publish(seconds, {"one_pass_with": str(features)})
    finally:
        for writer in writers:
            writer.discard()
    return features


def _cache_slot(freeze: str, repeat: int) -> str:
    return f"{freeze}/{int(repeat)}"


def param_space(exp: Experiment) -> dict[str, Any]:
    """The seeds' grid by default (its (freeze, lr) points, `grid_points`, come from the search
    algorithm), or a random/Optuna search over the same axes."""
    repeat = tune.grid_search(list(range(exp.sweep.repeats)))
    if exp.sweep.search == "grid":
        points = grid_points(exp)
        return {"freeze": tune.choice(exp.sweep.freeze),
                "lr": tune.choice(sorted({p["lr"] for p in points})),
                "scheduler": tune.grid_search(exp.sweep.scheduler), "repeat": repeat}
    low, high = min(exp.sweep.lr), max(exp.sweep.lr)
    lr = tune.loguniform(low, high) if high > low else low
    return {"freeze": tune.choice(exp.sweep.freeze), "lr": lr,
            "scheduler": tune.choice(exp.sweep.scheduler),
            "repeat": repeat if exp.sweep.search == "random" else 0}


def _search_alg(exp: Experiment):
    if exp.sweep.search == "grid":  # each point, then the scheduler x repeat grid under it
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=grid_points(exp),
                                     max_concurrent=exp.sweep.max_concurrent_trials)
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
    longest = most_epochs(exp)
    return ASHAScheduler(time_attr="epoch", metric="valid_loss", mode="min", max_t=longest,
                         grace_period=min(exp.sweep.asha.grace_period, longest),
                         reduction_factor=exp.sweep.asha.reduction_factor)


def scheduler_stops(exp: Experiment) -> list[int]:
    """The epochs after which ASHA may stop a trial (its rungs, `grace_period x
    reduction_factor^k` below max_t, decided at the first epoch that reaches each); none
    without ASHA. Trials checkpoint there (checkpoints.Cadence): a stopped trial's last epoch
    has its checkpoint."""
    if not exp.sweep.asha.enabled:
        return []
    longest, factor = most_epochs(exp), exp.sweep.asha.reduction_factor
    grace = min(exp.sweep.asha.grace_period, longest)
    rungs = int(math.log(longest / grace) / math.log(factor) + 1)
    return sorted({math.ceil(grace * factor ** k) for k in range(rungs)})


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


class RetryLines(tune.Callback):
    """One line when Tune restarts a failed trial from its last checkpoint (its process was
    lost, e.g. with its node, or raised)."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"[sweep] trial {trial.trial_id} failed ({_error_name(trial)}); Tune restarts "
              f"it from its last checkpoint (retry {trial.num_failures} of "
              f"{self.max_failures})", flush=True)


def _error_name(trial) -> str:
    """The type of a trial's last error, as Tune keeps it beside the driver's trial folder."""
    from ray import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as file:
            return type(cloudpickle.load(file)).__name__
    except (OSError, TypeError, ValueError, cloudpickle.pickle.UnpicklingError):
        return f"see {trial.error_file}"


def run_sweep(exp: Experiment, manifest: Path, resume: bool = False) -> list[tune.Result]:
    """Run (or resume, or rebuild) the Tune sweep of fine-tuning trials and return every
    trial's result; raise `interrupt.Interrupted` when a signal stopped it (its state is saved
    for --resume)."""
    tune_path = storage.join(exp.storage_uri, Layout.TUNE)
    restore = tune.Tuner.can_restore(tune_path)
    if restore and not resume:
        raise BoatrayError(f"{tune_path} holds an earlier sweep: pass --resume to finish it, "
                           f"or give this experiment a new name (--set name=...)")
    caches = sweep_caches(exp, manifest)
    if not restore:
        return _fit(exp, _tuner(exp, manifest, caches, param_space(exp), _search_alg(exp),
                                len(grid_points(exp)) if exp.sweep.search == "grid"
                                else exp.sweep.num_samples, trial_count(exp)))
    folders = rebuild.trial_folders(exp)
    problem = rebuild.problem(tune_path, folders)
    if not problem:
        print(f"[sweep] resuming {tune_path}", flush=True)
        try:
            tuner = tune.Tuner.restore(tune_path, trainable=_trainable(exp, manifest, caches),
                                       resume_unfinished=True, resume_errored=True)
        except Exception as exc:  # noqa: BLE001 - Tune's own state files, in any way damaged
            problem = f"Tune cannot restore it ({type(exc).__name__})"
    if problem:
        return _rebuilt(exp, manifest, caches, folders, problem)
    results = _fit(exp, tuner)
    return results + rebuild.kept_outside(results, folders)


def _fit(exp: Experiment, tuner: tune.Tuner) -> list[tune.Result]:
    """Every trial's result of a Tune experiment, each trial's last checkpoint kept;
    `interrupt.Interrupted` after a signal."""
    results = list(tuner.fit())
    interrupt.after_tune()
    keep_last_checkpoints(exp, results)
    return results


def _rebuilt(exp: Experiment, manifest: Path, caches: dict[str, str | None],
             folders: list[rebuild.TrialFolder], problem: str) -> list[tune.Result]:
    """The sweep rebuilt from its trial folders because of `problem` (one line says it and the
    plan, one per damaged checkpoint): a new Tune experiment of the configurations to run
    again, and the results of the trials kept."""
    plan = rebuild.plan(exp, folders, trial_count(exp))
    for line in rebuild.damage_lines(folders):  # Tune's own restore: RecoverCheckpoints
        print(f"[sweep] {line}", flush=True)
    print(f"[sweep] {Layout.TUNE}/: {problem}: {plan.line()}", flush=True)
    rebuild.set_aside(storage.join(exp.storage_uri, Layout.TUNE))
    if not (plan.points or plan.fresh):
        return plan.kept_results()
    space = {"freeze": tune.choice(exp.sweep.freeze),
             "lr": param_space(exp)["lr"],
             "scheduler": tune.choice(exp.sweep.scheduler),
             "repeat": tune.choice(list(range(exp.sweep.repeats)))}
    count = len(plan.points) + plan.fresh
    search = BasicVariantGenerator(points_to_evaluate=plan.points,
                                   max_concurrent=exp.sweep.max_concurrent_trials)
    earlier = {key: folder.location for key, folder in plan.resumed.items()}
    return _fit(exp, _tuner(exp, manifest, caches, space, search, count, count, earlier)) + (
        plan.kept_results())


def _trainable(exp: Experiment, manifest: Path, caches: dict[str, str | None],
               earlier: dict[str, str] | None = None):
    return tune.with_resources(
        tune.with_parameters(run_trial, experiment=exp, manifest=str(manifest),
                             train_storage=storage.join(exp.storage_uri, Layout.TRAIN),
                             caches=caches,
                             earlier=earlier or {}),
        trial_resources(exp, caches))


def _tuner(exp: Experiment, manifest: Path, caches: dict[str, str | None], space: dict,
           search_alg, num_samples: int, total: int,
           earlier: dict[str, str] | None = None) -> tune.Tuner:
    """A new Tune experiment of the sweep's trials (`total` of them) in tune/."""
    return tune.Tuner(
        _trainable(exp, manifest, caches, earlier),
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(exp), search_alg=search_alg, num_samples=num_samples,
            # a BasicVariantGenerator (a rebuilt sweep's points) caps its own concurrency
            max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator)
            else exp.sweep.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname, reuse_actors=in_trial_process(exp)),
        run_config=tune.RunConfig(
            name=Layout.TUNE, storage_path=exp.storage_uri, verbose=0,
            # Tune retries a trial from its last checkpoint when its process is lost (its
            # node with it); a Train run retries its workers itself, and a trial whose
            # driver was lost resumes its Train run (same name) from the last checkpoint
            failure_config=tune.FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[console.TrialLines(
                total, {f: exp.sweep.epochs(f, exp.train.epochs) for f in exp.sweep.freeze},
                exp.sweep.metric,
                {(f, int(r)) for f, r in (slot.split("/") for slot, cache in caches.items()
                                          if cache)}),
                GracefulStop(), RecoverCheckpoints(), RetryLines(exp.train.max_failures),
                *_logger_callbacks(exp)]))


def keep_last_checkpoints(exp: Experiment, results: list[tune.Result]) -> None:
    """Each finished trial's checkpoints but its last removed (Tune keeps KEEP_CHECKPOINTS
    while the sweep runs): nothing restores a finished sweep's trials, and evaluation reads
    the last one."""
    for result in results:
        if result.checkpoint is None:
            continue
        trial = storage.same_kind(exp.storage_uri, result.path)
        last = PurePosixPath(result.checkpoint.path).name
        older = {relative.parts[0] for _, relative in storage.files_under(trial)
                 if relative.parts[0].startswith("checkpoint_") and relative.parts[0] != last}
        for folder in older:
            storage.delete(storage.join(trial, folder))


def trial_count(exp: Experiment) -> int:
    """How many trials the sweep runs: the grid's points, or the samples (x repeats)."""
    if exp.sweep.search == "grid":
        return len(grid_points(exp)) * len(exp.sweep.scheduler) * exp.sweep.repeats
    return exp.sweep.num_samples * (exp.sweep.repeats if exp.sweep.search == "random" else 1)


def trial_epochs(exp: Experiment) -> int:
    """The epochs all the sweep's trials run at most (ASHA stops some early)."""
    if exp.sweep.search == "grid":
        return sum(exp.sweep.epochs(point["freeze"], exp.train.epochs)
                   for point in grid_points(exp)) * len(exp.sweep.scheduler) * exp.sweep.repeats
    return trial_count(exp) * most_epochs(exp)


def _trial_dirname(trial) -> str:
    cfg = trial.config
    return f"{trial.trial_id}-{cfg['freeze']}-lr{cfg['lr']:.0e}-{cfg['scheduler']}-r{cfg['repeat']}"


