"""The node provider of the local autoscaling cluster (ray_jobs/local-cluster.yaml).

Ray's fake multi-node provider starts each node as a raylet on this machine, all of them in
one session folder. A job's working directory (`ray job submit --working-dir .`) is then
unpacked into one folder shared by every node, and Ray unpacks it afresh (deleting it first)
on each node that starts work for the job: the driver's current directory and the files the
other nodes' workers are importing vanish under them. Real nodes are separate machines, each
with its own copy. And Ray's provider leaves every node tagged as still starting (no node
updater runs for it), so the autoscaler never terminates a node that stopped reporting: a lost
node keeps its place and its last resources, and the work that needs a node waits forever.

This provider, loaded by Ray's autoscaler as an external provider (`provider: {type:
external, module: boatray.localprovider.LocalNodeProvider}`), starts each node as Ray's does,
with a runtime-environment folder of its own, and tags it up to date once its raylet has
registered: a node silent for AUTOSCALER_HEARTBEAT_TIMEOUT_S is then terminated, and replaced
where work waits for it.
"""

from __future__ import annotations

import copy
import json

import ray
import ray._private.ray_constants as ray_constants
from ray._common.network_utils import build_address
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)


class LocalNodeProvider(FakeMultiNodeProvider):
    """Ray's FakeMultiNodeProvider; each node unpacks runtime environments in its own
    folder (`runtime_resources_<node number>` in the session folder) and is up to date once
    started."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            gcs = self._gcs_address or build_address(
                ray._private.services.get_node_ip_address(), 6379)
            params = ray._private.parameter.RayParams(
                min_worker_port=0, max_worker_port=0, dashboard_port=None,
                dashboard_agent_listen_port=0, num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources, labels=labels, redis_address=gcs, gcs_address=gcs,
                runtime_env_dir_name=f"runtime_resources_{int(node_id[-5:])}",
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                    "RAY_CLOUD_INSTANCE_ID": node_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                })
            node = ray._private.node.Node(params, head=False, shutdown_at_exit=False,
                                          spawn_reaper=False)
            # up to date whatever the launch tags say: the raylet has registered by now
            self._nodes[node_id] = {"tags": {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                TAG_RAY_NODE_NAME: node_id, **tags, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE},
                "node": node}
