"""One fine-tuning epoch: boatray's training loop, with no cache, the decoded-image cache and the
frozen-prefix cache, against the lab's eager fp32 loop, for the freeze specs `head` and `last1`.

    python benchmarks/finetune_epoch.py [--images 32] [--valid 8] [--freeze head last1]

One run, one machine, the same real JPEGs (MarDCT sample, repeated as needed) and the same
starting weights (a random-init state dict saved to a file):

- lab: torchvision ResNet with every parameter frozen but the trainable stages, a Dataset
  with the lab's transform, DataLoader batch 8 (shuffled), Adam, fp32, eager, `model.train()`,
  then a validation pass, as the lab's per-epoch loop did;
- boatray: `trainer.fit` (the training loop, as a sweep's trial runs it) three ways: decoding
  every JPEG in every epoch (`off`: `train.cache_decoded` and `train.cache_prefix` false), from
  the node's decoded-image cache (`decoded`), and from the frozen-prefix cache (`prefix`); each
  in fp32 and under bf16 autocast with channels_last (`train.amp` and `features.amp` false and
  true; the bf16 rows where `amp: auto` would use bf16: a GPU, a CPU with AMX or
  AVX512-BF16; `--amp` to choose). Each
  run then times one pass over its training loader alone, as the loop builds it: the epoch's
  data time (`data s`; not for `prefix`, whose loader reads activations). By default with
  `train.num_workers=0` (the loop in this process), so the row is the epoch and not a Ray
  worker's start-up; `--workers 1` trains in a Tune trial's process instead.

Columns: training-loop images/s (the epoch's training pass; for boatray its own
`images_per_second` metric) and its ratio to the lab loop; the epoch with validation; the whole
run (model build, cache build where the cache is on, the epoch(s), the checkpoint) and its
ratio to the lab's whole run; the cache's build time (from its cache.json; part of the whole
run); peak memory. With the cache, the prefix's activations are
computed once per run and the epochs then train only the suffix, so `--epochs` > 1 shows how
the one-off cost is spread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from boatray import models, precision
from boatray.config import FREEZE_SPECS, from_dict
from boatray.data.decoded import DecodedImages
from boatray.data.manifest import read_manifest
from boatray.finetune import engine, prefix_cache, trainer
from boatray.results import Layout
from common import (
    SAMPLE,
    image_tree,
    isolated,
    lab_loader,
    lab_optimizer,
    lab_predict,
    lab_resnet,
    lab_train_epoch,
    parse_size,
    pick_device,
    print_footer,
    print_header,
    print_table,
    quiet_ray_data,
    ratio,
    start_ray,
)

TARGETS = {"head": 20.0, "last1": 2.0}
"""An epoch with the frozen-prefix cache at least 20x (head) and 2x (last1) the lab's."""
AMP = {"false": "fp32", "true": "bf16"}
CACHES = {"off": (False, False), "decoded": (False, True), "prefix": (True, True)}
"""The cache modes: (train.cache_prefix, train.cache_decoded)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="training images (32)")
    parser.add_argument("--valid", type=int, default=8, help="validation images (8)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (1)")
    parser.add_argument("--freeze", nargs="+", default=["head", "last1"],
                        choices=FREEZE_SPECS, help="freeze specs (head last1)")
    parser.add_argument("--size", type=parse_size, default=(240, 800), help="HxW (240x800)")
    parser.add_argument("--model", default="resnet50", help="backbone (resnet50)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="boatray's batch size (train.batch_size; the lab keeps 8)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="boatray's train.loader_workers (default: the config's)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray Train workers (0: local mode in process, the default)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", nargs="+", choices=("false", "true"), default=None,
                        help="train.amp of boatray's rows (default: false, and true where "
                             "amp: auto computes in bf16 on this device)")
    parser.add_argument("--sample", type=Path, default=SAMPLE,
                        help="the real MarDCT sample (raw layout)")
    return parser


def lab_run(weights_file: Path, arch: str, manifest: Path, freeze: str, epochs: int,
            size: tuple[int, int], lr: float, device_type: str) -> dict:
    """The lab's fine-tuning: model build, then per epoch a training and a validation pass."""
    device = torch.device(device_type)
    started = time.perf_counter()
    frame, classes = read_manifest(manifest)
    model = lab_resnet(arch, len(classes), freeze)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    model.to(device)
    optimizer = lab_optimizer(model, lr)
    train_rows, valid_rows = frame[frame.split == "train"], frame[frame.split == "valid"]
    train_loader = lab_loader(train_rows.path, train_rows.label_idx, size, shuffle=True)
    valid_loader = lab_loader(valid_rows.path, valid_rows.label_idx, size, shuffle=False)
    for _ in range(epochs):
        epoch_started = time.perf_counter()
        images, seconds = lab_train_epoch(model, train_loader, optimizer, device)
        lab_predict(model, valid_loader, device)
        epoch = time.perf_counter() - epoch_started
    return {"train images/s": images / seconds, "epoch s": epoch,
            "run s": time.perf_counter() - started}


