"""The node types a cluster's autoscaler can add, recorded where every driver can read them.

Ray's autoscaler v2 records its node types in the GCS (the cluster config that Ray Data reads
too). The v1 autoscaler, the cluster launcher's default and the one that runs Ray's fake
multi-node provider with the installed wheel, records nothing a driver can read, so a run
would plan with the live nodes only: no GPU type, no room for a trial on a head that runs no
work. For such a cluster, `python -m boatray.nodetypes CONFIG` (cluster.yaml's head start
commands, `python -m boatray.localcluster up`) records the worker node types of an autoscaler
config in the GCS's key-value store, under boatray's own namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from boatray.errors import BoatrayError, cli

NAMESPACE = "boatray"
KEY = "node_types"


class NodeType(NamedTuple):
    """A kind of node the autoscaler can add: its name, resources and the most of it (-1:
    no limit)."""

    name: str
    resources: dict[str, float]
    max_workers: int


def from_config(raw: dict) -> list[NodeType]:
    """The worker node types of an autoscaler config (cluster.yaml's shape, resources filled
    in, as `ray up` leaves it on the head in ~/ray_bootstrap_config.yaml)."""
    head = raw.get("head_node_type")
    most = int(raw.get("max_workers", -1))
    found = []
    for name, spec in (raw.get("available_node_types") or {}).items():
        count = int(spec.get("max_workers", most))
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()
                     if k != "object_store_memory"}
        if name != head and count != 0 and resources:
            found.append(NodeType(str(name), resources,
                                  count if most < 0 else min(count, most)))
    return found


def publish(types: list[NodeType]) -> None:
    """Record `types` for the connected cluster (Ray must be initialised)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(KEY, json.dumps([t._asdict() for t in types]), namespace=NAMESPACE)


def published() -> list[NodeType]:
    """The node types of the connected cluster: the autoscaler's own record (v2), else what
    `publish` recorded, else none."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unusual GCS: fall back to boatray's record
        config = None
    if config is not None and config.node_group_configs:
        return [NodeType(group.name, dict(group.resources), group.max_count)
                for group in config.node_group_configs
                if group.max_count != 0 and group.resources]
    from ray.experimental.internal_kv import _internal_kv_get

    recorded = _internal_kv_get(KEY, namespace=NAMESPACE)
    return [NodeType(**t) for t in json.loads(recorded)] if recorded else []


@cli
def main(argv: list[str] | None = None) -> int:
    """Record the node types of an autoscaler config for the cluster at --address."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.nodetypes",
        description="Record the worker node types of an autoscaler config where boatray's "
                    "runs read them (for clusters whose autoscaler does not).")
    parser.add_argument("config", type=Path, help="the autoscaler config (e.g. "
                                                  "~/ray_bootstrap_config.yaml on the head)")
    parser.add_argument("--address", default="auto", help="the cluster (default: the one "
                                                          "running on this node)")
    args = parser.parse_args(argv)
    try:
        raw = yaml.safe_load(args.config.expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BoatrayError(f"cannot read autoscaler config {args.config}: {exc}") from None
    import ray

    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    types = from_config(raw)
    publish(types)
    print("[boatray] node types the autoscaler can add: "
          + (", ".join(f"{t.name} {t.resources} x {t.max_workers}" for t in types) or "none"),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
