"""The raw MarDCT layout and the lab16 / full protocols: a tiny raw tree and the real sample."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boatray.data import mardct
from boatray.data.manifest import prepare, read_manifest
from boatray.errors import BoatrayError

TEST_FOLDER = "sc5-2013-Mar-Apr-Test-20130412"
TRAIN_COUNTS = {"VaporettoACTV": 4, "Lanciafino10m": 3, "Lanciafino10mBianca": 3, "Water": 4,
                "Mototopo": 3, "Caorlina": 1}
GROUND_TRUTH = {  # test file -> label as spelled in ground_truth.txt
    "t01.jpg": "Vaporetto ACTV", "t02.jpg": "Lancia: fino 10 m",
    "t03.jpg": "Lancia: fino 10 m Bianca", "t04.jpg": "Snapshot Acqua",
    "t05.jpg": "Snapshot Barca Multipla", "t06.jpg": "Snapshot Barca Parziale",
    "t07.jpg": "Mototopo corto", "t08.jpg": "Mototopo",
    "t09.jpg": "Lancia: maggiore di 10 m Bianca",
}
# Every label spelling of the real ground_truth.txt and the training class it means (None: none).
SPELLINGS = {
    "Alilaguna": "Alilaguna", "Ambulanza": "Ambulanza", "Barchino": "Barchino",
    "Gondola": "Gondola", "Lancia: fino 10 m": "Lanciafino10m",
    "Lancia: fino 10 m Bianca": "Lanciafino10mBianca",
    "Lancia: fino 10 m Marrone": "Lanciafino10mMarrone",
    "Lancia: maggiore di 10 m Bianca": "Lanciamaggioredi10mBianca",
    "Lancia: maggiore di 10 m Marrone": "Lanciamaggioredi10mMarrone",
    "Motobarca": "Motobarca", "Motopontone rettangolare": "Motopontonerettangolare",
    "Motoscafo ACTV": "MotoscafoACTV", "Mototopo": "Mototopo", "Mototopo corto": None,
    "Patanella": "Patanella", "Polizia": "Polizia", "Raccolta rifiuti": "Raccoltarifiuti",
    "Sandolo a remi": "Sandoloaremi", "Snapshot Acqua": "Water",
    "Snapshot Barca Multipla": None, "Snapshot Barca Parziale": None, "Topa": "Topa",
    "Vaporetto ACTV": "VaporettoACTV",
}


def write_jpeg(path: Path, shade: int = 100) -> None:
    """A tiny valid JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 24, 3), shade, dtype=np.uint8)).save(path)


@pytest.fixture
def raw_tree(tmp_path: Path) -> Path:
    """A tiny raw MarDCT layout: sc5/ (with an empty class folder) and the test folder."""
    root = tmp_path / "mardct"
    for name, count in TRAIN_COUNTS.items():
        for number in range(count):
            write_jpeg(root / "sc5" / name / f"{name}_{number}.jpg")
    (root / "sc5" / "Lanciamaggioredi10m").mkdir()
    (root / "sc5" / "DBinfo.txt").write_text("DB sc5\n\nNum categories = 7\n")
    test = root / TEST_FOLDER
    for name in GROUND_TRUTH:
        write_jpeg(test / name)
    (test / "ground_truth.txt").write_text(
        "".join(f"{name};{label}\n" for name, label in GROUND_TRUTH.items()))
    return root


def test_label_normalisation():
    assert mardct.normalise_label("Vaporetto ACTV") == "VaporettoACTV"
    assert mardct.normalise_label("Lancia: fino 10 m Bianca") == "Lanciafino10mBianca"
    assert mardct.normalise_label(" Snapshot Acqua\r") == "Water"
    assert mardct.normalise_label("Mototopo corto") == "Mototopocorto"


@pytest.mark.parametrize("protocol, classes, test_files", [
    ("lab16", ["Lanciafino10m", "Mototopo", "VaporettoACTV", "Water"],
     {"t01.jpg", "t02.jpg", "t04.jpg", "t08.jpg"}),
    ("full", ["Caorlina", "Lanciafino10m", "Lanciafino10mBianca", "Mototopo", "VaporettoACTV",
              "Water"], {"t01.jpg", "t02.jpg", "t03.jpg", "t04.jpg", "t08.jpg"}),
])
def test_protocol_rules_on_a_tiny_raw_tree(raw_tree, tmp_path, capsys, protocol, classes,
                                           test_files):
    frame, found = read_manifest(prepare(raw_tree, tmp_path / "out", protocol=protocol))
    assert found == classes
    test = frame[frame.split == "test"]
    assert {Path(p).name for p in test.path} == test_files
    for path, label in zip(test.path, test.label):
        assert label == mardct.normalise_label(GROUND_TRUTH[Path(path).name])
    train = frame[frame.split != "test"]
    assert train.label.value_counts().to_dict() == {c: TRAIN_COUNTS[c] for c in classes}
    printed = capsys.readouterr().out
    for name in set(GROUND_TRUTH) - test_files:
        assert GROUND_TRUTH[name] in printed  # every left-out label is listed
    assert re.search(r"class\s+train\s+valid\s+test", printed)


