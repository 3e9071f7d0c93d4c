"""Batch prediction with an exported model or a trained checkpoint: a manifest's splits or a
folder of images.

`python -m boatray.predict (--model DIR | --checkpoint DIR) (--images DIR | --manifest FILE)
[--out FILE]` writes one row per image: `path`, `split`, `class` (the predicted class name),
`true_class` (the parent folder's class or the manifest's label; empty when unknown) and one
probability column per class, named by the class. `--out` ending in .csv writes CSV, in
.parquet Parquet. `--model` takes the exported model of any approach
(results/<experiment>/models/<run>/, boatray.approaches.load_model). Images go through the one
pipeline (data/images.py) at the size the model was trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from boatray import approaches, export, precision, storage
from boatray.data import images
from boatray.data.imagefiles import Exclusions, is_hidden, is_image_name, keep_intact
from boatray.data.manifest import read_manifest
from boatray.errors import BoatrayError, cli
from boatray.finetune.checkpoints import META_FILE, latest_checkpoint, load_model
from boatray.finetune.engine import device_for, predict_logits
from boatray.results import (
    atomic_write,
    atomic_write_parquet,
    classes_of,
    predictions_frame,
    proba_of,
)

FOLDER_SPLIT = "folder"
"""The `split` of images predicted from a folder (not part of a manifest)."""


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | Path) -> Iterator[Path]:
    """A checkpoint as a local folder for the `with` block: a checkpoint folder as it is, a run
    folder's latest checkpoint; one on a remote storage is downloaded to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="boatray-checkpoint-") as temporary:
        path = storage.local_copy(checkpoint, Path(temporary) / "checkpoint")
        found = None if (path / META_FILE).is_file() else latest_checkpoint(path)
        yield path if found is None else Path(found)


def predict_proba(model: torch.nn.Module, dataset: images.ImageDataset, *, batch_size: int = 32,
                  device: torch.device | str = "cpu", loader_workers: int = 0,
                  amp: bool | str = "auto") -> np.ndarray:
    """Class probabilities (n, classes) of every image of `dataset`, in its order.

    With bf16 autocast (`amp`, as in training: `auto` where the device runs bf16 natively,
    precision.py) the model also runs channels_last.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    amp = precision.uses_bf16(amp, device)
    model = model.to(device, memory_format=torch.channels_last if amp
                     else torch.preserve_format)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers,
                        pin_memory=on_gpu)
    logits, _ = predict_logits(model, loader, device, amp=amp, channels_last=amp)
    return torch.softmax(logits.double(), dim=1).numpy()


def predict_checkpoint(checkpoint: str | Path, manifest: str | Path,
                       splits: Sequence[str] = ("valid", "test"), batch_size: int = 32,
                       use_gpu: bool = False, loader_workers: int = 0,
                       amp: bool | str = "auto") -> pd.DataFrame:
    """The predictions table of a checkpoint on the given splits of a manifest (`amp`: the
    run's `train.amp`)."""
    with local_checkpoint(checkpoint) as directory:
        model, meta = load_model(directory)
    frame, classes = read_manifest(manifest)
    if classes != meta["classes"]:
        raise BoatrayError(f"manifest {manifest} has other classes than checkpoint {checkpoint}")
    rows = frame[frame.split.isin(list(splits))]
    if rows.empty:
        raise BoatrayError(f"manifest {manifest} has no images in the splits {', '.join(splits)}")
    dataset = images.ImageDataset(rows.path.tolist(), rows.label_idx.tolist(),
                                  tuple(meta["image_size"]))
    proba = predict_proba(model, dataset, batch_size=batch_size, device=device_for(use_gpu),
                          loader_workers=loader_workers, amp=amp)
    return predictions_frame(rows.path, rows.split, rows.label_idx, proba, classes)


def folder_images(folder: str | Path, exclusions: Exclusions) -> list[Path]:
    """Every intact image below `folder` (recursively, sorted); unreadable ones are recorded."""
    root = Path(folder)
    if not root.is_dir():
        raise BoatrayError(f"image folder not found: {root}")
    found = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p)
                   and not any(is_hidden(Path(part)) for part in p.relative_to(root).parts))
    kept = keep_intact(found, exclusions)
    if not kept:
        raise BoatrayError(f"no readable images in {root}")
    return kept


def open_model(model: str | Path | None = None, checkpoint: str | Path | None = None
               ) -> export.Model:
    """An exported model folder (`model`), or the model of a checkpoint folder or URI."""
    if model is not None:
        return approaches.load_model(model)
    with local_checkpoint(checkpoint) as directory:
        network, meta = load_model(directory)
    return export.Model({"classes": meta["classes"], "image_size": meta["image_size"]},
                        network)


