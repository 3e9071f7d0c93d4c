"""`python -m boatray.localcluster up|status|kill-node|down`: an autoscaling Ray cluster on one
machine, to try the cluster path before paying for one.

Ray's own autoscaler runs it, with the fake multi-node provider that Ray's autoscaler tests use
(ray/autoscaler/_private/fake_multi_node/node_provider.py): its "nodes" are raylets started on
this machine with the resources of their node type (ray_jobs/local-cluster.yaml). `up` starts
the head on free ports with a private temporary folder (RAY_TMPDIR, so that no bare
`ray.init()` on the machine joins it) and token authentication; every process of the cluster,
the nodes the autoscaler adds and their workers included, inherits that folder in its
environment, which is how `down` finds them and ends them by PID (never `ray stop`, which ends
every Ray instance on the machine). `kill-node` ends one worker node's raylet and every process
on it at once, as a lost spot instance would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from boatray.cluster import free_ports
from boatray.errors import BoatrayError, cli

CONFIG = Path("ray_jobs/local-cluster.yaml")
PROVIDER = "boatray.localprovider.LocalNodeProvider"
DIRECTORY = Path(f"/tmp/boatray-cluster-{os.getuid()}")
"""The default home of a cluster: short, for the Unix socket paths under it."""
STATE_FILE = "cluster.json"
NODE_ID_VARIABLE = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"
"""How the fake provider gives each node its id: in the environment of its raylet, which its
workers inherit."""
START_TRIES = 2  # on a loaded machine a raylet can miss `ray start`'s 30 s to register


@dataclass
class LocalCluster:
    """A running local cluster: its folder, its GCS and job-server addresses, its config."""

    directory: str
    gcs_address: str
    dashboard_url: str
    config: str

    @classmethod
    def load(cls, directory: Path = DIRECTORY) -> LocalCluster:
        """The cluster started in `directory`, or one line saying there is none."""
        state = Path(directory) / STATE_FILE
        if not state.is_file() or not processes_of(directory):
            raise BoatrayError(f"no local cluster runs in {directory}: "
                               "python -m boatray.localcluster up")
        return cls(**json.loads(state.read_text()))

    def client_environment(self) -> dict[str, str]:
        """What a client (`ray job submit`, a driver with --address) needs in its environment."""
        return {"RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token"}


def read_config(path: Path) -> dict:
    """The cluster config, checked for what `up` relies on."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BoatrayError(f"cannot read local cluster config {path}: {exc}") from None
    provider = (raw or {}).get("provider") or {}
    if provider.get("type") != "fake_multinode" and provider.get("module") != PROVIDER:
        raise BoatrayError(f"{path}: provider must be Ray's fake_multinode or {PROVIDER}")
    types = raw.get("available_node_types") or {}
    if raw.get("head_node_type") not in types:
        raise BoatrayError(f"{path}: head_node_type must name one of available_node_types")
    return raw


def head_arguments(raw: dict) -> list[str]:
    """`ray start` flags for the head node type's resources (CPU 0: it runs no work)."""
    resources = dict(raw["available_node_types"][raw["head_node_type"]].get("resources") or {})
    flags = [f"--num-cpus={int(resources.pop('CPU', 0))}",
             f"--num-gpus={int(resources.pop('GPU', 0))}"]
    if "object_store_memory" in resources:
        flags.append(f"--object-store-memory={int(resources.pop('object_store_memory'))}")
    if resources:
        flags.append(f"--resources={json.dumps(resources)}")
    return flags


def environment(raw: dict, directory: Path) -> dict[str, str]:
    """The head's environment: the fake provider switched on, the private temporary folder (the
    mark of every process of this cluster), token authentication unless the caller chose a
    mode, and the config's metadata.boatray.environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.setdefault("RAY_AUTH_MODE", "token")
    extra = ((raw.get("metadata") or {}).get("boatray") or {}).get("environment") or {}
    env.update({str(k): str(v) for k, v in extra.items()})
    env.update(RAY_FAKE_CLUSTER="1", RAY_TMPDIR=str(directory), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def ray_cli() -> str:
    """Ray's command line of this Python environment (or the first on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")


