"""`python -m boatray.sweep`: the whole study end to end, on a local Ray instance or a cluster.

Stages, each writing into results/<experiment>/ (DESIGN.md):

1. data: the manifest (prepared once, reused on resume);
2. fine-tuning sweep: Ray Tune over freeze x lr (x scheduler) x repeats, one Ray Train run per
   trial; trials.parquet; test evaluation of the overall best and the best per freeze spec;
3. features + SVM: Ray Data extraction, SVM and logistic-regression probe on the driver;
4. baseline: BetterCNN from scratch through the same training loop;
5. the comparison report.

A stage that fails with a user-facing error is reported and the others still run, so nothing
already computed is lost; `--resume` finishes an interrupted run without repeating finished work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from boatray import config as config_module
from boatray import features, finetune, models, preflight, report, storage, svm, tuning
from boatray.cluster import start_ray
from boatray.config import Experiment
from boatray.data.manifest import ensure_manifest, read_manifest
from boatray.errors import BoatrayError, cli
from boatray.results import RUN_JSON, atomic_write_text

EXPERIMENT_JSON = "experiment.json"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.sweep`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.sweep",
        description="Run the transfer-learning study end to end: fine-tuning sweep, "
                    "features + SVM, BetterCNN baseline, comparison report.")
    config_module.add_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted run without repeating finished work")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, the data and the cluster's resources, print "
                             "the plan (stages, trials x epochs, resources, results folder, "
                             "estimated compute) and exit without training")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a "
                                          "new private local instance)")
    return parser


def check_results_dir(exp: Experiment, resume: bool) -> None:
    """Refuse to mix two experiments in one folder; on --resume, refuse a changed config.

    With remote storage the local staging folder is refilled from the storage first.
    """
    if exp.remote_storage:
        shutil.rmtree(exp.results_dir, ignore_errors=True)
        storage.mirror_down(exp)
    record = exp.results_dir / EXPERIMENT_JSON
    if not record.is_file():
        return
    if not resume:
        raise BoatrayError(f"{exp.results_dir} already holds experiment {exp.name!r}: pass "
                           f"--resume to finish it, or choose a new name with --set name=...")
    before = _flatten(json.loads(record.read_text()))
    now = _flatten(exp.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise BoatrayError(f"--resume with a different config than {record} ({changed[0]}: "
                           f"{before.get(changed[0])!r} -> {now.get(changed[0])!r})")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def stage_sweep(exp: Experiment, manifest: Path, resume: bool) -> None:
    """Fine-tuning sweep, trials.parquet, and test evaluation of the selected configurations."""
    results = tuning.run_sweep(exp, manifest, resume=resume)
    table = tuning.trials_table(results)
    tuning.write_trials(exp, table)
    errors = [r.error for r in results if r.error]
    print(f"[sweep] {table['trial_id'].nunique()} trials, {len(errors)} failed; "
          f"trials.parquet written", flush=True)
    for choice in tuning.select(table, exp.sweep.metric):
        for trial in choice["trials"]:
            evaluate_trial(exp, manifest, choice, trial, table)


def evaluate_trial(exp: Experiment, manifest: Path, choice: dict, trial: dict,
                   table: pd.DataFrame) -> None:
    """Predict valid and test with a selected trial's last checkpoint; write its run folder."""
    name = (f"finetune-{choice['freeze']}-lr{choice['lr']:.0e}-{choice['scheduler']}"
            f"-r{int(trial['repeat'])}")
    run_dir = exp.results_dir / finetune.RUNS_DIR / name
    if (run_dir / RUN_JSON).is_file():
        return
    history = table[table["trial_id"] == trial["trial_id"]]
    wall = float(history["time_total_s"].max())
    finetune.evaluate_and_write(
        tuning.trial_experiment(exp.to_dict(), trial), manifest,
        tuning.trial_checkpoint(exp, trial["checkpoint_path"]), run_dir,
        {"selected": choice["selected"], "valid_score": choice["score"],
         "config_id": name.rsplit("-r", 1)[0], "trial_id": trial["trial_id"],
         "wall_seconds": wall}, time.perf_counter() - wall)
    print(f"[sweep] evaluated {name} ({choice['selected']}) on the test split", flush=True)


