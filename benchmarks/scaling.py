"""Scaling over a local two-node Ray cluster: feature extraction and a training epoch with one
and with two workers, and the scaling efficiency throughput(2) / (2 x throughput(1)).

    python benchmarks/scaling.py [--images 64] [--train-images 32] [--model resnet18]

The cluster is `ray.cluster_utils.Cluster`: a head node and a second node of one logical CPU
each, in this process's own RAY_TMPDIR and on free ports, so that it neither joins nor
disturbs other Ray instances on the machine (AutoscalingCluster is avoided: it runs
`ray stop --force`). Both nodes share this machine's cores, so on a 2-core machine the two
workers compete with each other, with the Ray processes and with anything else running: the
efficiency printed is what this machine gives, not what two real nodes would.

- extraction: `pipeline.extract` over real JPEGs with `features.num_actors` 1 and 2, one
  torch thread and one CPU each (on CPUs the pipeline decodes inside its actors), so two
  actors take one node each. Throughput is the pipeline's own images/s (features.json: actor
  start included);
- training: `trainer.fit` for `--epochs` epochs with `train.num_workers` 1 and 2 (one CPU each:
  one worker per node; DDP over gloo), every stage trained; throughput is the last epoch's
  training images/s over all workers (the first epoch includes warm-up).

Each row names the nodes its actors or workers ran on (from Ray's State API).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from boatray import models
from boatray.cluster import free_ports
from boatray.config import FeaturesConfig, ModelConfig, from_dict
from boatray.data.manifest import read_manifest
from boatray.features import featurefile, pipeline
from boatray.finetune import trainer
from common import (
    SAMPLE,
    PeakMemory,
    image_tree,
    parse_size,
    print_footer,
    print_header,
    print_table,
    quiet_ray_data,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images to extract (64)")
    parser.add_argument("--train-images", type=int, default=32, help="training images (32)")
    parser.add_argument("--valid", type=int, default=8, help="validation images (8)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per run (2)")
    parser.add_argument("--size", type=parse_size, default=(240, 800), help="HxW (240x800)")
    parser.add_argument("--model", default="resnet18", help="backbone (resnet18)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch size (per actor; per training worker) (8)")
    parser.add_argument("--sample", type=Path, default=SAMPLE,
                        help="the real MarDCT sample (raw layout)")
    parser.add_argument("--skip-training", action="store_true", help="extraction rows only")
    return parser


def start_cluster():
    """The two-node local cluster (private RAY_TMPDIR, free ports) and its node names."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bb-", dir="/tmp")  # short: Unix sockets
    os.environ.pop("RAY_ADDRESS", None)
    dashboard, head_agent, second_agent = free_ports(3)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "dashboard_port": dashboard, "dashboard_agent_listen_port": head_agent})
    second = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=second_agent)
    cluster.wait_for_nodes()
    return cluster, {cluster.head_node.node_id: "head", second.node_id: "second"}


def actor_nodes(address: str, class_prefix: str) -> dict[str, str]:
    """actor id -> node id of every actor (alive or dead) of the cluster at `address` whose
    class name starts with `class_prefix`."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, detail=True, limit=10_000,
                         raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if a.class_name.startswith(class_prefix)}


def placed(before: dict[str, str], after: dict[str, str], names: dict[str, str]) -> str:
    """The nodes of the actors that appeared between two `actor_nodes` snapshots."""
    new = sorted(names.get(node, node[:8]) for actor, node in after.items()
                 if actor not in before)
    return "+".join(new) or "?"


def extraction_rows(args, manifest: Path, weights_file: Path, work: Path, address: str,
                    names: dict[str, str]) -> list[dict]:
    """pipeline.extract with 1 and 2 actors."""
    model = ModelConfig(name=args.model, weights=str(weights_file))
    rows = []
    for actors in (1, 2):
        cfg = FeaturesConfig(batch_size=args.batch_size, num_actors=actors, cpus_per_actor=1.0,
                             threads_per_actor=1)
        before = actor_nodes(address, "MapWorker")
        out = work / f"features-{actors}.parquet"
        with PeakMemory() as memory:
            started = time.perf_counter()
            pipeline.extract(manifest, out, model, cfg, args.size)
            wall = time.perf_counter() - started
        stats = featurefile.feature_info(out)["extraction"]
        rows.append({"work": "extraction", "workers": actors,
                     "nodes": placed(before, actor_nodes(address, "MapWorker"), names),
                     "images": stats["images"], "wall s": wall,
                     "images/s": stats["images_per_second"], **memory.columns()})
    return rows


def training_rows(args, manifest: Path, weights_file: Path, work: Path, address: str,
                  names: dict[str, str]) -> list[dict]:
    """trainer.fit with 1 and 2 workers, every stage trained."""
    rows = []
    for workers in (1, 2):
        exp = from_dict({
            "model": {"name": args.model, "weights": str(weights_file)},
            "data": {"image_size": list(args.size), "augment": False},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "freeze": "all",
                      "num_workers": workers, "cpus_per_worker": 1, "loader_workers": 0,
                      "max_failures": 0}})
        before = actor_nodes(address, "RayTrainWorker")
        with PeakMemory() as memory:
            started = time.perf_counter()
            result = trainer.fit(exp, manifest, work / f"train-{workers}")
            wall = time.perf_counter() - started
        metrics = result.metrics
        rows.append({"work": f"training ({args.epochs} epochs)", "workers": workers,
                     "nodes": placed(before, actor_nodes(address, "RayTrainWorker"), names),
                     "images": args.train_images, "wall s": wall,
                     "images/s": metrics["images_per_second"], **memory.columns()})
    return rows


def main() -> None:
    args = build_parser().parse_args()
    print_header(f"scaling on a local two-node Ray cluster (1 CPU per node), {args.model} at "
                 f"{args.size[0]}x{args.size[1]}")
    import ray

    work = Path(tempfile.mkdtemp(prefix="boatray-bench-scaling-"))
    extract_manifest = image_tree(work / "extract-images", {"train": args.images}, args.sample)
    train_manifest = image_tree(work / "train-images",
                                {"train": args.train_images, "valid": args.valid}, args.sample)
    _, classes = read_manifest(train_manifest)
    torch.manual_seed(0)
    weights_file = work / "weights.pt"
    torch.save(models.build(args.model, "none", len(classes)).state_dict(), weights_file)

    started = time.perf_counter()
    cluster, names = start_cluster()
    print(f"cluster : 2 nodes up in {time.perf_counter() - started:.1f} s "
          f"(RAY_TMPDIR {os.environ['RAY_TMPDIR']})", flush=True)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        quiet_ray_data()
        rows = extraction_rows(args, extract_manifest, weights_file, work, cluster.address,
                               names)
        if not args.skip_training:
            rows += training_rows(args, train_manifest, weights_file, work, cluster.address,
                                  names)
    finally:
        ray.shutdown()
        cluster.shutdown()
    for one, two in zip(rows[::2], rows[1::2]):
        two["efficiency"] = two["images/s"] / (2 * one["images/s"])
    print_table(rows)
    print_footer()


if __name__ == "__main__":
    main()
