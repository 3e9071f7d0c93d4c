"""A 2-worker training run on a local two-node Ray cluster; run by tests/test_cluster.py.

    python tests/two_node_training.py STORAGE_DIR DASHBOARD_PORT AGENT_PORT

Its own process, because `ray.cluster_utils.Cluster` needs a process in which Ray is not yet
initialised (the test session's `ray_local` may be), and because Ray writes the cluster's
address to RAY_TMPDIR/ray/ray_current_cluster, where any `ray.init()` on this machine would
find and join it: the test gives this process a private RAY_TMPDIR.

Each node offers one CPU and each training worker takes one, so the two workers can only run
one per node; the node ids of the workers' actors (State API) show where they ran. STORAGE_DIR
stands for the cluster's shared storage (experiment.storage_path); the two free ports keep the
head's dashboard and dashboard agent off Ray's defaults, which other Ray instances on this
machine may hold. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from boatray.config import from_dict
from boatray.data.manifest import ensure_manifest
from boatray.finetune import run as finetune_run


def experiment(storage: str):
    """A tiny fine-tuning run: resnet18 from scratch, generated images, 2 workers, 1 epoch."""
    return from_dict({
        # the shared storage a two-node cluster needs (absolute, as on a real cluster)
        "name": "two-node", "storage_path": storage,
        "data": {"source": None, "image_size": [32, 96], "valid_fraction": 0.25,
                 "synthetic": {"classes": 3, "train_per_class": 8, "test_per_class": 4,
                               "image_size": [32, 96], "imbalance": 1.0}},
        "model": {"name": "resnet18", "weights": "none"},
        "train": {"epochs": 1, "batch_size": 4, "freeze": "last1", "num_workers": 2,
                  "cpus_per_worker": 1, "loader_workers": 0, "max_failures": 0,
                  "cache_prefix": False},
    })


def main(storage: str, dashboard_port: int, agent_port: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": agent_port})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        exp = experiment(storage)
        run_dir = finetune_run.run(exp, ensure_manifest(exp), exp.layout.run("ddp"))
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        print(json.dumps({
            "nodes": {"head": cluster.head_node.node_id, "second": second.node_id},
            "worker_nodes": sorted(actor.node_id for actor in workers),
            "run_dir": str(run_dir),
        }), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
