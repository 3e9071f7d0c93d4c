"""The decoded-image cache: ImageDataset's exact items, its key, reuse, unfinished and corrupt
builds, a full disk, and two processes building it at once (one decode per image in all)."""

from __future__ import annotations

import errno
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from boatray import cachedir
from boatray.config import SyntheticConfig
from boatray.data import decoded, synthetic
from boatray.data import manifest as manifest_module
from boatray.data.images import ImageDataset, decode
from boatray.errors import BoatrayError

SIZE = (20, 56)
"""The cache's size: not the generated one (24x64), so every image is resized."""


@pytest.fixture
def rows(tmp_path) -> pd.DataFrame:
    """The manifest rows of 3 classes of generated 24x64 JPEGs: train, valid and test."""
    tree = synthetic.generate(tmp_path / "images", SyntheticConfig(
        classes=3, train_per_class=4, test_per_class=2, image_size=(24, 64), imbalance=1.0),
        seed=0)
    path = manifest_module.prepare(tree, tmp_path / "data", valid_fraction=0.25, seed=0)
    return manifest_module.read_manifest(path)[0]


def split_rows(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    return rows[rows.split == split]


def assert_items_equal(folder: Path, rows: pd.DataFrame) -> None:
    """Every split's DecodedImages items equal ImageDataset's, tensor and label."""
    for split in rows.split.unique():
        part = split_rows(rows, split)
        cached = decoded.DecodedImages(folder, split, part.label_idx)
        plain = ImageDataset(part.path.tolist(), part.label_idx.tolist(), SIZE)
        assert len(cached) == len(plain) > 0 and cached.labels.tolist() == plain.labels
        for (image, label), (expected, expected_label) in zip(cached, plain):
            assert image.dtype == torch.uint8 and image.shape == (3, *SIZE)
            assert torch.equal(image, expected) and label == expected_label
            assert isinstance(label, int)


def finished_folders(root: Path) -> list[Path]:
    return [p.parent for p in root.glob(f"*/{decoded.INFO_FILE}")]


def test_items_and_batches_equal_image_datasets_and_pickle_the_path_only(rows, tmp_path):
    folder = decoded.ensure_decoded(rows, SIZE, tmp_path / "decoded")
    assert folder.name.startswith("decoded-20x56-")
    assert set(rows.split) == {"train", "valid", "test"}
    assert_items_equal(folder, rows)
    train = split_rows(rows, "train")
    dataset = decoded.DecodedImages(folder, "train", train.label_idx)
    dataset[0]  # maps the file
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._rows is None and len(pickle.dumps(dataset)) < 1000
    assert torch.equal(copy[1][0], dataset[1][0])
    batches = DataLoader(dataset, sampler=BatchSampler(SequentialSampler(dataset), 4, False),
                         batch_size=None)
    plain = DataLoader(ImageDataset(train.path.tolist(), train.label_idx.tolist(), SIZE), 4)
    for (images, labels), (expected, expected_labels) in zip(batches, plain, strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels)
    with pytest.raises(BoatrayError, match="holds 9 images"):
        decoded.DecodedImages(folder, "train", train.label_idx[:-1])


def test_the_key_changes_with_the_size_and_a_replaced_image(rows):
    key = decoded.decoded_key(rows, SIZE)
    assert key == decoded.decoded_key(rows.copy(), SIZE)
    assert key != decoded.decoded_key(rows, (SIZE[0], SIZE[1] + 8))
    Image.new("RGB", (64, 24), "white").save(rows.path[0], quality=50)  # another file size
    assert key != decoded.decoded_key(rows, SIZE)


def test_a_second_call_reuses_the_cache(rows, tmp_path, monkeypatch):
    folder = decoded.ensure_decoded(rows, SIZE, tmp_path / "decoded")

    def no_decode(path: str, size: tuple[int, int]) -> np.ndarray:
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(decoded, "decode", no_decode)
    assert decoded.ensure_decoded(rows, SIZE, tmp_path / "decoded") == folder


def test_an_unfinished_folder_is_rebuilt_not_read(rows, tmp_path):
    root = tmp_path / "decoded"
    unfinished = root / decoded.decoded_key(rows, SIZE)
    unfinished.mkdir(parents=True)
    np.save(unfinished / "train.npy", np.zeros((9, *SIZE, 3), dtype=np.uint8))
    leftover = root / f".{unfinished.name}.0123.tmp"  # of a builder that died
    leftover.mkdir()
    assert decoded.ensure_decoded(rows, SIZE, root) == unfinished
    assert_items_equal(unfinished, rows)
    assert not leftover.exists()


def test_a_corrupt_image_raises_imagedatasets_error_and_leaves_no_cache(rows, tmp_path):
    broken = rows.path[len(rows) // 2]
    Path(broken).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(BoatrayError) as plain:
        decode(broken, SIZE)
    root = tmp_path / "decoded"
    with pytest.raises(BoatrayError) as cached:
        decoded.ensure_decoded(rows, SIZE, root, threads=2)
    assert str(cached.value) == str(plain.value) and broken in str(cached.value)
    assert [p.name for p in root.iterdir()] == [f".{decoded.decoded_key(rows, SIZE)}.lock"]


def test_a_full_disk_means_no_cache_and_one_line(rows, tmp_path, monkeypatch, capsys):
    root = tmp_path / "decoded"
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(cachedir.shutil, "disk_usage", lambda path: usage)
    assert decoded.ensure_decoded(rows, SIZE, root) is None
    assert "[cache] decoded-image cache not used" in capsys.readouterr().out
    monkeypatch.undo()

    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decoded.os, "posix_fallocate", disk_full)
    assert decoded.ensure_decoded(rows, SIZE, root) is None
    assert "ran out of space" in capsys.readouterr().out
    assert [p.suffix for p in root.iterdir()] == [".lock"]


def build_after(barrier, rows: pd.DataFrame, root: Path, results) -> None:
    """One of the concurrent callers: wait for the other, then ensure the cache."""
    barrier.wait()
    results.put(str(decoded.ensure_decoded(rows, SIZE, root, threads=1)))


def test_two_processes_at_once_decode_each_image_once(rows, tmp_path, monkeypatch):
    log = tmp_path / "decodes.log"

    def logged_decode(path: str, size: tuple[int, int]) -> np.ndarray:
        with open(log, "a") as handle:
            handle.write(f"{path}\n")
        return decode(path, size)

    monkeypatch.setattr(decoded, "decode", logged_decode)  # forked children inherit it
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    root = tmp_path / "decoded"
    callers = [context.Process(target=build_after, args=(barrier, rows, root, results))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)
        assert caller.exitcode == 0
    folders = {results.get(timeout=5) for _ in callers}
    assert sorted(log.read_text().splitlines()) == sorted(rows.path)
    assert folders == {str(p) for p in finished_folders(root)} and len(folders) == 1