def predict_folder(model: export.Model, folder: str | Path, batch_size: int = 32,
                   use_gpu: bool = False, loader_workers: int = 0
                   ) -> tuple[pd.DataFrame, Exclusions]:
    """Predictions (common format, results.py) for every image below `folder`, and what was
    left out.

    `y_true` is the class of the image's parent folder when that is a class name (an
    ImageFolder tree), else -1 (unknown).
    """
    classes = model.classes
    exclusions = Exclusions()
    paths = folder_images(folder, exclusions)
    index = {name: i for i, name in enumerate(classes)}
    labels = [index.get(p.parent.name, -1) for p in paths]
    dataset = images.ImageDataset([str(p) for p in paths], labels, model.image_size)
    device = device_for(use_gpu)
    on_gpu = device.type == "cuda"
    amp = precision.uses_bf16("auto", device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers,
                        pin_memory=on_gpu)
    network = model.network.to(device, memory_format=torch.channels_last if amp
                               else torch.preserve_format)
    outputs, _ = predict_logits(network, loader, device, amp=amp, channels_last=amp)
    return predictions_frame([str(p) for p in paths], FOLDER_SPLIT, labels,
                             model.proba(outputs), classes), exclusions


def readable(predictions: pd.DataFrame) -> pd.DataFrame:
    """The predictions table for people: class names instead of indices, probability columns
    named by class."""
    classes = classes_of(predictions)
    names = np.array([*classes, ""], dtype=object)  # index -1 (unknown) -> ""
    return pd.concat([pd.DataFrame({
        "path": predictions["path"].to_numpy(), "split": predictions["split"].to_numpy(),
        "class": names[predictions["y_pred"].to_numpy()],
        "true_class": names[predictions["y_true"].to_numpy()]}),
        pd.DataFrame(proba_of(predictions), columns=classes)], axis=1)


def write_table(path: str | Path, frame: pd.DataFrame) -> Path:
    """CSV for a .csv path, Parquet for .parquet, atomically."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    if suffix == ".parquet":
        return atomic_write_parquet(path, frame)
    raise BoatrayError(f"--out must end in .csv or .parquet, got {path}")


def summary(predictions: pd.DataFrame) -> list[str]:
    """Printable lines: images per predicted class, accuracy per split where labels are known."""
    classes = classes_of(predictions)
    counts = predictions.y_pred.value_counts()
    lines = [f"{len(predictions)} images predicted; per predicted class:"]
    lines += [f"  {counts.get(i, 0):6d}  {name}" for i, name in enumerate(classes)]
    for split, rows in predictions.groupby("split", sort=False):
        known = rows[rows.y_true >= 0]
        if len(known):
            accuracy = float((known.y_true == known.y_pred).mean())
            lines.append(f"{split}: accuracy {accuracy:.4f} on {len(known)} labelled images")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.predict`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.predict",
        description="Predict images with an exported boatray model (results/<experiment>/"
                    "models/<run>/) or a training checkpoint folder.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="exported model folder of any approach, e.g. "
                                       "results/<experiment>/models/svm")
    model.add_argument("--checkpoint",
                       help="checkpoint folder (holds model.pt and meta.json), a run folder "
                            "(its latest checkpoint) or a storage URI (S3, GCS, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", "--folder", dest="folder",
                        help="folder of images (searched recursively; an image's parent folder "
                             "named like a class gives its true class)")
    source.add_argument("--manifest", help="manifest.parquet (or its folder) to predict; "
                                           "needs --checkpoint")
    parser.add_argument("--splits", default="valid,test",
                        help="manifest splits to predict, comma-separated (default valid,test)")
    parser.add_argument("--out", default="predictions.csv",
                        help="table to write: .csv or .parquet (default ./predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per forward pass (default 32)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="processes decoding images (default 0: in the main process)")
    parser.add_argument("--gpu", action="store_true", help="predict on the GPU")
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m boatray.predict`."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.loader_workers < 0:
        raise BoatrayError("--batch-size must be >= 1 and --loader-workers >= 0")
    if args.manifest:
        if args.model:
            raise BoatrayError("--manifest needs --checkpoint; with --model give --images")
        splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
        predictions = predict_checkpoint(args.checkpoint, args.manifest, splits,
                                         args.batch_size, args.gpu, args.loader_workers)
        lines = summary(predictions)
    else:
        model = open_model(args.model, args.checkpoint)
        predictions, exclusions = predict_folder(model, args.folder, args.batch_size,
                                                 args.gpu, args.loader_workers)
        lines = summary(predictions) + exclusions.lines()
    out = write_table(args.out, readable(predictions))
    print("\n".join([*lines, f"predictions: {out}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
