"""Running on a cluster: cluster.yaml against Ray's own launcher checks, ray_jobs/ (runtime env,
submit helper, README), a 2-worker run across two local nodes, and `ray job submit` of the smoke
experiment to a `ray start --head` instance.

Other tests and developers run Ray on this machine at the same time, so the Ray instances here
are private: each gets its own RAY_TMPDIR (where Ray records the address that a bare
`ray.init()` joins) and free ports, and is stopped by killing exactly its own processes, never
with `ray stop`, which stops every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from boatray.cluster import free_ports
from boatray.errors import BoatrayError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RUNTIME_ENV = REPO / "ray_jobs" / "runtime_env.yaml"
JOBS_README = REPO / "ray_jobs" / "README.md"


def load_submit():
    """ray_jobs/submit.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("submit", REPO / "ray_jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = load_submit()


# ---------------------------------------------------------------- cluster.yaml

def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check_with_ray(raw: dict) -> dict:
    """What `ray up` does before it talks to AWS: merge Ray's AWS defaults, then validate
    against ray/autoscaler/ray-schema.json and the launcher's own rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_launcher_checks():
    prepared = check_with_ray(cluster_config())
    assert prepared["provider"]["type"] == "aws"


def test_cluster_layout():
    raw = cluster_config()
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"]["trial_driver"] >= 1
    workers = {name: spec for name, spec in types.items() if name != raw["head_node_type"]}
    assert len(workers) >= 2 and all(spec["min_workers"] == 0 for spec in workers.values())
    assert sum(spec["max_workers"] for spec in workers.values()) >= raw["max_workers"]
    # One bucket: every S3 URI in the file lies under the storage path the jobs write to.
    storage = submit.cluster_overrides(CLUSTER_YAML)[0].removeprefix("storage_path=")
    uris = re.findall(r"s3://[^'\"\s]+", CLUSTER_YAML.read_text())
    assert storage.startswith("s3://") and all(uri.startswith(storage) for uri in uris)


# ---------------------------------------------------------------- ray_jobs/

def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(raw) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**raw)  # checks the field types (env_vars: str -> str, ...)


def test_submit_builds_the_readme_command():
    args = submit.build_parser().parse_args(
        ["--cluster", str(CLUSTER_YAML), "--config", str(REPO / "ray_jobs" / "lab6.yaml"),
         "--data", "/home/ray/data/mardct", "--set", "sweep.repeats=3"])
    overrides = submit.experiment_overrides(args)
    assert overrides == ["storage_path=s3://YOUR-BUCKET/boatray",
                         "sweep.trial_resource=trial_driver", "sweep.repeats=3"]
    command = submit.submit_command(submit.sweep_arguments(args, overrides), "job-1",
                                    "http://127.0.0.1:8265")
    line = " ".join(command[1:])
    assert line.startswith("job submit --submission-id job-1 --address http://127.0.0.1:8265 ")
    assert line.endswith(
        "--working-dir . --runtime-env ray_jobs/runtime_env.yaml -- python -m boatray.sweep "
        "--config ray_jobs/lab6.yaml --data /home/ray/data/mardct "
        "--set storage_path=s3://YOUR-BUCKET/boatray --set sweep.trial_resource=trial_driver "
        "--set sweep.repeats=3")
    readme = " ".join(JOBS_README.read_text().replace("\\\n", " ").split())
    assert ("--working-dir . --runtime-env ray_jobs/runtime_env.yaml -- python -m "
            "boatray.sweep --config ray_jobs/lab6.yaml") in readme


def test_submit_says_where_results_land_and_how_to_fetch_them():
    from boatray.config import JOB_RESULTS_BASE, load

    def where(*overrides: str) -> str:
        return submit.results_location(load(None, list(overrides), base=JOB_RESULTS_BASE))

    assert where("storage_path=s3://b/p/").startswith(
        "s3://b/p/smoke (fetch: python -m boatray.fetch s3://b/p/smoke smoke)")
    assert where("storage_path=/shared").startswith("/shared/smoke on the node that runs")
    assert where().startswith("~/boatray/results/smoke on the node")
    assert "ray rsync-down cluster.yaml ~/boatray/results/smoke ./smoke" in where()


def test_submit_refuses_bad_input_before_submitting(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail("submitted"))
    assert submit.main(["--set", "train.epoch=3"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    outside = tmp_path / "exp.yaml"
    outside.write_text("name: x\n")
    assert submit.main(["--config", str(outside)]) == 2
    assert "outside" in capsys.readouterr().err
    with pytest.raises(BoatrayError, match=r"metadata\.boatray\.overrides"):
        submit.cluster_overrides(RUNTIME_ENV)


def test_submit_refuses_placeholders_and_an_unreachable_server_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail("submitted"))
    assert submit.main(["--cluster", str(CLUSTER_YAML)]) == 2  # its unedited s3://YOUR-BUCKET
    err = capsys.readouterr().err
    assert "storage_path is still the example placeholder" in err and err.count("\n") == 1
    (port,) = free_ports()  # nobody listens there
    assert submit.main(["--set", "storage_path=/shared", "--address",
                        f"http://127.0.0.1:{port}"]) == 2
    captured = capsys.readouterr()
    assert "cannot reach the Ray job server" in captured.err and captured.err.count("\n") == 1
    assert "[submit] logs:" not in captured.out


# ---------------------------------------------------------------- private Ray instances

def processes_of(ray_tmpdir: str) -> list[int]:
    """Every live process that inherited RAY_TMPDIR=ray_tmpdir: one private Ray instance."""
    marker = f"RAY_TMPDIR={ray_tmpdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def stop_processes_of(ray_tmpdir: str, grace_seconds: float = 5.0) -> None:
    """Stop one private Ray instance: SIGTERM its processes, SIGKILL what is left after grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(ray_tmpdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_seconds
        while processes_of(ray_tmpdir) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture
def private_ray_env() -> Iterator[dict[str, str]]:
    """An environment for Ray processes of their own: private RAY_TMPDIR (short, for Unix
    socket paths), token authentication with a fresh token, this venv's `python` first on PATH,
    and no RAY_ADDRESS (it would override any address given). Stops them all afterwards."""
    ray_tmpdir = tempfile.mkdtemp(prefix="br-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    try:
        yield env
    finally:
        stop_processes_of(ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def start_head(env: dict[str, str], log: Path, tries: int = 2) -> str:
    """`ray start --head` on free ports, 4 logical CPUs; returns the job server's address.

    A second try after a failed start: on a loaded machine the raylet can miss the fixed 30 s
    in which `ray start` waits for it to register with the GCS.
    """
    for _ in range(tries):
        gcs, dashboard, agent, agent_grpc, client, metrics = free_ports(6)
        started = run_logged(
            [submit.ray_executable(), "start", "--head", f"--port={gcs}", "--num-cpus=4",
             "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
             f"--metrics-export-port={metrics}", "--disable-usage-stats"],
            env, log, timeout=180)
        if started == 0:
            return f"http://127.0.0.1:{dashboard}"
        stop_processes_of(env["RAY_TMPDIR"])
    pytest.fail(f"ray start --head failed {tries} times:\n{log.read_text()[-5000:]}")


def job_status(address: str, job: str, token: str) -> str:
    """A job's status from the job server's REST API (GET /api/jobs/ID), token-authenticated."""
    request = urllib.request.Request(f"{address}/api/jobs/{job}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)["status"]


def run_logged(command: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run a command from the repository root, its output into `log`; return its exit code."""
    with log.open("a") as out:
        return subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False).returncode


# ---------------------------------------------------------------- multi-node, real client

@pytest.mark.slow
def test_two_workers_train_on_two_nodes(private_ray_env, tmp_path):
    log = tmp_path / "two_nodes.log"
    code = run_logged([sys.executable, "tests/two_node_training.py", str(tmp_path / "storage"),
                       *map(str, free_ports(2))], private_ray_env, log, timeout=600)
    output = log.read_text()
    assert code == 0, output[-5000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result["worker_nodes"] == sorted(result["nodes"].values())  # one worker per node
    run_dir = Path(result["run_dir"])
    assert run_dir == tmp_path / "storage" / "two-node" / "runs" / "ddp"
    assert list(run_dir.glob("checkpoint_*/model.pt"))
    assert (run_dir / "predictions.parquet").is_file()
    assert json.loads((run_dir / "run.json").read_text())["checkpoint"].startswith(str(run_dir))


@pytest.mark.slow
def test_ray_job_submit_runs_the_readme_job_and_its_results_outlive_it(private_ray_env,
                                                                       tmp_path):
    home = tmp_path / "home"  # the head node's home, where a job's relative results land
    home.mkdir()
    private_ray_env["HOME"] = str(home)
    log = tmp_path / "job.log"
    address, job = start_head(private_ray_env, log), "boatray-smoke-ci"
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)
    # The README's job command as written, with only the address of this private head added.
    submitted = run_logged(
        [submit.ray_executable(), "job", "submit", "--address", address, "--submission-id", job,
         "--working-dir", ".", "--", "python", "-m", "boatray.sweep"],
        private_ray_env, log, timeout=1500)
    status = job_status(address, job, private_ray_env["RAY_AUTH_TOKEN"])
    output = log.read_text()
    assert submitted == 0 and status == "SUCCEEDED", f"{status}\n{output[-8000:]}"
    results = home / "boatray" / "results" / "smoke"
    assert f"[boatray] results: {results}" in output
    stop_processes_of(private_ray_env["RAY_TMPDIR"])  # the job and the Ray instance are gone
    assert (results / "report" / "report.html").is_file()
    assert pd.read_parquet(results / "trials.parquet")["trial_id"].nunique() == 4
