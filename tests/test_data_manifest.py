"""ImageFolder trees, the stratified split, manifests, ensure_manifest, the CLI, bad input."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boatray import config
from boatray.config import SyntheticConfig
from boatray.data import checks, synthetic
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
    with pytest.raises(BoatrayError, match="class 'boat' has no training image: .* holds none"):
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


def test_a_jpeg_damaged_in_the_middle_is_found_by_the_full_decode(tree, tmp_path, capsys):
    victim = sorted((tree / "train" / "boat01").glob("*.jpg"))[0]
    data = victim.read_bytes()
    middle = (data.index(b"\xff\xda") + len(data)) // 2  # a stray marker in the middle of
    # the entropy-coded data, after the start-of-scan marker; the end marker stays
    victim.write_bytes(data[:middle] + b"\xff\xc0" + data[middle + 2:])
    with Image.open(victim) as image:
        image.verify()  # the header check and the end marker both pass
    frame, _ = read_manifest(prepare(tree, tmp_path / "out"))
    assert str(victim.resolve()) not in set(frame.path)
    printed = capsys.readouterr().out
    assert "excluded 1 unreadable image files:" in printed
    assert f"{victim}: cannot decode" in printed


def test_16_bit_and_other_modes_convert_to_rgb(tmp_path):
    from boatray.data.images import decode

    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (12, 1))
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")  # PIL reads it as 16/32-bit integers
    pixels = decode(str(tmp_path / "grey16.png"), (12, 40))
    assert pixels.shape == (12, 40, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert abs(int(pixels[0, 20, 0]) - 131) <= 2  # the middle of the ramp stays grey
    rgba = Image.fromarray(np.full((12, 40, 4), 90, dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    rgba.convert("P").save(tmp_path / "palette.png")
    for name in ("rgba.png", "palette.png"):
        assert decode(str(tmp_path / name), (12, 40)).shape == (12, 40, 3)


def test_unwritable_output_folder_is_one_line(tree, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    outs = [tmp_path / "a-file", tmp_path / "a-file" / "below"]
    if not os.access(locked, os.W_OK):  # root writes anywhere: this case only for other users
        outs.append(locked)
    try:
        for out in outs:
            assert main(["prepare", "--source", str(tree), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: cannot write to the output folder {out}: ")
            assert err.count("\n") == 1
    finally:
        locked.chmod(0o755)


def test_a_failed_prepare_leaves_no_empty_folder(tmp_path):
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    (tmp_path / "src" / "test" / "a").mkdir(parents=True)
    with pytest.raises(BoatrayError, match="class 'a' has no training image"):
        prepare(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_prepared_folder_is_a_data_source(tree, tmp_path, capsys):
    prepared = prepare(tree, tmp_path / "prepared")
    # the experiment's results go to this test's own folder, not the working directory
    exp = config.load(None, [f"storage_path={tmp_path / 'results'}"], data=str(prepared.parent))
    used = ensure_manifest(exp)
    assert used == tmp_path / "results" / "smoke" / "data" / "manifest.parquet"
    pd.testing.assert_frame_equal(read_manifest(used)[0], read_manifest(prepared)[0])
    assert f"the manifest prepared in {prepared.parent}, as prepared" in capsys.readouterr().out
    assert ensure_manifest(exp) == used  # reused while the prepared manifest is unchanged


def test_data_that_cannot_make_a_study_is_refused_in_one_line(tree, tmp_path, capsys):
    """One class; a class whose training images are all unreadable; a valid/ class without
    training images; test classes all unknown to training: `prepare` stops before anything
    trains, in one line each (also through the CLI)."""
    one = tmp_path / "one"
    shutil.copytree(tree / "train" / "boat00", one / "train" / "boat00")
    shutil.copytree(tree / "test" / "boat00", one / "test" / "boat00")
    with pytest.raises(BoatrayError, match=r"only 1 training class \(boat00\): a classifier "
                                           "needs at least 2"):
        prepare(one, tmp_path / "out1")
    assert main(["prepare", "--source", str(one), "--out", str(tmp_path / "out1")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    for image in (broken / "train" / "boat02").iterdir():
        image.write_bytes(b"not a jpeg")
    with pytest.raises(BoatrayError, match="class 'boat02' has no training image left: its 5 "
                                           r"training image\(s\) cannot be read \(e.g. "):
        prepare(broken, tmp_path / "out2")

    orphan = tmp_path / "orphan"
    shutil.copytree(tree, orphan)
    shutil.copytree(tree / "test" / "boat01", orphan / "valid" / "boat09")
    shutil.copytree(tree / "train" / "boat01", orphan / "valid" / "boat01")
    with pytest.raises(BoatrayError, match="class 'boat09' has validation images but no "
                                           "training image"):
        prepare(orphan, tmp_path / "out3")

    unknown = tmp_path / "unknown"
    shutil.copytree(tree / "train", unknown / "train")
    shutil.copytree(tree / "test" / "boat00", unknown / "test" / "Gondola")
    with pytest.raises(BoatrayError, match=r"the test split's classes \(Gondola\) are all "
                                           r"unknown to training \(boat00, boat01, boat02\)"):
        prepare(unknown, tmp_path / "out4")


def test_a_validation_split_that_cannot_rank_models_is_refused():
    """The chosen rule: a validation split of fewer than 2 classes is refused (every model
    that predicts its one class scores perfectly); missing classes are named in a note."""
    frame = pd.DataFrame({"label": ["a", "a", "b", "b", "c", "a", "b"],
                          "split": ["train"] * 5 + ["valid", "test"]})
    with pytest.raises(BoatrayError, match=r"validation split holds images of 1 class \(a\)"):
        checks.check_selection(frame)
    with pytest.raises(BoatrayError, match="validation split is empty"):
        checks.check_selection(frame[frame.split != "valid"])
    frame.loc[6, "split"] = "valid"
    assert checks.check_selection(frame) == [
        "note: the validation split has no image of 1 training class(es) (c): model "
        "selection's macro F1 leaves them out"]


def test_images_over_the_pixel_limit_are_counted_and_left_out(tree, tmp_path, capsys,
                                                              monkeypatch, recwarn):
    """No DecompressionBombWarning: the size is checked before anything is decoded (PIL's
    own threshold lowered here, so that a small image stands for a 12000x12000 JPEG)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = tree / "train" / "boat00" / "big.jpg"
    Image.new("RGB", (60, 30)).save(big)  # over PIL's 1000: it would warn
    frame, _ = read_manifest(prepare(tree, tmp_path / "out", max_pixels=1500))
    assert str(big) not in set(frame.path)
    printed = capsys.readouterr().out
    assert f"{big}: 60x30 = 1,800 pixels, over the limit of 1,500 (data.max_pixels)" in printed
    kept, _ = read_manifest(prepare(tree, tmp_path / "again", max_pixels=1800))
    assert str(big) in set(kept.path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
