"""The one way boatray starts or joins Ray, and the ports it picks.

`start_ray` joins the address given explicitly or through RAY_ADDRESS, or else starts a
private local instance: a bare `ray.init()` never joins whatever instance happens to run on
the machine.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlunsplit

import ray

from boatray.errors import BoatrayError
from boatray.nodetypes import NodeType, published

LOCAL = "local"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports nobody listens on right now (held open together, so they
    differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def ray_address(address: str | None = None) -> str:
    """The address to use: `address`, else RAY_ADDRESS, else `local` (a new private instance)."""
    return address or os.environ.get("RAY_ADDRESS") or LOCAL


def works_here() -> bool:
    """Whether this process's node takes work: Ray is not running, or the node offers Ray
    CPUs (a head started with none, as on the local autoscaling cluster, runs drivers only)."""
    if not ray.is_initialized():
        return True
    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] == here and n["Resources"].get("CPU", 0.0) > 0
               for n in ray.nodes() if n["Alive"])


def only_this_node() -> bool:
    """Whether Ray runs nowhere but on this process's node (or is not running), and that node
    takes work: work for one CPU slot can then run in this process instead of a Ray worker
    that must start first."""
    if not ray.is_initialized():
        return True
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return len(nodes) == 1 and works_here()


def start_ray(address: str | None = None, **kwargs) -> None:
    """Join the Ray cluster at `address` (default: RAY_ADDRESS) or start a private local one.

    A local instance gets a free dashboard port, exported as RAY_API_SERVER_ADDRESS before Ray
    starts so that every process it spawns (Train's placement-group cleaner queries the State
    API without an address) finds this instance and not another one on the same host. Tune's
    legacy output engine is chosen (RAY_AIR_NEW_OUTPUT=0, unless set): at verbose=0 it prints
    nothing, where the new one prints its config table and a TensorBoard hint.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    address = ray_address(address)
    try:
        if address != LOCAL:
            ray.init(address=address, **kwargs)
            return
        (port,) = free_ports()
        os.environ["RAY_API_SERVER_ADDRESS"] = urlunsplit(("http", f"127.0.0.1:{port}", "", "", ""))
        ray.init(address=LOCAL, include_dashboard=True, dashboard_port=port, **kwargs)
    except Exception as exc:  # noqa: BLE001 - e.g. a node start-up timeout is a bare Exception
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(f"Ray could not start or join {address!r}: {first}") from None


@dataclass
class Capacity:
    """What the cluster offers: its live nodes, and the node types its autoscaler can add."""

    nodes: list[dict[str, float]]
    node_types: list[NodeType] = field(default_factory=list)

    def shapes(self) -> list[dict[str, float]]:
        """Every node shape a request could be placed on, now or after scaling up."""
        return self.nodes + [kind.resources for kind in self.node_types]

    def fits(self, request: dict[str, float]) -> bool:
        """Whether one node (live or addable) can hold `request`."""
        return any(_holds(shape, request) for shape in self.shapes())

    def largest(self, resource: str) -> float:
        """The most of `resource` on one node, live or addable."""
        return max((shape.get(resource, 0.0) for shape in self.shapes()), default=0.0)

    def slots(self, request: dict[str, float]) -> float:
        """How many copies of `request` the cluster can hold at once (inf: the autoscaler has
        no limit)."""
        count = float(sum(_copies(shape, request) for shape in self.nodes))
        for _, shape, most in self.node_types:
            count += math.inf if most < 0 and _copies(shape, request) else \
                _copies(shape, request) * max(most, 0)
        return count

    def where(self, request: dict[str, float]) -> str:
        """Where Ray can place `request`, said for a person: live nodes that hold it, node
        types the autoscaler adds for it, or nowhere."""
        live = sum(1 for shape in self.nodes if _holds(shape, request))
        places = [f"{live} live node(s)"] if live else []
        places += [f"{kind.name} nodes the autoscaler adds (up to "
                   f"{'any' if kind.max_workers < 0 else kind.max_workers})"
                   for kind in self.node_types if _holds(kind.resources, request)]
        return " or ".join(places) or "no node"

    def gpus_now(self) -> int:
        """GPUs on the live nodes."""
        return int(sum(shape.get("GPU", 0.0) for shape in self.nodes))


def shown(resources: dict[str, float]) -> str:
    """A resource request as people read it: `{CPU: 2, GPU: 1}` (zero amounts left out)."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if v) + "}"


def _holds(shape: dict[str, float], request: dict[str, float]) -> bool:
    return all(shape.get(key, 0.0) >= amount for key, amount in request.items() if amount)


def _copies(shape: dict[str, float], request: dict[str, float]) -> int:
    wanted = {key: amount for key, amount in request.items() if amount}
    return int(min((shape.get(key, 0.0) // amount for key, amount in wanted.items()),
                   default=0))


def cluster_capacity() -> Capacity:
    """The connected cluster's live nodes and the node types its autoscaler can still add
    (as recorded in the GCS: boatray.nodetypes)."""
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return Capacity(nodes, published())
