"""`python -m boatray.sweep`: the whole study end to end, on a local Ray instance or a cluster.

Stages, each writing into results/<experiment>/ (results.Layout): the data's manifest, the
fine-tuning sweep, features + SVM, the BetterCNN baseline, and the comparison report. A stage
that fails is reported in one line and the others still run. One run holds a results folder at
a time (run_state); SIGINT/SIGTERM stop it cleanly with the command that finishes it, and
`--resume` finishes an interrupted or killed run without repeating finished work.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from boatray import (
    approaches,
    console,
    diskspace,
    estimate,
    freezing,
    interrupt,
    models,
    preflight,
    ray_errors,
    report,
    run_state,
    storage,
    summary,
)
from boatray import config as config_module
from boatray.cluster import start_ray
from boatray.config import Experiment
from boatray.data import checks
from boatray.data.manifest import ensure_manifest, read_manifest
from boatray.errors import BoatrayError, cli
from boatray.features.featurefile import read_columns, stats_path
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
    """Refuse to mix two experiments in one folder; on --resume, refuse a folder with nothing
    to resume and a changed config (listing every difference). The config is read where the
    results are (the storage, for a remote storage_path). A results folder that was moved is
    resumed where it is now (its storage_path is not compared)."""
    record = (storage.join(exp.storage_uri, exp.layout.experiment.name) if exp.remote_storage
              else exp.layout.experiment)
    if not storage.is_file(record):
        if resume and not holds_a_run(exp):
            raise BoatrayError(f"--resume: nothing to resume in {results_location(exp)} (no run "
                               f"of experiment {exp.name!r} was started there); run without "
                               "--resume to start it, or name the folder that holds it with "
                               "--set storage_path=... (and --set name=...)")
        return
    if not resume:
        raise BoatrayError(f"{results_location(exp)} already holds experiment {exp.name!r}: "
                           f"pass --resume to finish it, or choose a new name with --set name=...")
    try:
        before = config_module.flatten(json.loads(storage.read_bytes(record)))
    except (OSError, ValueError) as exc:
        raise BoatrayError(f"--resume: {record} cannot be read ({type(exc).__name__}); "
                           "start a new run with --set name=...") from None
    now = config_module.flatten(exp.to_dict())
    moved = before.pop("storage_path", None)
    if moved != now.pop("storage_path"):
        print(f"[boatray] resuming the run where its results folder is now (it ran under "
              f"storage_path {moved})", flush=True)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise BoatrayError(
            f"--resume with a different config than {record}: "
            + "; ".join(f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in changed)
            + " (resume with the settings it ran with, or start a new run with --set name=...)")


def holds_a_run(exp: Experiment) -> bool:
    """Whether the experiment's results folder (or storage URI) holds anything of a run but
    its lock: a run killed early may hold no experiment.json yet, only Tune's state."""
    where = exp.storage_uri if exp.remote_storage else exp.results_dir
    return any(relative.name != exp.layout.lock.name
               for _, relative in storage.files_under(where))


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
    if ray_errors.is_lost(exc):
        return (f"{ray_errors.describe(exc)}; what it finished is kept, --resume runs the rest "
                f"(traceback: {log})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first} (traceback: {log})"


def stage_report(exp: Experiment) -> report.WrittenReport:
    """report.md and report.html from every run folder there is."""
    return report.write_report(exp.results_dir)


FEATURES_STAGE = "feature extraction"


def stages(exp: Experiment, manifest: Path, resume: bool
           ) -> list[tuple[str, bool, Callable[[], list[str] | None]]]:
    """(title, enabled, run) of every stage: each approach of the registry in its order, the
    feature extraction before the first approach that uses features."""
    config = exp.to_dict()
    context = approaches.Context(exp, manifest, resume)
    found: list[tuple[str, bool, Callable[[], list[str] | None]]] = []
    for approach in approaches.APPROACHES:
        on = approach.enabled(config)
        if approach.uses_features and on and all(t != FEATURES_STAGE for t, _, _ in found):
            found.append((FEATURES_STAGE, True, lambda: stage_features(exp, manifest)))
        found.append((approach.stage, on, lambda approach=approach: approach.fit(context)))
    return found


def run_stages(exp: Experiment, manifest: Path, resume: bool,
               times: dict[str, float] | None = None) -> list[str]:
    """Run every enabled stage; return their failures, one line each: a stage that raised
    (the other stages still run whatever the exception; an approach on features is skipped
    when their extraction failed) or the parts of a stage that failed (a stage returns them as
    lines, e.g. its failed trials); `times` gets each stage's wall seconds. A signal
    (`interrupt.Interrupted`) stops them all."""
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
            parts = stage() or []
        except Exception as exc:  # noqa: BLE001 - one failed stage does not stop the others
            if diskspace.is_full(exc):
                raise  # the next stages would fail the same way: the run stops
            cause = _cause(exc, exp, title)
            failures.append(f"{title}: {cause}")
            features_failed = features_failed or title == FEATURES_STAGE
            print(f"[boatray] {title}: FAILED: {cause}", flush=True)
            continue
        finally:
            storage.mirror_up(exp.results_dir, exp.storage_uri)
            if times is not None:
                times[title] = time.monotonic() - started
        if any(os.strerror(errno.ENOSPC) in part for part in parts):  # in a Ray worker
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(exp.results_dir))
        failures += [f"{title}: {part}" for part in parts]
        print(f"[boatray] {title}: done in {time.monotonic() - started:.0f} s"
              + (f", {len(parts)} of its parts FAILED (listed at the end)" if parts else ""),
              flush=True)
    return failures


