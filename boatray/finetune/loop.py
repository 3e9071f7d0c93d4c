"""The training loop's `main`: one run on every rank, whoever it reports to.

`train_loop(config, session)` wires data, model, optimiser and scheduler, and hands each
epoch's metrics and checkpoint to its session (sessions.py): this process (no Ray), a Ray Tune
trial's own process (one worker) or one rank of a Ray Train worker group (DDP).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from boatray import freezing, models, precision, weightstore
from boatray.config import Experiment, from_dict
from boatray.data.decoded import DecodedImages
from boatray.data.manifest import read_manifest
from boatray.finetune import sessions
from boatray.finetune.checkpoints import Cadence, restore_checkpoint, save_checkpoint
from boatray.finetune.engine import (
    PinnedPrefetch,
    ShardSampler,
    auto_batch_size,
    broadcast_buffers,
    class_weights,
    device_for,
    evaluate,
    freeze_spec_at,
    input_example,
    make_loader,
    make_scheduler,
    max_over_ranks,
    optimizer_over_all_stages,
    run_datasets,
    seed_everything,
    step_scheduler,
    train_one_epoch,
)
from boatray.sizing import fixed_train_batch


def loop_config(exp: Experiment, manifest: str | Path, cache: str | None,
                stops: Sequence[int] = ()) -> dict:
    """What the training loop is handed: the experiment (as a dict), the manifest's absolute
    path, the location of the run's frozen-prefix cache (None: train on images) and the epochs
    after which a scheduler may stop the run (each ends with a checkpoint: `Cadence`)."""
    return {"experiment": exp.to_dict(), "manifest": str(Path(manifest).resolve()),
            "prefix_cache": cache, "stops": [int(epoch) for epoch in stops]}


def train_loop(config: dict, session: sessions.Session) -> None:
    """One fine-tuning run, on every rank: `config` is `loop_config`'s; `session` says where
    the run is (this process, a Tune trial, a Train worker) and takes its reports: after every
    epoch its metrics, with a checkpoint where `Cadence` says (every rank reports; rank 0's
    checkpoint is kept).
    """
    exp = from_dict(config["experiment"])
    cfg = exp.train
    rank, world, device = session.rank, session.world, session.device
    seed_everything(cfg.seed)
    frame, classes = read_manifest(config["manifest"])
    # Built right after seeding: every rank, and prefix_cache.prefix_model, draw the same init.
    module = models.build(exp.model.name, exp.model.weights, len(classes), exp.model.pooling)
    on_gpu = device.type == "cuda"
    # bf16 autocast where the device runs it natively (precision.py); channels_last with it,
    # and on GPUs (an fp32 CPU trains contiguous tensors, as it always did)
    amp = precision.uses_bf16(cfg.amp, device)
    channels_last = cfg.channels_last and (on_gpu or amp)
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed image size: pick the fastest kernels

    train_set, valid_set, cut = run_datasets(exp, frame, config.get("prefix_cache"))
    module = module.to(device, memory_format=torch.channels_last if channels_last
                       else torch.preserve_format)
    network = module if cut is None else models.suffix(module, cut)  # what runs on the data
    batch_size = fixed_train_batch(cfg)
    if cfg.batch_size == "auto" and on_gpu:
        batch_size = auto_batch_size(network, module, freeze_spec_at(cfg, cfg.epochs - 1),
                                     input_example(train_set, exp.data.image_size), device,
                                     amp=amp, channels_last=channels_last)
    weights = class_weights(train_set.labels, len(classes))
    train_sampler = ShardSampler(
        len(train_set), rank, world, seed=cfg.seed,
        weights=weights[train_set.labels].tolist() if cfg.balanced_sampler else None)
    valid_sampler = ShardSampler(len(valid_set), rank, world, shuffle=False, pad=False)
    # a cache is read a memory-mapped batch at a time: on a CPU, loader processes would only
    # add their start-up (seconds each) and take cores from the training step; decoded images
    # are read faster than loader processes could hand them over (on a GPU, a thread reads
    # them ahead into pinned memory)
    decoded = isinstance(train_set, DecodedImages)
    workers = 0 if decoded or (cut is not None and not on_gpu) else cfg.loader_workers
    loader_args = {"num_workers": workers, "persistent_workers": workers > 0,
                   "pin_memory": on_gpu and workers > 0}
    train_loader, valid_loader = (session.prepare_loader(
        make_loader(dataset, sampler, batch_size, **loader_args))
        for dataset, sampler in ((train_set, train_sampler), (valid_set, valid_sampler)))
    if on_gpu and workers == 0:
        train_loader, valid_loader = PinnedPrefetch(train_loader), PinnedPrefetch(valid_loader)
    optimizer = optimizer_over_all_stages(module, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if cfg.class_weighted_loss
                                    else None)
    start, history = 0, []
    with session.resume_from() as directory:
        if directory is not None:
            start, history = restore_checkpoint(directory, module, optimizer, scheduler)
    meta = {"classes": classes, "image_size": list(exp.data.image_size),
            "model": {"name": exp.model.name, "pooling": exp.model.pooling,
                      "weights": exp.model.weights},
            "freeze": cfg.freeze, "seed": cfg.seed, "prefix_cache": config.get("prefix_cache")}
    store = weightstore.location(exp.storage_uri)  # what did not train is stored there once

    phase, model = None, module
    cadence = Cadence(cfg.epochs, config.get("stops", ()), cfg.checkpoint_every_s)
    for epoch in range(start, cfg.epochs):
        spec = freeze_spec_at(cfg, epoch)
        # First epoch or a gradual phase change: refreeze, and wrap in a new DDP. A DDP wrapper
        # registers its gradient hooks for the trainable parameters when it is built, so the
        # trainable set cannot change inside it (Lightning #20340). The optimizer holds every
        # stage from the start: frozen parameters get no gradient and are skipped, and its
        # state dict has the same layout in every phase, so a checkpoint restores into any.
        if spec != phase:
            phase = spec
            freezing.freeze(module, phase)
            model = session.wrap(network)
            model = torch.compile(model) if cfg.compile else model
        train_sampler.set_epoch(epoch)
        lr = max(group["lr"] for group in optimizer.param_groups)
        began = time.perf_counter()
        trained = train_one_epoch(model, train_loader, criterion, optimizer, device, amp=amp,
                                  channels_last=channels_last)
        broadcast_buffers(module)
        valid = evaluate(network, valid_loader, criterion, device, amp=amp,
                         channels_last=channels_last)
        step_scheduler(scheduler, valid["loss"])
        metrics = {"epoch": epoch + 1, "train_loss": trained["loss"],
                   "train_accuracy": trained["accuracy"], "valid_loss": valid["loss"],
                   "valid_accuracy": valid["accuracy"], "valid_macro_f1": valid["macro_f1"],
                   "lr": lr, "images_per_second": trained["images_per_second"],
                   "batch_size": batch_size,
                   "epoch_seconds": max_over_ranks(time.perf_counter() - began, device),
                   "trainable_parameters": sum(p.numel() for p in module.parameters()
                                               if p.requires_grad), **session.placement(module)}
        history.append(metrics)
        session.report(metrics, (lambda directory, done=epoch + 1: save_checkpoint(
            directory, module, optimizer, scheduler, done, history, meta, store))
            if cadence.due(epoch + 1) else None)
    if history and start >= cfg.epochs:
        # restored after its last epoch (e.g. the driver was killed right then): report the
        # final metrics again, so that a Tune trial gets its metric; frozen as it trained, so
        # that what did not train goes to the weight store
        freezing.freeze(module, freeze_spec_at(cfg, start - 1))
        session.report(history[-1], lambda directory: save_checkpoint(
            directory, module, optimizer, scheduler, start, history, meta, store))


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (runs with 2+ workers): the loop on one DDP rank."""
    train_loop(config, sessions.WorkerSession(config["experiment"]["storage_path"]))


def train_in_trial(config: dict, earlier: str | None = None) -> None:
    """The loop inside a Ray Tune trial's own process (1 worker): `config` is `loop_config`'s;
    `earlier`: the checkpoint of an earlier trial of the same configuration (a rebuilt sweep)
    to resume from when Tune holds none for this trial."""
    use_gpu = from_dict(config["experiment"]).train.use_gpu
    train_loop(config, sessions.TrialSession(device_for(use_gpu),
                                             config["experiment"]["storage_path"], earlier))
