"""The decoded-image cache: each image of a manifest decoded and resized once per node.

Without random augmentation a trial that trains from pixels sees the same uint8 pixels of an
image in every epoch. `ensure_decoded` decodes them once (`images.decode`, ImageDataset's
pixels) into `root/<key>/<split>.npy`, uint8 (n, h, w, 3) in manifest order, and
`DecodedImages` reads a split through a memory map shared (page cache) by every loader process
and trial on the node. `decoded.json` is written last: a folder without it is never read. One
builder per key: callers queue on the fcntl lock `root/.<key>.lock`, the builder writes into
`root/.<key>.<random>.tmp` and renames it into place. `root` must be node-local.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boatray import cachedir
from boatray.data.images import decode, to_chw
from boatray.errors import BoatrayError

FORMAT = 1
"""Part of every key: bump it when what a cache holds (or how it is decoded) changes."""
INFO_FILE = "decoded.json"


def rows_digest(rows: pd.DataFrame) -> str:
    """A digest of the rows' paths, labels, splits and image file sizes (a replaced image of
    another size changes it; sizes, unlike modification times, survive copying the data)."""
    sizes = (os.stat(path).st_size if os.path.exists(path) else -1 for path in rows.path)
    lines = (f"{path}\t{label}\t{split}\t{size}\n"
             for path, label, split, size in zip(rows.path, rows.label_idx, rows.split, sizes))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def decoded_key(rows: pd.DataFrame, size: Sequence[int]) -> str:
    """The cache's name: the image size, then a digest of everything its pixels depend on."""
    height, width = size
    inputs = {"format": FORMAT, "image_size": [height, width], "rows": rows_digest(rows)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return f"decoded-{height}x{width}-{digest}"


def ensure_decoded(rows: pd.DataFrame, size: Sequence[int], root: str | Path,
                   threads: int | None = None) -> Path | None:
    """The folder of the decoded-image cache of `rows` at `size` = (h, w) under `root`, built
    first (with `threads` decoding threads; default: every usable CPU) when there is none.

    Returns None, after one `[cache]` line saying why, when a new cache would not fit on the
    disk (training then decodes the JPEGs). An undecodable image raises `decode`'s BoatrayError
    and leaves no cache behind.
    """
    root, size = Path(root), (int(size[0]), int(size[1]))
    folder = root / decoded_key(rows, size)
    if (folder / INFO_FILE).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (folder / INFO_FILE).is_file():
            return folder  # built by the caller we waited for
        for leftover in [folder, *root.glob(f".{folder.name}.*.tmp")]:
            shutil.rmtree(leftover, ignore_errors=True)  # of a builder that died
        return _build(rows, size, folder, threads or len(os.sched_getaffinity(0)))


def _build(rows: pd.DataFrame, size: tuple[int, int], folder: Path,
           threads: int) -> Path | None:
    """Decode `rows` into a temporary folder, write its info last, rename it to `folder`."""
    height, width = size
    splits = {split: rows.path[rows.split == split].tolist() for split in rows.split.unique()}
    needed = len(rows) * height * width * 3
    if not cachedir.fits(needed, folder.parent):
        return _not_used(f"{len(rows)} images at {height}x{width} need {needed / 2**30:.1f} "
                         f"GiB, {folder.parent} has "
                         f"{cachedir.free_space(folder.parent) / 2**30:.1f} GiB free")
    temporary = cachedir.temporary_beside(folder)
    try:
        started = time.monotonic()
        arrays = {split: allocate(temporary / f"{split}.npy", (len(paths), height, width, 3))
                  for split, paths in splits.items()}
        for split, paths in splits.items():
            _decode_into(arrays[split], paths, size, threads)
            arrays[split].flush()
        info = {"key": folder.name, "format": FORMAT, "image_size": [height, width],
                "images": {split: len(paths) for split, paths in splits.items()},
                "bytes": needed, "seconds": time.monotonic() - started, "threads": threads}
        del arrays
        (temporary / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        cachedir.publish(temporary, folder, INFO_FILE)
        print(f"[cache] decoded {len(rows)} images at {height}x{width} once in "
              f"{info['seconds']:.1f} s ({needed / 2**20:.0f} MiB): {folder}", flush=True)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return _not_used(f"{folder.parent} ran out of space while it was written")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _not_used(why: str) -> None:
    print(f"[cache] decoded-image cache not used ({why}): decoding the JPEGs every epoch",
          flush=True)


def allocate(file: Path, shape: tuple[int, ...], dtype: str | type = np.uint8) -> np.memmap:
    """A .npy of `shape` mapped for writing, its blocks reserved on disk first (a full disk
    then raises ENOSPC here, not SIGBUS when a mapped page is written)."""
    array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    with open(file, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return array


def _decode_into(array: np.ndarray, paths: list[str], size: tuple[int, int],
                 threads: int) -> None:
    """Decode `paths` into the rows of `array` in order, `threads` at a time (PIL releases the
    GIL while decoding), a few chunks' worth in memory: an error stops it within a chunk."""
    step = 8 * threads
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), step):
            chunk = pool.map(functools.partial(decode, size=size), paths[start:start + step])
            for offset, pixels in enumerate(chunk):
                array[start + offset] = pixels


class MappedSplit(torch.utils.data.Dataset):
    """One split of a cache of .npy arrays in manifest order, with its labels: each process
    opens its own memory map (a pickle holds the path, not the mapped data)."""

    what = "cache"  # the cache's kind, for messages

    def __init__(self, folder: str | Path, split: str, labels: Sequence[int]) -> None:
        self.file = Path(folder) / f"{split}.npy"
        self.labels = np.asarray(labels, dtype=np.int64)
        self._rows: np.ndarray | None = None
        if len(self._array()) != len(self.labels):
            raise BoatrayError(f"{self.what} {self.file} holds {len(self._array())} images, "
                               f"the manifest's {split} split {len(self.labels)}")

    def _array(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.file, mmap_mode="r")
        return self._rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}

    def __len__(self) -> int:
        return len(self.labels)


class DecodedImages(MappedSplit):
    """(uint8 CHW tensor, label index): ImageDataset's items without augmentation. A list of
    indices (a BatchSampler's, with `DataLoader(batch_size=None)`) reads the batch at once, (n, 3,
    h, w) uint8 in channels_last strides and (n,) labels (collating items transposes each one)."""

    what = "decoded-image cache"

    def __getitem__(self, index: int | Sequence[int]
                    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        pixels = to_chw(np.array(self._array()[index]))  # a copy: an image or the batch's
        if isinstance(index, (int, np.integer)):
            return pixels, int(self.labels[index])
        return pixels, torch.from_numpy(self.labels[index])
