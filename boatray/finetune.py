"""`python -m boatray.finetune`: one training run from a config, then its predictions and run.json.

The run trains on Ray Train (train.fit), then the final checkpoint predicts the valid and test
splits, and the run folder results/<experiment>/runs/<run>/ receives predictions.parquet and
run.json in the common format (results.py) next to the run's checkpoint.

The final checkpoint (the last epoch), not the best epoch by a validation metric: it is what
the lab evaluated after its fixed number of epochs, and what the sweep ranks configurations by
(each trial's last reported epoch), so a run's test numbers belong to the model its selection
saw. The learning curves in `history` show where validation peaked.

The BetterCNN baseline runs through the same loop (`baseline_experiment`, `--baseline`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from boatray import config as config_module
from boatray import predict, preflight, train
from boatray.cluster import start_ray
from boatray.config import Experiment, TrainConfig, from_dict
from boatray.errors import BoatrayError, cli
from boatray.results import write_run

RUNS_DIR = "runs"
"""Run folders live in results/<experiment>/runs/<run>/."""


def baseline_experiment(exp: Experiment) -> Experiment:
    """The lab's BetterCNN baseline as a training run: exp.baseline mapped onto model/train/data.

    From scratch (weights none, every layer trained) at the baseline's image size, epochs,
    optimizer, lr and batch size, with the lab's plain recipe: no scheduler, no class
    weighting, no balanced sampler, no weight decay. Workers, GPUs, seed and failure handling
    stay those of exp.train.
    """
    raw = exp.to_dict()
    base = exp.baseline
    raw["model"] = {"name": "bettercnn", "weights": "none", "pooling": "avg"}
    raw["data"]["image_size"] = list(base.image_size)
    raw["train"].update({"epochs": base.epochs, "lr": base.lr, "optimizer": base.optimizer,
                         "batch_size": base.batch_size, "freeze": "all", "scheduler": "none",
                         "lr_decay": 1.0, "weight_decay": 0.0, "class_weighted_loss": False,
                         "balanced_sampler": False})
    return from_dict(raw)


def default_run_name(exp: Experiment, approach: str) -> str:
    """A run name that says what was trained, e.g. finetune-resnet50-layer4-lr1e-03-s0."""
    if approach == "baseline":
        return f"baseline-{exp.model.name}-s{exp.train.seed}"
    return (f"{approach}-{exp.model.name}-{exp.train.freeze}-lr{exp.train.lr:.0e}-"
            f"{exp.train.scheduler}-s{exp.train.seed}")


def run(exp: Experiment, manifest: str | Path, run_dir: str | Path,
        approach: str = "finetune") -> Path:
    """Train, predict valid and test with the final checkpoint, write the run folder; return it.

    Prediction runs as a Ray task with one training worker's resources (a GPU when training
    used GPUs) wherever the checkpoint storage can be read, not necessarily on the driver.
    """
    began = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    result = train.fit(exp, manifest, run_dir)
    if result.checkpoint is None:
        raise BoatrayError(f"training run {run_dir} saved no checkpoint")
    return evaluate_and_write(exp, manifest, result.checkpoint, run_dir,
                              {"approach": approach}, began)


def evaluate_and_write(exp: Experiment, manifest: str | Path, checkpoint, run_dir: str | Path,
                       record: dict, began: float) -> Path:
    """Predict valid and test with a ray.train.Checkpoint; write the run folder; return it.

    Prediction runs as a Ray task with one training worker's resources (a GPU when training
    used GPUs) wherever the checkpoint storage can be read, not necessarily on the driver.
    `record` adds to (or overrides) the run.json fields; `began` is when the run started.
    """
    import ray

    run_dir = Path(run_dir)
    cfg = exp.train
    task = ray.remote(_evaluate_checkpoint).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)
    predictions, history = ray.get(task.remote(
        checkpoint, str(Path(manifest).resolve()), cfg))
    write_run(run_dir, predictions, {
        "approach": "finetune", "name": run_dir.name, "config": exp.to_dict(),
        "model": exp.model.name, "freeze": cfg.freeze, "lr": cfg.lr,
        "scheduler": cfg.scheduler, "seed": cfg.seed,
        "wall_seconds": time.perf_counter() - began,
        "device_seconds": sum(h["epoch_seconds"] for h in history),
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
        "checkpoint": _uri(checkpoint), "history": history, **record})
    return run_dir


def _evaluate_checkpoint(checkpoint, manifest: str, cfg: TrainConfig):
    """(valid + test predictions, per-epoch history) of a ray.train.Checkpoint."""
    with checkpoint.as_directory() as directory:
        return (predict.predict_checkpoint(directory, manifest, ("valid", "test"),
                                           cfg.batch_size, cfg.use_gpu, cfg.loader_workers),
                train.read_meta(directory)["history"])


def _uri(checkpoint) -> str:
    """Where a checkpoint is: a local path, or a URI such as s3://bucket/..."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.finetune`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.finetune",
        description="Train one model on Ray Train from an experiment config, then write its "
                    "valid/test predictions and run.json under results/<experiment>/runs/.")
    config_module.add_arguments(parser)
    parser.add_argument("--baseline", action="store_true",
                        help="train the BetterCNN baseline (the config's baseline section)")
    parser.add_argument("--name", help="run name (default: from model, freeze, lr, scheduler "
                                       "and seed); an existing run of that name is resumed "
                                       "from its last checkpoint")
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m boatray.finetune`."""
    from boatray.data.manifest import ensure_manifest

    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    approach = "baseline" if args.baseline else "finetune"
    start_ray()
    trained, _ = preflight.check(baseline_experiment(exp) if args.baseline else exp)
    manifest = ensure_manifest(exp)
    run_dir = exp.results_dir / RUNS_DIR / (args.name or default_run_name(trained, approach))
    print(f"results: {run_dir}", flush=True)
    print(f"{approach}: training {trained.model.name}", flush=True)
    run(trained, manifest, run_dir, approach)
    print(f"{approach}: wrote predictions.parquet and run.json", flush=True)
    print(f"results: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