@cli
def main(argv: list[str] | None = None) -> int:
    """Run the experiment end to end; exit code 2 with one line on a user-facing error, 130 or
    143 after SIGINT or SIGTERM, with the command that finishes the run."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    if args.config is None and exp.data.source is None:
        print("[boatray] no --config: running the built-in smoke experiment on GENERATED "
              "(synthetic) boat images, not MarDCT; its numbers say nothing about the real "
              "data. Use --config ray_jobs/lab6.yaml --data DIR for the study.", flush=True)
    elif args.config is None:
        print(f"[boatray] no --config: the built-in smoke experiment's small settings (a quick "
              f"check, not the study) on {exp.data.source}. Use --config ray_jobs/lab6.yaml "
              "for the study.", flush=True)
    print(f"[boatray] results: {results_location(exp)}", flush=True)
    storage.check_access(exp.storage_uri)
    if args.dry_run:
        return dry_run(exp, args)
    interrupt.install()
    given = sys.argv[1:] if argv is None else argv
    resume = shlex.join(["python", "-m", "boatray.sweep", *given,
                         *([] if args.resume else ["--resume"])])
    try:
        with run_state.RunLock(exp.results_dir):
            return run(exp, args.resume, args.address, args.verbose)
    except interrupt.Interrupted as stop:
        run_state.write_state(exp.results_dir, "interrupted", signal=str(stop), resume=resume)
        storage.mirror_up(exp.results_dir, exp.storage_uri)
        print(f"[boatray] stopped by {stop}; nothing finished is lost. Finish the run with: "
              f"{resume}", file=sys.stderr, flush=True)
        return stop.exit_code
    except OSError as exc:
        if not diskspace.is_full(exc):
            raise
        return stopped_by_full_disk(exp, exc, resume)


def stopped_by_full_disk(exp: Experiment, exc: OSError, resume: str) -> int:
    """A full disk ends the run in one line naming the folder; run_state.json says `failed`
    with the cause (where it can still be written); `resume` finishes the run once space is
    freed. Returns the exit code, 2."""
    cause = diskspace.full_disk_line(exc, [exp.results_dir, Path(tempfile.gettempdir())])
    try:
        run_state.write_state(exp.results_dir, "failed", cause=cause, resume=resume)
    except OSError:
        cause += f" ({exp.layout.state.name} could not be updated either)"
    print(f"error: {cause}; nothing finished is lost: free space there, then finish the run "
          f"with: {resume}", file=sys.stderr, flush=True)
    return 2


def run(exp: Experiment, resume: bool, address: str | None, verbose: bool = False) -> int:
    """The study in a results folder this process holds; 2 when a stage failed."""
    refill_staging(exp)
    check_results_dir(exp, resume)
    started = time.monotonic()
    driver_log = console.route_driver_logs(exp.results_dir, verbose)
    start_ray(address, log_to_driver=verbose, logging_level=logging.INFO)
    if not verbose:
        ray_errors.keep_in(exp.layout.logs)
        print(f"[boatray] Ray's output: {exp.layout.logs} (its own warnings in "
              f"{driver_log.name}, its workers' at the end; live in {console.ray_logs_dir()}; "
              "--verbose shows them here)", flush=True)
    run_exp, capacity = preflight.check(exp)
    with console.prefixed("[data] "):
        manifest = ensure_manifest(exp)
    frame = check_data(manifest)
    drop_stale_features(exp, frame)
    diskspace.check(run_exp, frame)
    atomic_write_text(exp.layout.experiment, json.dumps(exp.to_dict(), indent=2))
    atomic_write_text(exp.layout.backbone,
                      json.dumps(freezing.describe(exp.model.name, exp.model.weights), indent=2))
    estimated, calibration = estimate.for_run(run_exp, frame, capacity)
    print(f"[boatray] estimated wall time: {estimate.summary(estimated, calibration)}",
          flush=True)
    run_state.write_state(exp.results_dir, "running")
    times = {"start (Ray, data)": time.monotonic() - started}
    try:
        failures = run_stages(run_exp, manifest, resume, times)
    finally:
        logs = keep_logs(exp)
    run_state.write_state(exp.results_dir, "finished", failures=failures)
    written = None
    print("[boatray] report: writing", flush=True)
    began = time.monotonic()
    try:
        estimate.record(exp.results_dir, estimated, times)  # the report shows it, so first
        written = stage_report(run_exp)
    except Exception as exc:  # noqa: BLE001 - a failed report loses nothing else
        if diskspace.is_full(exc):
            raise
        failures.append(f"report: {_cause(exc, exp, 'report')}")
        run_state.write_state(exp.results_dir, "finished", failures=failures)
    times["report"] = time.monotonic() - began
    estimate.record(exp.results_dir, estimated, times)
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


def check_data(manifest: Path) -> pd.DataFrame:
    """The manifest's rows, once its validation split can select models (data.checks)."""
    frame, _ = read_manifest(manifest)
    for note in checks.check_selection(frame):
        print(f"[data] {note}", flush=True)
    return frame


