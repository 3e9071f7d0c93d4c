"""One epoch's data time, no model: decoding every JPEG (ImageDataset) against the decoded-image
cache (DecodedImages), with the lab's loader as the plain-PyTorch baseline.

    python benchmarks/decoded_epoch.py [--size 240x800] [--workers 0] [--epochs 2]

One run, one machine, the training split of one manifest: the real MarDCT sample (prepared
with the lab16 protocol) where it is present, else generated images at --size. Each path runs
in a fresh process of its own and iterates a shuffled DataLoader over the split for --epochs
epochs; a row shows the last epoch (the files then sit in the page cache for every path, as in
a run's later epochs):

- lab: the lab's Dataset (PIL + torchvision transform, float32), batch 8, in process;
- ImageDataset: boatray's uint8 pipeline, which decodes and resizes every JPEG every epoch;
- DecodedImages: the same items read from the memory-mapped cache that `ensure_decoded` built
  once before (its seconds printed apart: a node pays them once, not per epoch), item by item
  with the default collate, and a batch at a time (BatchSampler), as the training loop reads it.

Ends with `decoded cache speedup: X`, the ImageDataset epoch's seconds over DecodedImages'
(batches).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from boatray.config import SyntheticConfig
from boatray.data import decoded, synthetic
from boatray.data.images import ImageDataset
from boatray.data.manifest import prepare, read_manifest
from common import (
    LAB_BATCH,
    SAMPLE,
    LabImages,
    isolated,
    parse_size,
    print_footer,
    print_header,
    print_table,
    ratio,
)

SYNTHETIC = SyntheticConfig(classes=4, train_per_class=150, test_per_class=1, imbalance=1.0)
"""The generated set where the real sample is absent: 600 training images (about 510 train)."""


PATHS = ("ImageDataset", "DecodedImages items", "DecodedImages batches")
"""The boatray paths; the last reads whole batches, as the training loop reads a cache."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=(240, 800), help="HxW (240x800)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes of the boatray paths (0)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="the boatray paths' batch size (32; the lab keeps 8)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path; the last is shown")
    parser.add_argument("--threads", type=int, default=None,
                        help="the cache build's decoding threads (default: every usable CPU)")
    parser.add_argument("--sample", type=Path, default=SAMPLE,
                        help="the real MarDCT sample (raw layout)")
    return parser


def training_rows(sample: Path, size: tuple[int, int], work: Path) -> tuple[pd.DataFrame, str]:
    """The train split of the real sample's manifest, or of a generated set; what it is."""
    with contextlib.redirect_stdout(io.StringIO()):  # prepare prints a per-class table
        if (sample / "sc5").is_dir():
            source, what = sample, f"real MarDCT JPEGs ({sample}, lab16)"
        else:
            config = SyntheticConfig(**{**SYNTHETIC.__dict__, "image_size": size})
            source, what = synthetic.generate(work / "images", config, seed=0), "generated JPEGs"
        frame, _ = read_manifest(prepare(source, work / "data"))
    return frame[frame.split == "train"].reset_index(drop=True), what


def loader(path: str, rows: pd.DataFrame, size: tuple[int, int], folder: str | None,
           batch_size: int, workers: int) -> DataLoader:
    """The shuffled DataLoader of one measured path over `rows`."""
    paths, labels = rows.path.tolist(), rows.label_idx.tolist()
    if path == "lab":
        return DataLoader(LabImages(paths, labels, size), batch_size=LAB_BATCH, shuffle=True)
    if path == "ImageDataset":
        dataset = ImageDataset(paths, labels, size)
    else:
        dataset = decoded.DecodedImages(folder, "train", labels)
    if path == "DecodedImages batches":
        return DataLoader(dataset, batch_size=None, num_workers=workers, sampler=BatchSampler(
            RandomSampler(dataset), batch_size, drop_last=False))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def data_epochs(path: str, rows: pd.DataFrame, size: tuple[int, int], folder: str | None,
                batch_size: int, workers: int, epochs: int) -> dict:
    """Iterate one path's DataLoader for `epochs` epochs: the last epoch's images and seconds."""
    batches = loader(path, rows, size, folder, batch_size, workers)
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for inputs, _labels in batches:
            images += len(inputs)
        seconds = time.perf_counter() - started
    return {"images": images, "epoch s": seconds, "images/s": images / seconds}


def build_cache(rows: pd.DataFrame, size: tuple[int, int], root: Path,
                threads: int | None) -> dict:
    """`ensure_decoded` once: its folder, wall seconds and decoded.json."""
    started = time.perf_counter()
    folder = decoded.ensure_decoded(rows, size, root, threads)
    if folder is None:
        sys.exit(f"error: no room for the decoded-image cache under {root}")
    info = json.loads((folder / decoded.INFO_FILE).read_text())
    return {"folder": str(folder), "seconds": time.perf_counter() - started, **info}


def main() -> None:
    args = build_parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="boatray-bench-decoded-"))
    try:
        rows, what = training_rows(args.sample, args.size, work)
        print_header(f"one epoch's data time at {args.size[0]}x{args.size[1]}, "
                     f"{len(rows)} training images ({what}), {args.workers} loader workers")
        plain, memory = isolated(data_epochs, "lab", rows, args.size, None, LAB_BATCH, 0,
                                 args.epochs)
        table = [{"path": "lab loader (batch 8, in process)", **plain, **memory}]
        build, _ = isolated(build_cache, rows, args.size, work / "decoded", args.threads)
        for path in PATHS:
            result, memory = isolated(data_epochs, path, rows, args.size, build["folder"],
                                      args.batch_size, args.workers, args.epochs)
            table.append({"path": f"{path} (batch {args.batch_size})", **result, **memory})
        jpeg, cached = table[1]["epoch s"], table[-1]["epoch s"]
        for row in table:
            row["vs ImageDataset"] = ratio(jpeg, row["epoch s"])
        print_table(table)
        print(f"decoded cache build: {build['seconds']:.1f} s once for {len(rows)} images "
              f"({build['threads']} threads, {build['bytes'] / 2**20:.0f} MiB)")
        print(f"decoded cache speedup: {ratio(jpeg, cached):.1f}")
        print_footer()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
