"""ImageFolder trees, the stratified split, manifests, ensure_manifest, the CLI, bad input."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boatray import config
from boatray.config import SyntheticConfig
from boatray.data import synthetic
from boatray.data.__main__ import main
from boatray.data.manifest import ensure_manifest, prepare, read_manifest, stratified_valid
from boatray.errors import BoatrayError

SMALL = SyntheticConfig(classes=3, train_per_class=10, test_per_class=3, image_size=(12, 40),
                        imbalance=2.0)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return synthetic.generate(tmp_path / "tree", SMALL, seed=0)


def test_imagefolder_manifest(tree, tmp_path, capsys):
    path = prepare(tree, tmp_path / "out", valid_fraction=0.2, seed=3)
    frame, classes = read_manifest(path)
    assert list(frame.columns) == ["path", "label", "label_idx", "split"]
    assert frame.label_idx.dtype == np.int64
    assert classes == ["boat00", "boat01", "boat02"]
    assert (frame.label_idx == frame.label.map(classes.index)).all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame.path)
    on_disk = Counter(p.parent.name for p in (tree / "train").glob("*/*.jpg"))
    assert Counter(frame.label[frame.split != "test"]) == on_disk
    assert (frame.split == "valid").sum() == sum(round(n * 0.2) for n in on_disk.values())
    assert "boat00" in capsys.readouterr().out
    again, _ = read_manifest(prepare(tree, tmp_path / "again", valid_fraction=0.2, seed=3))
    pd.testing.assert_frame_equal(frame, again)  # seeded: the same split


def test_valid_folder_is_used_as_it_is(tree, tmp_path):
    moved = tree / "valid" / "boat01"
    moved.mkdir(parents=True)
    for image in sorted((tree / "train" / "boat01").glob("*.jpg"))[:2]:
        image.rename(moved / image.name)
    frame, _ = read_manifest(prepare(tree, tmp_path / "out", valid_fraction=0.5))
    assert frame[frame.split == "valid"].label.tolist() == ["boat01", "boat01"]


def test_zip_of_an_imagefolder_tree(tree, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "boat-data"), "zip", tree.parent, tree.name)
    frame, classes = read_manifest(prepare(archive, tmp_path / "out"))
    assert classes == ["boat00", "boat01", "boat02"]
    assert (frame.split == "test").sum() == len(list((tree / "test").glob("*/*.jpg")))


def test_stratified_valid_split_rules():
    labels = ["a"] * 20 + ["b"] * 2 + ["c"] * 1 + ["d"] * 7
    chosen = stratified_valid(labels, 0.5, seed=0)
    by_class = Counter(label for label, valid in zip(labels, chosen) if valid)
    assert by_class == {"a": 10, "b": 1, "d": 4}  # b keeps one in train, c stays in train
    assert (stratified_valid(labels, 0.5, seed=0) == chosen).all()
    assert (stratified_valid(labels, 0.5, seed=1) != chosen).any()
    assert not stratified_valid(labels, 0.0, seed=0).any()
    assert stratified_valid(["x", "x"], 0.9, seed=0).sum() == 1


def test_ensure_manifest_generates_then_reuses(tmp_path, capsys):
    # the manifest lands under storage_path: this test's own folder, not the working directory
    overrides = [f"storage_path={tmp_path}", "data.synthetic.classes=2",
                 "data.synthetic.train_per_class=4", "data.synthetic.test_per_class=1",
                 "data.synthetic.image_size=[8, 24]"]
    path = ensure_manifest(config.load(None, overrides))
    assert "SYNTHETIC" in capsys.readouterr().out
    mtime = path.stat().st_mtime_ns
    assert ensure_manifest(config.load(None, overrides)) == path
    assert "reusing" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    ensure_manifest(config.load(None, overrides + ["data.synthetic.classes=3"]))
    assert len(read_manifest(path)[1]) == 3


def test_ensure_manifest_prepares_a_given_source(tree, tmp_path):
    exp = config.load(None, [f"storage_path={tmp_path / 'results'}", f"data.source={tree}"])
    frame, _ = read_manifest(ensure_manifest(exp))
    assert frame.path.str.startswith(str(tree.resolve())).all()


# Bad input: a one-line BoatrayError, or a counted and listed exclusion.

def test_missing_source_folder(tmp_path):
    with pytest.raises(BoatrayError, match="data source not found: .*nowhere"):
        prepare(tmp_path / "nowhere", tmp_path / "out")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "train" / "boat").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(BoatrayError, match="no usable training images"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(BoatrayError, match="found neither an ImageFolder tree"):
        prepare(tmp_path / "empty" / "test", tmp_path / "out")


def test_archive_problems(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(BoatrayError, match="cannot read zip archive .*broken.zip"):
        prepare(tmp_path / "broken.zip", tmp_path / "out")
    (tmp_path / "data.tar").write_bytes(b"")
    with pytest.raises(BoatrayError, match="is a file but not a .zip archive"):
        prepare(tmp_path / "data.tar", tmp_path / "out")


def test_unreadable_images_are_listed_and_left_out(tree, tmp_path, capsys):
    good = sorted((tree / "train" / "boat00").glob("*.jpg"))
    data = good[0].read_bytes()
    good[0].write_bytes(b"")  # zero bytes
    good[1].write_bytes(data[: len(data) * 2 // 3])  # truncated: PIL's header check passes
    good[2].write_bytes(b"this is not a JPEG")
    with Image.open(good[1]) as image:
        image.verify()  # PIL's own check does not see the truncation
    (tree / "test" / "boat01" / "notes.txt").write_text("not an image")
    (tree / "test" / "mystery").mkdir()
    good[3].rename(tree / "test" / "mystery" / good[3].name)  # no training class
    frame, _ = read_manifest(prepare(tree, tmp_path / "out"))
    assert not frame.path.isin([str(p.resolve()) for p in good[:4]]).any()
    printed = capsys.readouterr().out
    assert "excluded 3 unreadable image files:" in printed
    assert f"{good[0]}: empty file" in printed
    assert f"{good[1]}: cannot decode" in printed
    assert f"{good[2]}: not an image" in printed
    assert "ignored files that are not images: 1" in printed
    assert "excluded 1 test images whose label has no training class" in printed


def test_bad_manifests(tmp_path):
    with pytest.raises(BoatrayError, match="manifest not found"):
        read_manifest(tmp_path)
    pd.DataFrame({"path": ["x"], "label": ["a"]}).to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(BoatrayError, match="lacks the columns label_idx, split"):
        read_manifest(tmp_path)


def test_cli_prepare_and_one_line_errors(tree, tmp_path, capsys):
    assert main(["prepare", "--source", str(tree), "--out", str(tmp_path / "out"),
                 "--valid-fraction", "0.3", "--seed", "1"]) == 0
    assert (tmp_path / "out" / "manifest.parquet").is_file()
    capsys.readouterr()
    for argv in (["prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path)],
                 ["prepare", "--source", str(tree), "--protocol", "lab17", "--out", str(tmp_path)],
                 ["prepare", "--source", str(tree), "--valid-fraction", "1.5",
                  "--out", str(tmp_path)],
                 ["synthetic", "--out", str(tree.parent / "other"), "--classes", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_prepared_folder_is_a_data_source(tree, tmp_path, capsys):
    prepared = prepare(tree, tmp_path / "prepared")
    # the experiment's results go to this test's own folder, not the working directory
    exp = config.load(None, [f"storage_path={tmp_path / 'results'}"], data=str(prepared.parent))
    used = ensure_manifest(exp)
    assert used == tmp_path / "results" / "smoke" / "data" / "manifest.parquet"
    pd.testing.assert_frame_equal(read_manifest(used)[0], read_manifest(prepared)[0])
    assert f"the manifest prepared in {prepared.parent}, as prepared" in capsys.readouterr().out
    assert ensure_manifest(exp) == used  # reused while the prepared manifest is unchanged
