"""`python -m boatray.sweep`: the whole study end to end, on a local Ray instance or a cluster.

Stages, each writing into results/<experiment>/ (results.Layout): the data's manifest, the
fine-tuning sweep, features + SVM, the BetterCNN baseline, and the comparison report. A stage
that fails is reported in one line and the others still run. One run holds a results folder at
a time (run_state); SIGINT/SIGTERM stop it cleanly with the command that finishes it, and
`--resume` finishes an interrupted or killed run without repeating finished work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from boatray import (
    approaches,
    console,
    freezing,
    interrupt,
    models,
    preflight,
    report,
    run_state,
    storage,
    summary,
)
from boatray import config as config_module
from boatray.cluster import start_ray
from boatray.config import Experiment
from boatray.data.manifest import ensure_manifest, read_manifest
from boatray.errors import BoatrayError, cli
from boatray.features.pipeline import extract_experiment
from boatray.results import atomic_write_text


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
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's worker and actor output on the console as it comes "
                             "(by default it goes to files, copied to results/<experiment>/"
                             "logs/ at the end)")
    return parser


def refill_staging(exp: Experiment) -> None:
    """With remote storage, empty the local staging folder (but the lock this process holds)
    and fill it again from the storage. Only a run that holds the lock may do this."""
    if not exp.remote_storage:
        return
    exp.results_dir.mkdir(parents=True, exist_ok=True)
    for child in exp.results_dir.iterdir():
        if child != exp.layout.lock:
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    storage.mirror_down(exp.results_dir, exp.storage_uri)


def check_results_dir(exp: Experiment, resume: bool) -> None:
    """Refuse to mix two experiments in one folder; on --resume, refuse a changed config. The
    config is read where the results are (the storage, for a remote storage_path)."""
    record = (storage.join(exp.storage_uri, exp.layout.experiment.name) if exp.remote_storage
              else exp.layout.experiment)
    if not storage.is_file(record):
        return
    if not resume:
        raise BoatrayError(f"{results_location(exp)} already holds experiment {exp.name!r}: "
                           f"pass --resume to finish it, or choose a new name with --set name=...")
    before = config_module.flatten(json.loads(storage.read_bytes(record)))
    now = config_module.flatten(exp.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise BoatrayError(f"--resume with a different config than {record} ({changed[0]}: "
                           f"{before.get(changed[0])!r} -> {now.get(changed[0])!r})")


def stage_features(exp: Experiment, manifest: Path) -> None:
    """Feature extraction for the approaches on features, unless the sweep or an earlier run
    of this experiment did it."""
    if not exp.layout.features.is_file():
        extract_experiment(exp, manifest, exp.layout.features)


def _cause(exc: Exception, exp: Experiment, title: str) -> str:
    """A failure in one line; an unexpected exception's traceback goes to results/.../logs/."""
    if isinstance(exc, BoatrayError):
        return str(exc)
    log = exp.layout.logs / f"{re.sub(r'[^a-z0-9]+', '-', title.lower())}.traceback.txt"
    atomic_write_text(log, traceback.format_exc())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first} (traceback: {log})"


def stage_report(exp: Experiment) -> report.WrittenReport:
    """report.md and report.html from every run folder there is."""
    return report.write_report(exp.results_dir)


FEATURES_STAGE = "feature extraction"


def stages(exp: Experiment, manifest: Path, resume: bool
           ) -> list[tuple[str, bool, Callable[[], object]]]:
    """(title, enabled, run) of every stage: each approach of the registry in its order, the
    feature extraction before the first approach that uses features."""
    config = exp.to_dict()
    context = approaches.Context(exp, manifest, resume)
    found: list[tuple[str, bool, Callable[[], object]]] = []
    for approach in approaches.APPROACHES:
        on = approach.enabled(config)
        if approach.uses_features and on and all(t != FEATURES_STAGE for t, _, _ in found):
            found.append((FEATURES_STAGE, True, lambda: stage_features(exp, manifest)))
        found.append((approach.stage, on, lambda approach=approach: approach.fit(context)))
    return found


