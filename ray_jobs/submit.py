"""Submit a boatray experiment to a Ray cluster as a Ray job, follow it, say where results land.

    python ray_jobs/submit.py --cluster cluster.yaml --config ray_jobs/lab6.yaml \
        --data /home/ray/data/mardct

checks the experiment config here first (a bad key fails now, not minutes into the job), then
runs Ray's own client with the command ray_jobs/README.md gives, from the repository root:

    ray job submit --submission-id ID --working-dir . --runtime-env ray_jobs/runtime_env.yaml \
        -- python -m boatray.sweep --config ray_jobs/lab6.yaml --set storage_path=s3://... ...

The cluster's address comes from --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as for
`ray job submit` itself. With --cluster, the `--set` overrides that cluster.yaml names for its
jobs (metadata.boatray.overrides: the shared storage_path) come before the user's.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from boatray import config as config_module
from boatray import fetch
from boatray.config import Experiment
from boatray.errors import BoatrayError, cli
from boatray.localcluster import ray_cli

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = "ray_jobs/runtime_env.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ray_jobs/submit.py."""
    parser = argparse.ArgumentParser(
        prog="python ray_jobs/submit.py",
        description="Submit `python -m boatray.sweep` to a Ray cluster as a Ray job and follow "
                    "its logs.")
    config_module.add_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted run of the same experiment")
    parser.add_argument("--cluster", help="cluster.yaml whose metadata.boatray.overrides "
                                          "(its shared storage_path) apply to the job")
    parser.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: "
                                          "RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    parser.add_argument("--submission-id", help="the job's id (default: "
                                                "boatray-<experiment>-<time>)")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the job is submitted instead of following its logs")
    return parser


def cluster_overrides(cluster_yaml: str | Path) -> list[str]:
    """The `--set` overrides a cluster.yaml names for its jobs (metadata.boatray.overrides)."""
    path = Path(cluster_yaml)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BoatrayError(f"cannot read cluster config {path}: {exc}") from None
    overrides = (((raw or {}).get("metadata") or {}).get("boatray") or {}).get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise BoatrayError(f"{path}: metadata.boatray.overrides must be a list of KEY=VALUE")
    return overrides


def experiment_overrides(args: argparse.Namespace) -> list[str]:
    """The job's `--set` overrides: the cluster's first, then the user's (which win)."""
    return (cluster_overrides(args.cluster) if args.cluster else []) + list(args.overrides)


def sweep_arguments(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The arguments of `python -m boatray.sweep` in the job, config path relative to the repo."""
    sweep = ["--config", repo_relative(args.config)] if args.config else []
    if args.data:
        sweep += ["--data", args.data]
    for item in overrides:
        sweep += ["--set", item]
    if args.resume:
        sweep.append("--resume")
    return sweep


def repo_relative(config: str) -> str:
    """A config file's path inside the repository: the job sees the repository, nothing else."""
    path = Path(config).resolve()
    if not path.is_file():
        raise BoatrayError(f"config file not found: {config}")
    if not path.is_relative_to(REPO):
        raise BoatrayError(f"config {config} is outside {REPO}: the job sees only the "
                           "repository (--working-dir), so put the file there")
    return path.relative_to(REPO).as_posix()


def submit_command(sweep_args: list[str], submission_id: str, address: str | None = None,
                   no_wait: bool = False) -> list[str]:
    """The `ray job submit` command line (run from the repository root)."""
    command = [ray_cli(), "job", "submit", "--submission-id", submission_id]
    if address:
        command += ["--address", address]
    if no_wait:
        command.append("--no-wait")
    command += ["--working-dir", ".", "--runtime-env", RUNTIME_ENV, "--",
                "python", "-m", "boatray.sweep", *sweep_args]
    return command


def results_location(exp: Experiment) -> str:
    """Where the job writes results/<experiment>/ and how to fetch it, said for a person.

    `exp` is loaded as the job loads it: a relative storage_path under JOB_RESULTS_BASE of the
    node that runs the job's driver (the head node by default)."""
    if exp.remote_storage:
        return f"{exp.storage_uri} (fetch: {fetch.command(exp.storage_uri)})"
    where = f"{exp.storage_path.rstrip('/')}/{exp.name}"
    return (f"{where} on the node that runs the job's driver, the head node by default "
            f"(fetch: ray rsync-down cluster.yaml {where} ./{exp.name})")


@cli
def main(argv: list[str] | None = None) -> int:
    """Validate the experiment, submit it, follow it; the exit code is `ray job submit`'s."""
    args = build_parser().parse_args(argv)
    overrides = experiment_overrides(args)
    sweep_args = sweep_arguments(args, overrides)
    exp = config_module.from_arguments(args, overrides, base=config_module.JOB_RESULTS_BASE)
    refuse_placeholders({"storage_path": exp.storage_path, "data.source": exp.data.source,
                         **dict(item.split("=", 1) for item in overrides if "=" in item)})
    submission_id = args.submission_id or f"boatray-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = submit_command(sweep_args, submission_id, args.address, args.no_wait)
    print(f"[submit] results: {results_location(exp)}", flush=True)
    print(f"[submit] {shlex.join(command)}", flush=True)
    check_job_server(job_server(args.address))
    code = subprocess.run(command, cwd=REPO, check=False).returncode
    if code != 0:
        print(f"[submit] ray job submit failed (exit code {code}); see its output above",
              flush=True)
        return code
    where = f" --address {args.address}" if args.address else ""
    for verb in ("logs", "status", "stop"):
        print(f"[submit] {verb}: ray job {verb} {submission_id}{where}", flush=True)
    print(f"[submit] results: {results_location(exp)}", flush=True)
    return code


PLACEHOLDER = re.compile(r"YOUR[-_][A-Z]")
"""How the example configs mark a value the user must fill in (s3://YOUR-BUCKET)."""


def refuse_placeholders(values: dict[str, str]) -> None:
    """One line naming the first value still holding an example placeholder."""
    for name, value in values.items():
        if value and PLACEHOLDER.search(value):
            raise BoatrayError(f"{name} is still the example placeholder {value!r}: put your "
                               "own bucket or folder there (cluster.yaml's "
                               "metadata.boatray.overrides, or --set storage_path=...)")


def job_server(address: str | None) -> str:
    """The job server `ray job submit` will use: --address, else RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS, else Ray's default http://127.0.0.1:8265."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or "http://127.0.0.1:8265")


def check_job_server(address: str) -> None:
    """One line when an http(s) job server does not answer (other addresses: Ray's own
    client decides)."""
    if not address.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=10):
            return
    except urllib.error.HTTPError:
        return  # something answered: let Ray's client talk to it
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BoatrayError(f"cannot reach the Ray job server at {address} ({reason}): start "
                           "the cluster (ray up cluster.yaml) and forward its dashboard port "
                           "(ray dashboard cluster.yaml), or pass --address") from None


if __name__ == "__main__":
    sys.exit(main())