def stage_features_svm(exp: Experiment, manifest: Path, resume: bool) -> None:
    """Ray Data feature extraction, then the SVM and the linear probe on the driver."""
    features_path = exp.results_dir / "features" / "features.parquet"
    if not (resume and features_path.is_file()):
        features.extract_for(exp, manifest, features_path)
    svm.run_for(exp, features_path, exp.results_dir / finetune.RUNS_DIR)


def stage_baseline(exp: Experiment, manifest: Path, resume: bool) -> None:
    """BetterCNN from scratch through the same Ray Train loop."""
    run_dir = exp.results_dir / finetune.RUNS_DIR / "baseline-bettercnn"
    if resume and (run_dir / RUN_JSON).is_file():
        return
    finetune.run(finetune.baseline_experiment(exp), manifest, run_dir, approach="baseline")


def stage_report(exp: Experiment) -> Path:
    """report.md and report.html from every run folder there is."""
    return report.write_report(exp.results_dir)


def run_stages(exp: Experiment, manifest: Path, resume: bool) -> list[str]:
    """Run every enabled stage; return the user-facing failures (the other stages still run)."""
    stages: list[tuple[str, bool, Callable[[], object]]] = [
        ("fine-tuning sweep", exp.sweep.enabled, lambda: stage_sweep(exp, manifest, resume)),
        ("features + SVM", exp.features.enabled,
         lambda: stage_features_svm(exp, manifest, resume)),
        ("BetterCNN baseline", exp.baseline.enabled,
         lambda: stage_baseline(exp, manifest, resume)),
    ]
    failures = []
    for title, enabled, stage in stages:
        if not enabled:
            print(f"[boatray] {title}: skipped (disabled in the config)", flush=True)
            continue
        started = time.monotonic()
        print(f"[boatray] {title}: starting", flush=True)
        try:
            stage()
        except BoatrayError as exc:
            failures.append(f"{title}: {exc}")
            print(f"[boatray] {title}: FAILED: {exc}", flush=True)
            continue
        finally:
            storage.mirror_up(exp)
        print(f"[boatray] {title}: done in {time.monotonic() - started:.0f} s", flush=True)
    return failures


@cli
def main(argv: list[str] | None = None) -> int:
    """Run the experiment end to end; exit code 2 with one line on a user-facing error."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    if args.config is None:
        print("[boatray] no --config: running the built-in smoke experiment on GENERATED "
              "(synthetic) boat images, not MarDCT; its numbers say nothing about the real "
              "data. Use --config ray_jobs/lab6.yaml --data DIR for the study.", flush=True)
    print(f"[boatray] results: {results_location(exp)}", flush=True)
    if args.dry_run:
        return dry_run(exp, args)
    check_results_dir(exp, args.resume)
    started = time.monotonic()
    start_ray(args.address)
    run_exp, _ = preflight.check(exp)
    manifest = ensure_manifest(exp)
    atomic_write_text(exp.results_dir / EXPERIMENT_JSON, json.dumps(exp.to_dict(), indent=2))
    failures = run_stages(run_exp, manifest, args.resume)
    report_path = stage_report(run_exp)
    storage.mirror_up(exp)
    print(f"[boatray] done in {(time.monotonic() - started) / 60:.1f} min; report: "
          f"{report_path}", flush=True)
    print(f"[boatray] results: {results_location(exp)}", flush=True)
    if failures:
        raise BoatrayError("; ".join(failures))
    return 0


def results_location(exp: Experiment) -> str:
    """results/<experiment>/ as the user finds it: a local folder or a storage URI."""
    return exp.storage_uri if exp.remote_storage else str(exp.results_dir)


def dry_run(exp: Experiment, args: argparse.Namespace) -> int:
    """Validate the config, the data and the cluster's resources; print the plan; train
    nothing."""
    try:
        check_results_dir(exp, args.resume)
    except BoatrayError as exc:
        print(f"[plan] note: {exc}", flush=True)
    start_ray(args.address)
    run_exp, capacity = preflight.check(exp, weights=False)
    frame, _ = read_manifest(ensure_manifest(exp))
    for line in preflight.plan(run_exp, frame, capacity):
        print(f"[plan] {line}", flush=True)
    print("[plan] dry run: nothing was trained", flush=True)
    models.fetch_weights(exp.model.name, exp.model.weights)  # the run would stop here
    return 0


if __name__ == "__main__":
    sys.exit(main())
