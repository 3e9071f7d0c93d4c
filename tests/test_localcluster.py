"""The cluster path on one machine (README "The cluster path on one machine"): an autoscaling
cluster on Ray's own autoscaler (`python -m boatray.localcluster up`, its fake multi-node
provider), the README's smoke job on it, nodes lost under a run, DDP across two nodes.

The cluster is started once for the module, in a private folder, on free ports, and ended by
PID (`python -m boatray.localcluster down`): other Ray instances run on this machine. Its head
runs drivers only (no CPU for work); worker nodes of 2 CPUs, at most 2, come and go with the
work. Every wait is for an event (a node count, a checkpoint, an actor), bounded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from boatray import localcluster
from boatray.localcluster import LocalCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's head id
JOB_TIMEOUT = 600  # seconds a job may take on a loaded 2-core machine (about 2 min when quiet)


class NodeTimeline(threading.Thread):
    """The cluster's live worker nodes, sampled twice a second: every change, timed."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.started = cluster, time.monotonic()
        self.changes: list[tuple[float, tuple[str, ...]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with_errors_ignored = _quietly(lambda: tuple(sorted(
                node["node_id"] for node in localcluster.worker_nodes(self.cluster))))
            if with_errors_ignored is not None and (
                    not self.changes or self.changes[-1][1] != with_errors_ignored):
                self.changes.append((time.monotonic() - self.started, with_errors_ignored))
            self.stopped.wait(0.5)

    def now(self) -> tuple[str, ...]:
        return self.changes[-1][1] if self.changes else ()

    def seen(self) -> set[str]:
        return {node for _, nodes in self.changes for node in nodes}

    def report(self, title: str) -> str:
        lines = [f"{title}: worker nodes over time"] + [
            f"  {at:6.1f} s: {len(nodes)} ({', '.join(n[-5:] for n in nodes) or '-'})"
            for at, nodes in self.changes]
        text = "\n".join(lines)
        print(text, flush=True)
        return text


def _quietly(read: Callable):
    try:
        return read()
    except Exception:  # noqa: BLE001 - a dashboard busy for a moment: sample again
        return None


def wait_for(what: str, check: Callable, timeout: float, every: float = 0.25):
    """Poll `check` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _quietly(check)
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    """The module's cluster: its handle, the clients' environment, the head's home."""

    handle: LocalCluster
    env: dict[str, str]
    home: Path
    timeline: NodeTimeline = field(init=False)

    def results(self, name: str) -> Path:
        """Where a job's results/<name>/ land: ~/boatray/results on the head node."""
        return self.home / "boatray" / "results" / name

    def submit(self, *sweep_args: str, wait: bool = True) -> tuple[int, str, str]:
        """`ray job submit --working-dir . -- python -m boatray.sweep ...` from the repository
        (the README's command; the address comes from RAY_API_SERVER_ADDRESS, as `up` says);
        returns (exit code, output, job id)."""
        command = [localcluster.ray_cli(), "job", "submit", *([] if wait else ["--no-wait"]),
                   "--working-dir", ".", "--", "python", "-m", "boatray.sweep", *sweep_args]
        done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT, check=False)
        output = done.stdout + done.stderr
        job = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
        assert job, output[-3000:]
        return done.returncode, output, job.group(1)

    def job(self, job_id: str) -> dict:
        return localcluster.api_get(self.handle, f"/api/jobs/{job_id}")

    def logs(self, job_id: str) -> str:
        return localcluster.api_get(self.handle, f"/api/jobs/{job_id}/logs")["logs"]

    def finish(self, job_id: str) -> tuple[str, str]:
        """(status, what to show if it is not SUCCEEDED) once the job has ended."""
        wait_for(f"the end of job {job_id}", lambda: self.job(job_id)["status"] in (
            "SUCCEEDED", "FAILED", "STOPPED"), JOB_TIMEOUT, every=1)
        status = self.job(job_id)["status"]
        status_file = Path(self.handle.directory, "session_latest", "logs", "monitor.out")
        autoscaler = status_file.read_text().rsplit("Autoscaler status", 1)[-1][:3000]
        return status, (f"{status}\n{self.logs(job_id)[-8000:]}\n"
                        f"{self.timeline.report('worker nodes')}\nautoscaler: {autoscaler}")

    def alive_actors(self, class_name: str) -> list[dict]:
        reply = localcluster.api_get(
            self.handle, "/api/v0/actors?limit=1000&detail=1&filter_keys=state"
                         "&filter_predicates=%3D&filter_values=ALIVE")
        return [actor for actor in reply["data"]["result"]["result"]
                if actor["class_name"] == class_name]

    def actor(self, actor_id: str) -> dict:
        reply = localcluster.api_get(
            self.handle, f"/api/v0/actors?detail=1&filter_keys=actor_id&filter_predicates=%3D"
                         f"&filter_values={actor_id}")
        return reply["data"]["result"]["result"][0]


def run_module(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """`python -m boatray.localcluster up` in a private folder, with a home of its own (where
    jobs' relative results land) and a fresh token; `down` afterwards."""
    home = tmp_path_factory.mktemp("home")
    directory = tempfile.mkdtemp(prefix="brc-", dir="/tmp")  # short: Unix socket paths
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_TOKEN", token)  # this process reads the dashboard too
        try:
            started = run_module("boatray.localcluster", "up", "--dir", directory, env=env)
            assert started.returncode == 0, started.stdout + started.stderr
            print(started.stdout, flush=True)
            exports = re.search(r"submit jobs with: export (.+)", started.stdout).group(1)
            env.update(item.split("=", 1) for item in exports.split())
            made = Cluster(LocalCluster.load(Path(directory)), env, home)
            made.timeline = NodeTimeline(made.handle)
            made.timeline.start()
            yield made
        finally:
            ended = run_module("boatray.localcluster", "down", "--dir", directory, env=env)
            assert ended.returncode == 0 and not localcluster.processes_of(Path(directory))
            assert not Path(directory).exists()


def worker_ids(nodes: str) -> list[str]:
    """The node ids a `node` metric names (comma-separated, one per rank)."""
    return nodes.split(",")


def test_the_readme_smoke_job_scales_workers_from_zero_and_back(cluster):
    timeline = cluster.timeline
    wait_for("the node sampler", lambda: timeline.changes, 60)
    assert timeline.now() == (), "worker nodes before the job"
    with pytest.raises(urllib.error.HTTPError) as refused:  # token authentication is on
        urllib.request.urlopen(f"{cluster.handle.dashboard_url}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)
    before = len(timeline.changes)
    code, output, job = cluster.submit()  # the README's command as written
    status = cluster.job(job)["status"]
    assert code == 0 and status == "SUCCEEDED", f"{status}\n{output[-8000:]}"
    during = timeline.changes[before:]
    assert max(len(nodes) for _, nodes in during) >= 1, timeline.report("smoke job")
    results = cluster.results("smoke")
    assert f"[boatray] results: {results}" in output
    assert (results / "report" / "report.html").is_file()
    trials = pd.read_parquet(results / "trials.parquet")
    assert trials["trial_id"].nunique() == 4
    # every trial epoch and every extracted image ran on a worker node, none on the head
    assert all(node != HEAD and node in timeline.seen() for node in trials["node"])
    stats = json.loads((results / "features" / "features.json").read_text())
    assert not stats["in_process"] and stats["images"] == sum(stats["images_per_node"].values())
    assert set(stats["images_per_node"]) <= timeline.seen() - {HEAD}
    for run in ("svm", "probe"):
        assert (results / "runs" / run / "run.json").is_file()
    # the plan against this cluster (a job on the head, while the workers idle out)
    _, _, plan_job = cluster.submit("--dry-run", wait=False)
    # idle workers are removed: 15 s idle (the config) plus the autoscaler's reaction
    wait_for("the idle workers' removal", lambda: timeline.now() == (), 180)
    timeline.report("smoke job (submitted at the first line)")
    status = run_module("boatray.localcluster", "status", "--dir", cluster.handle.directory,
                        env=cluster.env)
    assert "1 node(s) up, 0 of them workers" in status.stdout, status.stdout + status.stderr
    status, shown = cluster.finish(plan_job)
    assert status == "SUCCEEDED", shown
    plan = cluster.logs(plan_job)
    # what the autoscaler can add, and where each stage runs
    assert "the autoscaler can add cpu_2x {CPU: 2} x 2" in plan, plan[-5000:]
    added = "cpu_2x nodes the autoscaler adds (up to 2)"
    for where in ("each finetune and baseline run trains in its own process of {CPU: 1}",
                  "each feature-extraction actor takes {CPU: 0.5}"):
        assert re.search(rf"\[plan\] where: {re.escape(where)}: on .*{re.escape(added)}",
                         plan), plan[-5000:]
    assert "[plan] where: the driver (this node)" in plan


def test_a_node_lost_mid_trial_and_mid_extraction_needs_no_resume(cluster):
    """A worker node killed while the study's one trial trains on it (after its second epoch),
    another while the extraction actor runs on it (`all` needs no frozen-prefix cache, so the
    features are extracted after the sweep): Tune restarts the trial from its last checkpoint,
    Ray Data restarts the actor, the autoscaler adds the nodes the work needs, and the job
    finishes without --resume."""
    name, epochs = "node-lost", 10  # enough left after epoch 2 to find the trial and kill it
    overrides = ["--set", f"name={name}", "--set", "sweep.freeze=[all]",
                 "--set", "sweep.lr=[0.001]", "--set", "sweep.asha.enabled=false",
                 "--set", f"train.epochs={epochs}", "--set", "baseline.enabled=false",
                 # a checkpoint after every epoch; an extraction of seconds, long enough to kill
                 "--set", "train.checkpoint_every_s=0",
                 "--set", "data.synthetic.test_per_class=500"]
    _, output, job = cluster.submit(*overrides, wait=False)
    results = cluster.results(name)
    # the driver's line for epoch 2: Tune holds epoch 1's checkpoint at the latest (it takes
    # an epoch's checkpoint a moment after printing that epoch's line)
    epoch_two = re.compile(rf"\[sweep\] trial 1/1 \S+ .* epoch 2/{epochs}:")
    wait_for("the trial's second epoch", lambda: epoch_two.search(cluster.logs(job)), 600)
    (trial,) = wait_for("the trial's actor", lambda: cluster.alive_actors("ImplicitFunc"), 60)
    lost_in_trial = trial["node_id"]  # lost as the README says: kill-node
    killed = run_module("boatray.localcluster", "kill-node", lost_in_trial, "--dir",
                        cluster.handle.directory, env=cluster.env)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    print(killed.stdout.splitlines()[0], "after epoch 2", flush=True)
    extraction = "MapWorker(MapBatches(TrunkRunner))"
    (actor,) = wait_for("the extraction actor", lambda: cluster.alive_actors(extraction), 600)
    lost_in_extraction = actor["node_id"]
    localcluster.kill_node(cluster.handle, lost_in_extraction)
    status, shown = cluster.finish(job)
    timeline = cluster.timeline.report("node-loss job")
    assert status == "SUCCEEDED", shown
    assert re.search(r"\[sweep\] trial \S+ failed \(\w+\); Tune restarts it from its last "
                     r"checkpoint \(retry 1 of 1\)", cluster.logs(job)), shown
    # the trial: once, every epoch, epoch 1 on the lost node, the rest resumed elsewhere
    trials = pd.read_parquet(results / "trials.parquet")
    assert trials["trial_id"].nunique() == 1, trials
    assert trials["epoch"].tolist() == list(range(1, epochs + 1)), trials
    assert trials["node"].iloc[0] == lost_in_trial, (trials["node"].tolist(), timeline)
    assert trials["node"].iloc[-1] not in (lost_in_trial, HEAD), (trials["node"].tolist(),
                                                                 timeline)
    # the extraction: every image, the actor restarted on another node
    stats = json.loads((results / "features" / "features.json").read_text())
    frame = pd.read_parquet(results / "data" / "manifest.parquet")
    assert stats["images"] == len(frame) and not stats["failed"]
    restarted = cluster.actor(actor["actor_id"])
    assert int(restarted["num_restarts"]) >= 1 and restarted["node_id"] != lost_in_extraction
    assert (results / "report" / "report.html").is_file()
    # the autoscaler added nodes after each loss: no worker was left when they were killed
    assert len(cluster.timeline.seen() - {lost_in_trial, lost_in_extraction}) >= 1, timeline


def test_a_two_worker_ddp_trial_spans_two_worker_nodes_with_equal_weights(cluster):
    """train.num_workers=2 with 2 CPUs each: one rank per worker node (gloo), the trial's
    driver on the head's `trial_driver` resource, as on cluster.yaml."""
    name = "ddp"
    _, _, job = cluster.submit(
        "--set", f"name={name}", "--set", "train.num_workers=2",
        "--set", "train.cpus_per_worker=2", "--set", "sweep.trial_resource=trial_driver",
        "--set", "sweep.freeze=[all]", "--set", "sweep.lr=[0.001]", "--set", "train.epochs=1",
        "--set", "features.enabled=false", "--set", "baseline.enabled=false", wait=False)
    status, shown = cluster.finish(job)
    assert status == "SUCCEEDED", shown
    trials = pd.read_parquet(cluster.results(name) / "trials.parquet")
    assert len(trials) == 1, trials
    ranks = worker_ids(trials["node"].iloc[0])
    assert len(ranks) == 2 and len(set(ranks)) == 2 and HEAD not in ranks, ranks
    assert bool(trials["ranks_equal"].iloc[0])
    cluster.timeline.report("DDP job")