def up(config: Path = CONFIG, directory: Path = DIRECTORY) -> LocalCluster:
    """Start the head of the cluster `config` describes in `directory`; the autoscaler adds
    worker nodes when work waits for them."""
    from ray._private.services import get_node_ip_address

    directory = Path(directory)
    if processes_of(directory):
        raise BoatrayError(f"a local cluster already runs in {directory}: "
                           "python -m boatray.localcluster down")
    raw = read_config(config)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log = directory / "ray-start.log"
    for _ in range(START_TRIES):
        gcs, dashboard, agent, agent_grpc, client, metrics = free_ports(6)
        gcs_address = f"{get_node_ip_address()}:{gcs}"
        bootstrap = {**raw, "provider": {**raw["provider"], "gcs_address": gcs_address}}
        autoscaling = directory / "autoscaling.yaml"
        autoscaling.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        command = [ray_cli(), "start", "--head", f"--port={gcs}", *head_arguments(raw),
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                   f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
                   f"--temp-dir={directory}", f"--autoscaling-config={autoscaling}",
                   "--disable-usage-stats"]
        dashboard_url = f"http://127.0.0.1:{dashboard}"
        # every process of the cluster finds its State API at this address (Train's
        # placement-group cleaner asks without one, and would find every Ray instance here)
        env = {**environment(raw, directory), "RAY_API_SERVER_ADDRESS": dashboard_url}
        with log.open("a") as out:
            started = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     check=False).returncode
        if started == 0:
            with log.open("a") as out:  # the node types, where a driver's plan reads them
                started = subprocess.run(
                    [sys.executable, "-m", "boatray.nodetypes", str(autoscaling), "--address",
                     gcs_address], env=env, stdout=out, stderr=subprocess.STDOUT,
                    check=False).returncode
        if started == 0:
            cluster = LocalCluster(str(directory), gcs_address, dashboard_url,
                                   str(Path(config).resolve()))
            (directory / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))
            return cluster
        stop_processes(directory)
    raise BoatrayError(f"ray start --head failed {START_TRIES} times; its output: {log}")


def processes_of(directory: Path, also: str | None = None) -> list[int]:
    """The live processes of the cluster in `directory` (those whose environment holds its
    RAY_TMPDIR), and with `also` ("KEY=VALUE") only those whose environment holds that too."""
    marks = {f"RAY_TMPDIR={Path(directory)}".encode()} | ({also.encode()} if also else set())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # gone, or another user's
            continue
        if marks <= env:
            found.append(int(entry.name))
    return found


def stop_processes(directory: Path, grace_seconds: float = 10.0) -> list[int]:
    """SIGTERM the processes of the cluster in `directory`, then SIGKILL those still there
    after `grace_seconds`; return the PIDs signalled."""
    ended: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                ended.add(pid)
        deadline = time.monotonic() + grace_seconds
        while processes_of(directory) and time.monotonic() < deadline:
            time.sleep(0.2)
    return sorted(ended)


def down(directory: Path = DIRECTORY) -> list[int]:
    """End every process of the cluster in `directory` by PID and delete the folder; return
    the PIDs."""
    ended = stop_processes(Path(directory))
    shutil.rmtree(directory, ignore_errors=True)
    return ended


def node_processes(directory: Path, node_id: str) -> list[int]:
    """The processes of one node: its raylet and what the raylet started (its workers and
    agents, which inherit the node's id), and the node's log monitor (numbered as its
    raylet's socket)."""
    pids = processes_of(directory, f"{NODE_ID_VARIABLE}={node_id}")
    sockets = [re.search(r"--raylet_socket_name=\S*/raylet(\.\d+)?(\s|$)", command_line(pid))
               for pid in pids]
    suffix = next((found.group(1) or "" for found in sockets if found), None)
    if suffix is None:
        return pids
    monitor = f"/log_monitor{suffix}.out"
    return pids + [pid for pid in processes_of(directory) if "log_monitor.py" in
                   command_line(pid) and monitor in command_line(pid)]