def run_stages(exp: Experiment, manifest: Path, resume: bool) -> list[str]:
    """Run every enabled stage; return their failures, one line each (the other stages still
    run whatever the exception; an approach on features is skipped when their extraction
    failed). A signal (`interrupt.Interrupted`) stops them all."""
    failures = []
    features_failed = False
    for title, enabled, stage in stages(exp, manifest, resume):
        if not enabled:
            print(f"[boatray] {title}: skipped (disabled in the config)", flush=True)
            continue
        if features_failed and approaches_on_features(title):
            print(f"[boatray] {title}: skipped (no features: {FEATURES_STAGE} failed)",
                  flush=True)
            continue
        started = time.monotonic()
        print(f"[boatray] {title}: starting", flush=True)
        try:
            stage()
        except Exception as exc:  # noqa: BLE001 - one failed stage does not stop the others
            cause = _cause(exc, exp, title)
            failures.append(f"{title}: {cause}")
            features_failed = features_failed or title == FEATURES_STAGE
            print(f"[boatray] {title}: FAILED: {cause}", flush=True)
            continue
        finally:
            storage.mirror_up(exp.results_dir, exp.storage_uri)
        print(f"[boatray] {title}: done in {time.monotonic() - started:.0f} s", flush=True)
    return failures


@cli
def main(argv: list[str] | None = None) -> int:
    """Run the experiment end to end; exit code 2 with one line on a user-facing error, 130 or
    143 after SIGINT or SIGTERM, with the command that finishes the run."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    if args.config is None:
        print("[boatray] no --config: running the built-in smoke experiment on GENERATED "
              "(synthetic) boat images, not MarDCT; its numbers say nothing about the real "
              "data. Use --config ray_jobs/lab6.yaml --data DIR for the study.", flush=True)
    print(f"[boatray] results: {results_location(exp)}", flush=True)
    storage.check_access(exp.storage_uri)
    if args.dry_run:
        return dry_run(exp, args)
    interrupt.install()
    try:
        with run_state.RunLock(exp.results_dir):
            return run(exp, args.resume, args.address, args.verbose)
    except interrupt.Interrupted as stop:
        given = sys.argv[1:] if argv is None else argv
        resume = shlex.join(["python", "-m", "boatray.sweep", *given,
                             *([] if args.resume else ["--resume"])])
        run_state.write_state(exp.results_dir, "interrupted", signal=str(stop), resume=resume)
        storage.mirror_up(exp.results_dir, exp.storage_uri)
        print(f"[boatray] stopped by {stop}; nothing finished is lost. Finish the run with: "
              f"{resume}", file=sys.stderr, flush=True)
        return stop.exit_code


def run(exp: Experiment, resume: bool, address: str | None, verbose: bool = False) -> int:
    """The study in a results folder this process holds; 2 when a stage failed."""
    refill_staging(exp)
    check_results_dir(exp, resume)
    started = time.monotonic()
    start_ray(address, log_to_driver=verbose,
              logging_level=logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.quiet_driver_logs()
        print(f"[boatray] Ray's worker output: {exp.layout.logs} (at the "
              f"end; live in {console.ray_logs_dir()}; --verbose shows it here)", flush=True)
    run_exp, _ = preflight.check(exp)
    manifest = ensure_manifest(exp)
    atomic_write_text(exp.layout.experiment, json.dumps(exp.to_dict(), indent=2))
    atomic_write_text(exp.layout.backbone,
                      json.dumps(freezing.describe(exp.model.name, exp.model.weights), indent=2))
    run_state.write_state(exp.results_dir, "running")
    try:
        failures = run_stages(run_exp, manifest, resume)
    finally:
        logs = console.keep_ray_logs(exp.results_dir)
    run_state.write_state(exp.results_dir, "finished", failures=failures)
    written = None
    print("[boatray] report: writing", flush=True)
    try:
        written = stage_report(run_exp)
    except Exception as exc:  # noqa: BLE001 - a failed report loses nothing else
        failures.append(f"report: {_cause(exc, exp, 'report')}")
    storage.mirror_up(exp.results_dir, exp.storage_uri)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr, flush=True)
    print(f"[boatray] done in {(time.monotonic() - started) / 60:.1f} min"
          + (f", {len(failures)} failed (above; Ray's worker logs: {logs})" if failures else ""),
          flush=True)
    for line in summary.closing_lines(written, [], logs, exp.sweep.metric,
                                      exp.storage_uri if exp.remote_storage else None):
        print(f"[boatray] {line}", flush=True)
    print(f"[boatray] results: {results_location(exp)}", flush=True)
    return 2 if failures else 0


def approaches_on_features(title: str) -> bool:
    """Whether the stage called `title` is an approach fitted on the extracted features."""
    return any(a.stage == title and a.uses_features for a in approaches.APPROACHES)


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