def boatray_run(manifest: Path, settings: dict, use_ray: bool) -> dict:
    """`trainer.fit` of one run with `settings` (an experiment dict): its last epoch's metrics,
    the run's wall time and, where it built a frozen-prefix cache, the cache's build time."""
    import ray

    ray_start = None
    if use_ray:
        quiet_ray_data()
        ray_start = start_ray(address="local", log_to_driver=False,
                              include_dashboard=settings["train"]["num_workers"] > 0)
    exp = from_dict(settings)
    try:
        started = time.perf_counter()
        result = trainer.fit(exp, manifest, exp.results_dir / "run")
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    metrics = result.metrics
    built = [json.loads(info.read_text())["seconds"]
             for info in Path(exp.storage_uri).glob(f"{Layout.CACHE}/*/"
                                                    f"{prefix_cache.INFO_FILE}")]
    return {"train images/s": metrics["images_per_second"], "epoch s": metrics["epoch_seconds"],
            "data s": None if exp.train.cache_prefix else data_seconds(exp, manifest),
            "run s": seconds, "cache build s": sum(built) if built else None,
            "ray start s": ray_start}


def data_seconds(exp, manifest: Path) -> float:
    """One pass over a run's training loader alone (decoding, or reading the decoded cache the
    run built), with the loader processes the loop gives it."""
    frame, _ = read_manifest(manifest)
    train_set, _, _ = engine.run_datasets(exp, frame, None)
    workers = 0 if isinstance(train_set, DecodedImages) else exp.train.loader_workers
    loader = engine.make_loader(train_set, engine.ShardSampler(len(train_set)),
                                exp.train.batch_size, num_workers=workers)
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def main() -> None:
    args = build_parser().parse_args()
    device = pick_device(args.device)
    print_header(f"one fine-tuning epoch, {args.model} at {args.size[0]}x{args.size[1]}, "
                 f"{args.images} train + {args.valid} valid real JPEGs, device {device}")
    work = Path(tempfile.mkdtemp(prefix="boatray-bench-finetune-"))
    manifest = image_tree(work / "images", {"train": args.images, "valid": args.valid},
                          args.sample)
    _, classes = read_manifest(manifest)
    torch.manual_seed(0)
    weights_file = work / "weights.pt"
    torch.save(models.build(args.model, "none", len(classes)).state_dict(), weights_file)

    amps = args.amp or (["false", "true"] if precision.uses_bf16("auto", device) else ["false"])
    rows = []
    for freeze in args.freeze:
        lab, memory = isolated(lab_run, weights_file, args.model, manifest, freeze, args.epochs,
                               args.size, args.lr, device.type, device=device)
        rows.append({"path": "lab loop (batch 8, fp32, eager)", "freeze": freeze, "cache": "-",
                     "amp": "fp32", **lab, "train vs lab": 1.0, "run vs lab": 1.0, **memory})
        for cache, (prefix, decoded) in CACHES.items():
            for amp in amps:
                settings = experiment(args, weights_file, freeze, prefix, decoded, amp,
                                      device, work / "storage")
                run, memory = isolated(boatray_run, manifest, settings,
                                       prefix or args.workers > 0, device=device)
                rows.append({"path": f"boatray trainer.fit ({args.workers} workers)",
                             "freeze": freeze, "cache": cache, "amp": AMP[amp], **run,
                             "train vs lab": ratio(run["train images/s"],
                                                   lab["train images/s"]),
                             "run vs lab": ratio(lab["run s"], run["run s"]), **memory})
    print_table(rows)
    for freeze in args.freeze:
        data = {row["cache"]: row["data s"] for row in rows
                if row["freeze"] == freeze and row["cache"] in ("off", "decoded")
                and row["amp"] == AMP[amps[0]]}
        print(f"data    : {freeze}: one epoch's data time {data['off']:.2f} s decoding every "
              f"JPEG, {data['decoded']:.3f} s from the decoded-image cache: decoded cache "
              f"speedup {ratio(data['off'], data['decoded']):.1f}")
    for freeze in args.freeze:
        rates = {(row["cache"], row["amp"]): row["train images/s"] for row in rows
                 if row["freeze"] == freeze and row["cache"] != "-"}
        for cache in CACHES:
            if (cache, "bf16") in rates and (cache, "fp32") in rates:
                print(f"bf16    : {freeze}, cache {cache}: bf16 trains "
                      f"{ratio(rates[cache, 'bf16'], rates[cache, 'fp32']):.2f}x the fp32 rate")
    for row in rows:
        if row["cache"] == "prefix" and row["freeze"] in TARGETS:
            target = TARGETS[row["freeze"]]
            print(f"target  : {row['freeze']} epoch with the cache >= {target:.0f}x the lab's "
                  f"training loop: {row['train vs lab']:.1f}x "
                  f"({'met' if row['train vs lab'] >= target else 'NOT met'}); whole run "
                  f"{row['run vs lab']:.2f}x")
    print_footer()


def experiment(args: argparse.Namespace, weights_file: Path, freeze: str, prefix: bool,
               decoded: bool, amp: str, device: torch.device, storage: Path) -> dict:
    """The experiment dict of one boatray run (config defaults for everything not set here);
    each run has its own results folder under `storage`, so no run reuses another's cache."""
    settings = {"name": f"{freeze}-prefix-{prefix}-decoded-{decoded}-amp-{amp}",
                # a scratch folder per measured run: the benchmark leaves nothing behind
                "storage_path": str(storage),
                "features": {"use_gpu": device.type == "cuda", "amp": amp == "true"},
                "model": {"name": args.model, "weights": str(weights_file)},
                "data": {"image_size": list(args.size), "augment": False},
                "train": {"epochs": args.epochs, "batch_size": args.batch_size,
                          "freeze": freeze, "lr": args.lr, "cache_prefix": prefix,
                          "cache_decoded": decoded, "amp": amp == "true",
                          "num_workers": args.workers, "use_gpu": device.type == "cuda",
                          "max_failures": 0}}
    if args.loader_workers is not None:
        settings["train"]["loader_workers"] = args.loader_workers
    return settings


if __name__ == "__main__":
    main()
