"""Before anything starts: `use_gpu: auto` resolved, every resource request checked against
what the cluster has or its autoscaler can add, the weights reachable, and the plan of a run.

A request that can never be met stops the run in one line naming the `--set` that fixes it,
instead of Ray waiting for resources that cannot come.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd

from boatray import approaches, diskspace, estimate, models, precision, sizing
from boatray.cluster import Capacity, cluster_capacity, shown
from boatray.config import Experiment
from boatray.errors import BoatrayError
from boatray.finetune.prefix_cache import cached_stage
from boatray.finetune.trainer import worker_resources
from boatray.finetune.tuning import TRIAL_CPU


@dataclass
class Request:
    """One kind of process a stage starts: what it is, its config section, its resources."""

    what: str
    section: str
    key: str  # the setting to change where the request cannot be met
    resources: dict[str, float]

    @property
    def gpu(self) -> bool:
        return self.resources.get("GPU", 0.0) > 0


def check(exp: Experiment, weights: bool = True) -> tuple[Experiment, Capacity]:
    """The run's experiment with devices resolved and concurrency capped, once the cluster
    (Ray must be started) can meet every request and (with `weights`) the pretrained weights
    can be had; each decision printed in one line."""
    capacity = cluster_capacity()
    exp, devices = resolve_devices(exp, capacity)
    exp, capped = check_resources(exp, capacity)
    for line in [*devices, compute_line(exp), *capped]:
        print(f"[boatray] {line}", flush=True)
    if weights:
        models.fetch_weights(exp.model.name, exp.model.weights)
    return exp, capacity


def resolve_devices(exp: Experiment, capacity: Capacity) -> tuple[Experiment, list[str]]:
    """`exp` with each `use_gpu: auto` made true or false, and a line saying which and why."""
    has_gpu = capacity.largest("GPU") > 0
    if capacity.gpus_now():
        why = f"the cluster has {capacity.gpus_now()} GPU(s)"
    elif has_gpu:
        why = "the autoscaler can add GPU nodes"
    else:
        why = "no node has or can get a GPU"
    lines = []
    sections = {}
    for section in ("train", "features"):
        cfg = getattr(exp, section)
        if cfg.use_gpu == "auto":
            sections[section] = dataclasses.replace(cfg, use_gpu=has_gpu)
            lines.append(f"{section}.use_gpu=auto: {'GPUs' if has_gpu else 'CPUs'}, as {why}")
    return dataclasses.replace(exp, **sections), lines


def compute_line(exp: Experiment) -> str:
    """The device line: what training and extraction compute in (precision.py's `amp`)."""
    train = precision.describe(exp.train.amp, exp.train.use_gpu is True, exp.train.channels_last)
    features = precision.describe(exp.features.amp, exp.features.use_gpu is True,
                                  exp.features.channels_last)
    settings = f"train.amp={_yaml(exp.train.amp)}, features.amp={_yaml(exp.features.amp)}"
    if train == features:
        return f"compute: {train} ({settings})"
    return f"compute: training {train}; extraction {features} ({settings})"


def _yaml(value: bool | str) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _worker_share(exp: Experiment) -> dict[str, float]:
    """One worker's resources plus its share of its trial's own: a one-worker trial trains in
    the trial's process; a trial over 2+ workers also holds a sliver of a CPU for itself."""
    share = worker_resources(exp.train)
    if exp.train.num_workers >= 2 and not exp.sweep.trial_resource:
        share["CPU"] += TRIAL_CPU / exp.train.num_workers
    return share


def requests(exp: Experiment) -> list[Request]:
    """The process kinds the enabled stages start (extraction also builds prefix caches)."""
    feats = exp.features
    found = [Request("extraction actor", "features", "features.cpus_per_actor",
                     {"CPU": feats.cpus_per_actor, "GPU": 1.0 if feats.use_gpu else 0.0})]
    found.append(Request("training worker", "train", "train.cpus_per_worker",
                         worker_resources(exp.train)))
    if exp.sweep.enabled and exp.sweep.trial_resource and exp.train.num_workers >= 2:
        found.append(Request("sweep trial", "sweep", "sweep.trial_resource",
                             {exp.sweep.trial_resource: 1.0}))
    return found


def check_resources(exp: Experiment, capacity: Capacity) -> tuple[Experiment, list[str]]:
    """Refuse requests no node can ever meet (one line with the fix); cap the sweep's
    concurrency at what the cluster can hold at once. Returns `exp` and what was changed."""
    for request in requests(exp):
        _check_one(request, capacity)
    worker = worker_resources(exp.train)
    workers = capacity.slots(_worker_share(exp))
    if workers < exp.train.num_workers:
        raise BoatrayError(
            f"train.num_workers={exp.train.num_workers}: the cluster holds at most "
            f"{int(workers)} workers of {shown(worker)} at once: "
            f"--set train.num_workers={max(1, int(workers))}")
    if not exp.sweep.enabled:
        return exp, []
    if _head_trials_share_gpus(exp):  # the smallest trial: a share of a GPU
        worker = {**worker, "GPU": sizing.HEAD_TRIAL_GPU}
        workers = capacity.slots({**_worker_share(exp), "GPU": sizing.HEAD_TRIAL_GPU})
    at_once = workers // max(1, exp.train.num_workers)
    wanted = exp.sweep.max_concurrent_trials
    if at_once >= wanted:
        return exp, []
    held = int(at_once)
    sweep = dataclasses.replace(exp.sweep, max_concurrent_trials=held)
    return dataclasses.replace(exp, sweep=sweep), [
        f"sweep.max_concurrent_trials={wanted} -> {held}: the cluster holds {held} trial(s) of "
        f"{exp.train.num_workers} x {shown(worker)} at once"]


def _head_trials_share_gpus(exp: Experiment) -> bool:
    """Whether some sweep trials train the head alone on cached features in their own process
    on GPUs, asking for a share of one (tuning.trial_resources)."""
    return exp.train.use_gpu is True and exp.train.num_workers <= 1 and any(
        cached_stage(dataclasses.replace(exp, train=dataclasses.replace(
            exp.train, freeze=freeze)))[0] == "pool" for freeze in exp.sweep.freeze)


def _check_one(request: Request, capacity: Capacity) -> None:
    if request.gpu and capacity.largest("GPU") <= 0:
        raise BoatrayError(f"{request.section}.use_gpu=true but no node has or can get a GPU: "
                           f"--set {request.section}.use_gpu=auto")
    if capacity.fits(request.resources):
        return
    custom = [key for key in request.resources if key not in ("CPU", "GPU")]
    if custom:
        raise BoatrayError(f"{request.key}={custom[0]}: no node has or can get the resource "
                           f"{custom[0]!r}: --set {request.key}=null")
    shapes = [s for s in capacity.shapes() if not request.gpu or s.get("GPU", 0.0) >= 1]
    most = max((s.get("CPU", 0.0) for s in shapes), default=0.0)
    gpu = " with a GPU" if request.gpu else ""
    raise BoatrayError(
        f"{request.key}={request.resources['CPU']:g}: no node{gpu} has or can get that many "
        f"CPUs for one {request.what} (the largest offers {most:g}): "
        f"--set {request.key}={most:g}")


def describe_capacity(capacity: Capacity) -> str:
    """One line: the live nodes and what the autoscaler can add."""
    cpus = sum(n.get("CPU", 0.0) for n in capacity.nodes)
    gpus = capacity.gpus_now()
    added = ", ".join(f"{name} {shown(shape)} x {'any' if most < 0 else most}"
                      for name, shape, most in capacity.node_types) or "nothing"
    return (f"{len(capacity.nodes)} node(s) with {cpus:g} CPUs and {gpus} GPUs; "
            f"the autoscaler can add {added}")


def placement(exp: Experiment, images: int, capacity: Capacity) -> list[str]:
    """Where each kind of work of the run goes on this cluster (Ray must be started): the
    driver's own work, and each process the enabled approaches start, on the live nodes or
    node types that can hold it."""
    from boatray.cluster import only_this_node
    from boatray.features.pipeline import runs_here
    from boatray.finetune.tuning import in_trial_process, trial_resources

    def on(what: str, request: dict[str, float]) -> str:
        return f"where: {what} {shown(request)}: on {capacity.where(request)}"

    chosen = {approach.name: approach for approach in approaches.enabled(exp.to_dict())}
    worker = worker_resources(exp.train)
    lines = ["where: the driver (this node): the stages in turn, the classical heads' fits, "
             "the report"]
    trains = [name for name, approach in chosen.items() if approach.trains_network]
    if trains and in_trial_process(exp):
        lines.append(on(f"each {' and '.join(trains)} run trains in its own process of",
                        worker))
    elif trains:
        if any(approach.tuned for approach in chosen.values()):
            lines.append(on("each sweep trial's driver takes", trial_resources(exp)))
        lines.append(on(f"each run's {exp.train.num_workers} Ray Train workers (DDP) take each",
                        worker))
    if any(approach.uses_features for approach in chosen.values()):
        if runs_here(images, exp.features):
            lines.append(f"where: feature extraction: in the driver's process ({images} "
                         "images, one CPU actor's work)")
        else:
            lines.append(on("each feature-extraction actor takes",
                            {"CPU": exp.features.cpus_per_actor,
                             "GPU": 1.0 if exp.features.use_gpu else 0.0}))
    if trains and not exp.train.use_gpu and only_this_node():
        lines.append("where: the trained runs' test predictions: in the driver's process")
    elif trains:
        lines.append(on("the trained runs' test predictions take", worker))
    return lines


def plan(exp: Experiment, manifest: pd.DataFrame, capacity: Capacity) -> list[str]:
    """The dry run's plan: where the results land, the data, the cluster, then every enabled
    approach's stage (the features first where an approach uses them), the estimated wall time
    (a calibration of a few seconds on this node: estimate.py) and the compute estimate."""
    counts = manifest["split"].value_counts()
    images = len(manifest)
    lines = [f"results: {exp.results_dir if not exp.remote_storage else exp.storage_uri}",
             f"data: {exp.data.source or 'SYNTHETIC (generated)'}: "
             f"{manifest['label'].nunique()} classes, "
             + ", ".join(f"{split} {int(counts.get(split, 0))}" for split in
                         ("train", "valid", "test")) + " images",
             f"cluster: {describe_capacity(capacity)}"]
    flops = {}
    chosen = approaches.enabled(exp.to_dict())
    if any(approach.uses_features for approach in chosen):
        flops["features"] = images * models.backbone(exp.model.name).flops(
            exp.data.image_size, manifest["label"].nunique(), exp.model.pooling)
        actor = shown({"CPU": exp.features.cpus_per_actor,
                       "GPU": 1.0 if exp.features.use_gpu else 0.0})
        lines.append(f"stage features: {images} images through the {exp.model.name} trunk (up "
                     f"to {exp.features.stage}) by actor(s) of {actor}")
    for approach in chosen:
        step = approach.plan(exp, manifest)
        lines.append(step.line)
        if step.flops:
            flops[approach.stage] = step.flops
    lines.append(sizing.describe(exp.train, exp.features))
    lines.append("stage report: report.md and report.html")
    lines += placement(exp, images, capacity)
    lines.append(diskspace.plan_line(exp, manifest))
    lines += estimate.describe(*estimate.for_run(exp, manifest, capacity))
    lines.append("compute estimate: " + ", ".join(
        f"{name} {_flops(value)}" for name, value in flops.items())
        + f"; total {_flops(sum(flops.values()))} (training counted as 3x the forward pass: "
          "an upper bound, frozen and cached stages cost less)")
    return lines


def _flops(value: float) -> str:
    if value <= 0:
        return "0 FLOP"
    units = ["", "k", "M", "G", "T", "P", "E"]
    power = min(int(math.log10(value) // 3), len(units) - 1)
    return f"{value / 10 ** (3 * power):.3g} {units[power]}FLOP"