def drop_stale_features(exp: Experiment, frame: pd.DataFrame) -> None:
    """Features an earlier run extracted from images that are no longer where the manifest
    has them (a results folder moved with its generated images) are extracted again."""
    path = exp.layout.features
    if not path.is_file():
        return
    try:
        current = set(read_columns(path, ["path"])["path"]) <= set(frame["path"])
    except (OSError, ValueError):
        current = False
    if not current:
        print(f"[boatray] features: {path} was extracted from images that are no longer where "
              "the manifest has them: extracting them again", flush=True)
        path.unlink()
        stats_path(path).unlink(missing_ok=True)


def keep_logs(exp: Experiment) -> Path | None:
    """Ray's logs copied into results/<experiment>/logs/ (console.keep_ray_logs); where that
    fails (a full disk) they stay in Ray's session folder, said in one line."""
    try:
        return console.keep_ray_logs(exp.results_dir)
    except OSError as exc:
        print(f"[boatray] Ray's logs stay in {console.ray_logs_dir()}: copying them to "
              f"{exp.layout.logs} failed ({exc.strerror or exc})", flush=True)
        return None


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
    console.route_driver_logs(exp.results_dir, args.verbose)
    start_ray(args.address, logging_level=logging.INFO)
    run_exp, capacity = preflight.check(exp, weights=False)
    with console.prefixed("[data] "):
        manifest = ensure_manifest(exp)
    frame = check_data(manifest)
    for line in preflight.plan(run_exp, frame, capacity):
        print(f"[plan] {line}", flush=True)
    print("[plan] dry run: nothing was trained", flush=True)
    models.fetch_weights(exp.model.name, exp.model.weights)  # the run would stop here
    return 0


if __name__ == "__main__":
    sys.exit(main())
