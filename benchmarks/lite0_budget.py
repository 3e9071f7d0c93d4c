"""Will a CPU preset finish on the full lab16 in time? Per-image costs measured on real MarDCT
JPEGs, extrapolated to lab16's 3,869 train+valid and 1,324 test images.

    python benchmarks/lite0_budget.py --data /work/shared/data/mardct-sample \
        [--config ray_jobs/lab6-lite0.yaml] [--images 64]

It times, in this process on `torch` threads = the cores given (default 2), every per-image
step the preset's study runs: decoding, the backbone's forward pass (features, frozen-prefix
caches, test evaluation), one training step of each freeze spec (on cached activations where
the run would use a cache, else on images) and the BetterCNN baseline's step. Each is timed
as CPU seconds (fair on a shared, loaded machine) and wall seconds. The estimate is
CPU seconds / cores (perfect scaling) plus a fixed allowance for Ray and per-run start-ups;
ASHA's early stops are not counted (an upper bound). The plain-PyTorch line times timm's own
forward pass against boatray's trunk on the same batch (their ratio: boatray adds nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from boatray import config, freezing, models
from boatray.data.images import decode, normalize, to_chw
from boatray.data.manifest import prepare, read_manifest
from boatray.finetune import prefix_cache

LAB16_TRAIN_VALID, LAB16_TEST = 3869, 1324
STARTUP_S = 55.0
"""Seconds allowed per Ray start, Tune trial, evaluation, feature or cache actor pool and
baseline run (the slowest Ray Train worker-group start seen on this project's machines)."""


def timed(step: Callable[[], object], images: int, repeats: int = 2) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per image of `step`, best of `repeats` after one warm-up."""
    step()
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        best = min(best, ((time.process_time() - cpu) / images,
                          (time.perf_counter() - wall) / images))
    return best


def train_step(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable:
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], 1e-3)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(network(inputs), labels).backward()
        optimizer.step()

    return step


def measure(exp: config.Experiment, paths: list[str]) -> dict[str, tuple[float, float]]:
    """Per-image (CPU s, wall s) of every step the preset runs."""
    size, base_size, n = tuple(exp.data.image_size), tuple(exp.baseline.image_size), len(paths)
    batch = normalize(torch.stack([to_chw(decode(p, size)) for p in paths]))
    labels = torch.randint(0, 16, (n,))
    model = models.build(exp.model.name, exp.model.weights, 16, exp.model.pooling).eval()
    trunk = models.trunk(model, "pool")
    costs = {"decode": timed(lambda: [decode(p, size) for p in paths], n),
             "decode baseline": timed(lambda: [decode(p, base_size) for p in paths], n)}
    with torch.no_grad():
        costs["forward (features, eval)"] = timed(lambda: trunk(batch), n)
        costs["plain timm forward"] = timed(lambda: model.forward_head(
            model.forward_features(batch), pre_logits=True), n)
    for spec in dict.fromkeys(exp.sweep.freeze):
        freezing.freeze(model, freezing.GRADUAL[-1] if spec == "gradual" else spec)
        run = dataclasses.replace(exp, train=dataclasses.replace(exp.train, freeze=spec))
        cut = prefix_cache.cached_stage(run)[0]
        if cut is not None and prefix_cache.estimated_speedup(
                run, cut, 16) < exp.train.cache_min_speedup:
            cut = None
        network = model if cut is None else models.suffix(model, cut)
        with torch.no_grad():
            inputs = batch if cut is None else models.trunk(model, cut)(batch)
            if cut is not None:
                costs[f"prefix to {cut} (cache build)"] = timed(
                    lambda c=cut: models.trunk(model, c)(batch), n)
            costs[f"{spec}: valid forward"] = timed(
                lambda net=network, x=inputs: net.eval()(x), n)
        freezing.train_mode(model)
        costs[f"{spec}: train step" + ("" if cut is None else " (cached)")] = timed(
            train_step(network, inputs, labels), n)
        model.eval()
    cnn = models.build("bettercnn", "none", 16)
    small = normalize(torch.stack([to_chw(decode(p, base_size)) for p in paths]))
    costs["baseline: train step"] = timed(train_step(cnn, small, labels), n)
    return costs


def estimate(exp: config.Experiment, costs: dict[str, tuple[float, float]], cores: int
             ) -> list[tuple[str, float, float]]:
    """(stage, CPU seconds, start-ups) on the full lab16 split."""
    cpu = {k: v[0] for k, v in costs.items()}
    valid = round(LAB16_TRAIN_VALID * exp.data.valid_fraction)
    train, test = LAB16_TRAIN_VALID - valid, LAB16_TEST
    specs = list(dict.fromkeys(exp.sweep.freeze))
    runs = len(exp.sweep.lr) * len(exp.sweep.scheduler) * exp.sweep.repeats
    forward = cpu["decode"] + cpu["forward (features, eval)"]
    rows = [("features (train+valid+test)", (train + valid + test) * forward, 1)]
    for key in (k for k in cpu if k.startswith("prefix to")):
        rows.append((f"cache: {key}", (train + valid) * (cpu["decode"] + cpu[key]), 1))
    for spec in specs:
        step = next(k for k in cpu if k.startswith(f"{spec}: train step"))
        decode_cost = 0.0 if step.endswith("(cached)") else cpu["decode"]
        epoch = train * (cpu[step] + decode_cost) + valid * (cpu[f"{spec}: valid forward"]
                                                             + decode_cost)
        rows.append((f"trials {spec} ({runs} x {exp.train.epochs} epochs)",
                     runs * exp.train.epochs * epoch, runs))
    if exp.sweep.enabled:
        rows.append(("test evaluation of the selected fine-tunes",
                     len(specs) * (valid + test) * forward, len(specs)))
    base = cpu["decode baseline"]
    rows.append((f"baseline ({exp.baseline.epochs} epochs)", exp.baseline.epochs * train * (
        base + cpu["baseline: train step"]) + (valid + test) * base, 1))
    rows.append(("SVM + probe fits, report", 120.0 * cores, 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="raw MarDCT or an ImageFolder tree")
    parser.add_argument("--config", default="ray_jobs/lab6-lite0.yaml")
    parser.add_argument("--images", type=int, default=64, help="images per timed batch")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.cores)
    exp = config.load(args.config)
    with tempfile.TemporaryDirectory() as work:
        manifest = prepare(args.data, work, protocol=exp.data.protocol)
        frame, _ = read_manifest(manifest)
    train = frame[frame.split == "train"]
    paths = train.sample(min(args.images, len(train)), random_state=0).path.tolist()
    costs = measure(exp, paths)
    print(f"{args.config}: {exp.model.name} {exp.model.weights} at "
          f"{exp.data.image_size[0]}x{exp.data.image_size[1]}, torch threads {args.cores}, "
          f"{len(paths)} real JPEGs per batch")
    print(f"{'per image':44} {'CPU ms':>8} {'wall ms':>8}")
    for name, (cpu, wall) in costs.items():
        print(f"{name:44} {cpu * 1e3:8.1f} {wall * 1e3:8.1f}")
    plain, ours = costs["plain timm forward"][0], costs["forward (features, eval)"][0]
    print(f"boatray trunk vs plain timm forward (CPU): {plain / ours:.2f}x")
    rows = estimate(exp, costs, args.cores)
    print(f"\nfull lab16 ({LAB16_TRAIN_VALID:,} train+valid, {LAB16_TEST:,} test), "
          f"{args.cores} cores:")
    total = 0.0
    for name, cpu, startups in rows:
        seconds = cpu / args.cores + startups * STARTUP_S
        total += seconds
        print(f"{name:52} {cpu:8.0f} CPU s / {args.cores} + {startups:2d} x {STARTUP_S:.0f} s "
              f"= {seconds / 60:5.1f} min")
    total += STARTUP_S  # Ray itself
    print(f"{'total (+ Ray start)':52} {total / 60:5.1f} min "
          f"({'under' if total < 3600 else 'OVER'} 60 min)")


if __name__ == "__main__":
    main()
