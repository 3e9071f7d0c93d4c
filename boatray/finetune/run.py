"""A training run made a result: train (trainer.fit), then predict valid and test with the
final checkpoint and write the run folder (results.write_run) and its exported model.

The final checkpoint, not the best epoch by a validation metric: it is what the lab evaluated
after its fixed number of epochs and what the sweep ranks configurations by, so a run's test
numbers belong to the model its selection saw. `history` shows where validation peaked.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import SequentialSampler

from boatray import export, models, precision, predict, storage
from boatray.cluster import only_this_node
from boatray.config import Experiment, TrainConfig
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError
from boatray.finetune import prefix_cache
from boatray.finetune.checkpoints import load_model, read_meta
from boatray.finetune.engine import device_for, make_loader, predict_logits
from boatray.finetune.trainer import fit
from boatray.results import RunRecord, predictions_frame, write_run
from boatray.sizing import fixed_train_batch


def run(exp: Experiment, manifest: str | Path, run_dir: str | Path, record: dict) -> Path:
    """Train, predict valid and test with the final checkpoint, write the run folder; return it.
    `record`: the run record's `approach` and what else it adds (e.g. a `config_id` that
    groups repeats)."""
    began = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    result = fit(exp, manifest, run_dir)
    if result.checkpoint is None:
        raise BoatrayError(f"training run {run_dir} saved no checkpoint")
    return evaluate_and_write(exp, manifest, result.checkpoint, run_dir, record, began)


def evaluate_and_write(exp: Experiment, manifest: str | Path, checkpoint, run_dir: str | Path,
                       record: dict, began: float) -> Path:
    """Predict valid and test with a ray.train.Checkpoint; write the run folder; return it.

    Prediction runs as a Ray task with one training worker's resources (a GPU when training
    used GPUs), or on a one-node CPU cluster in this process; a run that trained from a
    frozen-prefix cache predicts from its evaluation cache where the features' pass made one.
    `record`: the run record's `approach` and what else it adds to (or overrides in) its
    fields; `began` is when the run started.
    The checkpoint is also exported as results/<experiment>/models/<run>/ (export.py).
    """
    import ray

    run_dir = Path(run_dir)
    cfg = exp.train
    evaluation = prefix_cache.evaluation_cache(exp, read_manifest(manifest)[0])
    arguments = (checkpoint, str(Path(manifest).resolve()), cfg, evaluation)
    if not cfg.use_gpu and only_this_node():  # a Ray worker would start only to do this here
        predictions, history = _evaluate_checkpoint(*arguments)
    else:
        task = ray.remote(_evaluate_checkpoint).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)
        predictions, history = ray.get(task.remote(*arguments))
    with checkpoint.as_directory() as directory:
        export.export_checkpoint(directory, exp.layout.models / run_dir.name,
                                 record["approach"])
        cache = read_meta(directory).get("prefix_cache")  # where it was when the run trained
    cache = cache and prefix_cache.location(exp, storage.name(cache))
    write_run(run_dir, predictions, RunRecord.from_json({
        "name": run_dir.name, "config": exp.to_dict(),
        "model": exp.model.name, "freeze": cfg.freeze, "lr": cfg.lr,
        "scheduler": cfg.scheduler, "seed": cfg.seed,
        "wall_seconds": time.perf_counter() - began,
        "device_seconds": sum(h["epoch_seconds"] for h in history),
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
        "checkpoint": storage.same_kind(exp.storage_uri, checkpoint.path),
        "history": history, **cache_cost(cache), **record}))
    return run_dir


def cache_cost(cache: str | None) -> dict:
    """What a run trained on, and the seconds its frozen-prefix cache took to build (charged
    to every run that used it)."""
    if cache is None:
        return {"trained_on": "images"}
    _, info = prefix_cache.open_cache(cache)
    return {"trained_on": "cached activations", "prefix_cache_seconds": info["seconds"]}


def _evaluate_checkpoint(checkpoint, manifest: str, cfg: TrainConfig, evaluation: str | None):
    """(valid + test predictions, per-epoch history) of a ray.train.Checkpoint: from the
    evaluation cache of its frozen prefix where there is one, else from the images."""
    with checkpoint.as_directory() as directory:
        if evaluation is not None:
            predictions = predict_cached(directory, manifest, evaluation, cfg)
        else:
            predictions = predict.predict_checkpoint(directory, manifest, ("valid", "test"),
                                                     fixed_train_batch(cfg), cfg.use_gpu,
                                                     cfg.loader_workers, cfg.amp)
        return predictions, read_meta(directory)["history"]


def predict_cached(directory: str | Path, manifest: str, evaluation: str,
                   cfg: TrainConfig) -> pd.DataFrame:
    """A checkpoint's valid and test predictions from an evaluation cache: its suffix over the
    cached float32 activations of its frozen prefix, which are what the prefix computes from
    the images (prefix_cache.evaluation_plan)."""
    model, _ = load_model(directory)
    folder, info = prefix_cache.open_cache(evaluation)
    frame, classes = read_manifest(manifest)
    rows = frame[frame.split.isin(prefix_cache.EVALUATED)].reset_index(drop=True)
    device = device_for(cfg.use_gpu)
    on_gpu = device.type == "cuda"
    network = models.suffix(model, info["stage"]).to(device)
    proba = np.zeros((len(rows), len(classes)))
    for split in prefix_cache.EVALUATED:
        part = (rows.split == split).to_numpy()
        activations = prefix_cache.CachedActivations(folder, split, rows.label_idx[part])
        loader = make_loader(activations, SequentialSampler(activations),
                             fixed_train_batch(cfg))
        logits, _ = predict_logits(network, loader, device,
                                   amp=precision.uses_bf16(cfg.amp, device), channels_last=on_gpu)
        proba[part] = torch.softmax(logits.double(), dim=1).numpy()
    return predictions_frame(rows.path, rows.split, rows.label_idx, proba, classes)