def test_zip_archives_give_the_same_manifest(raw_tree, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.make_archive(str(archives / "sc5"), "zip", raw_tree, "sc5")
    shutil.make_archive(str(archives / TEST_FOLDER), "zip", raw_tree / TEST_FOLDER)  # flat
    from_folders, _ = read_manifest(prepare(raw_tree, tmp_path / "a", protocol="full"))
    from_zips, _ = read_manifest(prepare(archives, tmp_path / "b", protocol="full"))

    def rows(frame):
        return sorted(zip(frame.path.map(lambda p: Path(p).name), frame.label, frame.split))

    assert rows(from_zips) == rows(from_folders)
    assert all(p.startswith(str(tmp_path / "b" / "raw")) for p in from_zips.path)
    stamp = next((tmp_path / "b" / "raw").glob("sc5/.boatray-extracted.json"))
    mtime = stamp.stat().st_mtime_ns
    prepare(archives, tmp_path / "b", protocol="full")
    assert stamp.stat().st_mtime_ns == mtime  # extracted once, then reused


def test_ground_truth_problems_are_counted_and_listed(raw_tree, tmp_path, capsys):
    truth = raw_tree / TEST_FOLDER / "ground_truth.txt"
    truth.write_text(truth.read_text() + "gone.jpg;Mototopo\nno separator\n\nt01.jpg;Mototopo\n")
    write_jpeg(raw_tree / TEST_FOLDER / "unlisted.jpg")
    frame, _ = read_manifest(prepare(raw_tree, tmp_path / "out", protocol="lab16"))
    assert (frame.split == "test").sum() == 4
    printed = capsys.readouterr().out
    assert "ground_truth.txt lines naming a missing file: 1 (e.g. gone.jpg)" in printed
    assert "malformed ground_truth.txt lines: 1" in printed
    assert "repeated ground_truth.txt lines: 1" in printed
    assert "test images without a ground_truth.txt line: 1 (e.g. unlisted.jpg)" in printed


def test_raw_tree_without_test_folder_is_one_line_error(raw_tree, tmp_path):
    shutil.rmtree(raw_tree / TEST_FOLDER)
    with pytest.raises(BoatrayError, match="no test folder with ground_truth.txt"):
        prepare(raw_tree, tmp_path / "out")


def test_unknown_protocol_is_one_line_error(raw_tree, tmp_path):
    with pytest.raises(BoatrayError, match=r"unknown protocol 'lab24' \(allowed: lab16, full\)"):
        prepare(raw_tree, tmp_path / "out", protocol="lab24")


def test_dbinfo_counts_give_the_full_set_protocol_sizes(mardct_sample):
    """DBinfo.txt lists the FULL set's per-class counts: lab16 keeps 3,869 of 4,774."""
    counts = {name: int(n) for n, name in re.findall(
        r"^\s*(\d+)\s+(\S+)\s*$", (mardct_sample / "sc5" / "DBinfo.txt").read_text(), re.MULTILINE)}
    assert sum(counts.values()) == 4774
    assert sum(1 for n in counts.values() if n) == 24
    assert sum(counts[name] for name in mardct.LAB16_CLASSES) == 3869


def test_real_sample_full(mardct_sample, tmp_path):
    frame, classes = read_manifest(prepare(mardct_sample, tmp_path, protocol="full"))
    assert len(classes) == 24
    assert (frame.split != "test").sum() == 594
    assert frame.label[frame.split == "valid"].isin(classes).all()


@pytest.mark.parametrize("protocol", ["lab16", "full"])
def test_every_sample_label_is_mapped_or_excluded(mardct_sample, tmp_path, protocol):
    frame, classes = read_manifest(prepare(mardct_sample, tmp_path, protocol=protocol))
    lines = (mardct_sample / TEST_FOLDER / "ground_truth.txt").read_text().splitlines()
    truth = dict(line.split(";") for line in lines if line.strip())
    assert set(truth.values()) <= set(SPELLINGS), "a label spelling this test does not know"
    keep = set(mardct.LAB16_CLASSES) if protocol == "lab16" else set(classes)
    expected = {name: SPELLINGS[label] for name, label in truth.items()
                if SPELLINGS[label] in keep}
    test = frame[frame.split == "test"]
    assert dict(zip(test.path.map(lambda p: Path(p).name), test.label)) == expected
    assert len(classes) == (16 if protocol == "lab16" else 24)


def test_ground_truth_paths_stay_inside_the_test_folder(raw_tree, tmp_path, capsys):
    truth = raw_tree / TEST_FOLDER / "ground_truth.txt"
    escaped = "../sc5/Mototopo/Mototopo_0.jpg"
    assert (raw_tree / TEST_FOLDER / escaped).is_file()
    truth.write_text(truth.read_text() + f"{escaped};Mototopo\n")
    frame, _ = read_manifest(prepare(raw_tree, tmp_path / "out", protocol="lab16"))
    test_paths = set(frame.path[frame.split == "test"])
    assert not any("sc5/Mototopo" in path for path in test_paths)
    assert (f"ground_truth.txt lines naming a file outside the test folder: 1 (e.g. {escaped})"
            in capsys.readouterr().out)