def command_line(pid: int) -> str:
    """A process's command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_node(cluster: LocalCluster, node_id: str) -> list[int]:
    """SIGKILL a worker node's raylet and every process on it at once (a lost machine);
    return their PIDs."""
    if node_id not in {node["node_id"] for node in worker_nodes(cluster)}:
        raise BoatrayError(f"no live worker node {node_id} in the local cluster")
    pids = node_processes(Path(cluster.directory), node_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(pids)


def auth_token() -> str | None:
    """The token clients present (RAY_AUTH_TOKEN, else ~/.ray/auth_token), if any."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path.home() / ".ray" / "auth_token"
    return token or (path.read_text().strip() if path.is_file() else None)


def api_get(cluster: LocalCluster, path: str) -> dict:
    """GET a path of the head's dashboard API (the State and Jobs APIs), authenticated."""
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{cluster.dashboard_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)
    except (urllib.error.URLError, OSError) as exc:
        raise BoatrayError(f"the local cluster's dashboard {cluster.dashboard_url} does not "
                           f"answer ({getattr(exc, 'reason', exc)})") from None


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The live nodes (State API records: node_id, is_head_node, resources_total, labels)."""
    reply = api_get(cluster, "/api/v0/nodes?limit=1000&filter_keys=state"
                             "&filter_predicates=%3D&filter_values=ALIVE&detail=1")
    return list(reply["data"]["result"]["result"])


def worker_nodes(cluster: LocalCluster) -> list[dict]:
    """The live nodes other than the head."""
    return [node for node in alive_nodes(cluster) if not node["is_head_node"]]


def describe(cluster: LocalCluster) -> list[str]:
    """What `up` and `status` print: the nodes, the node types the autoscaler may add, how a
    client reaches the cluster."""
    raw = read_config(Path(cluster.config))
    head = raw["head_node_type"]
    types = ", ".join(
        f"{name} {spec.get('resources')} x {spec.get('max_workers')}"
        for name, spec in raw["available_node_types"].items() if name != head)
    nodes = alive_nodes(cluster)
    exports = " ".join(f"{k}={v}" for k, v in cluster.client_environment().items())
    return [f"local cluster in {cluster.directory}: {len(nodes)} node(s) up, "
            f"{len(nodes) - 1} of them workers; the autoscaler adds {types} on demand and "
            f"removes a worker idle for {raw.get('idle_timeout_minutes')} min",
            f"submit jobs with: export {exports}",
            f"run a driver here with: RAY_AUTH_MODE=token python -m boatray.sweep "
            f"--address {cluster.gcs_address}",
            "end it with: python -m boatray.localcluster down"
            + ("" if Path(cluster.directory) == DIRECTORY else
               f" --dir {cluster.directory}")]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.localcluster`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.localcluster",
        description="An autoscaling Ray cluster on this machine (Ray's fake multi-node "
                    "provider): start it, look at it, lose a node, end it.")
    parser.add_argument("action", choices=("up", "status", "kill-node", "down"))
    parser.add_argument("node_id", nargs="?",
                        help="kill-node: the worker node to kill (default: the first one)")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help=f"up: the cluster config (default: {CONFIG})")
    parser.add_argument("--dir", type=Path, default=DIRECTORY,
                        help=f"the cluster's folder (default: {DIRECTORY})")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """Run one action; a failure is one line and exit code 2."""
    args = build_parser().parse_args(argv)
    if args.action == "down":
        ended = down(args.dir)
        print(f"[boatray] local cluster in {args.dir}: {len(ended)} process(es) ended",
              flush=True)
        return 0
    cluster = up(args.config, args.dir) if args.action == "up" else LocalCluster.load(args.dir)
    if args.action == "kill-node":
        workers = [node["node_id"] for node in worker_nodes(cluster)]
        if not workers and not args.node_id:
            raise BoatrayError("the local cluster has no worker node to kill")
        node_id = args.node_id or workers[0]
        pids = kill_node(cluster, node_id)
        print(f"[boatray] killed node {node_id}: processes {pids}", flush=True)
    for line in describe(cluster):
        print(f"[boatray] {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
