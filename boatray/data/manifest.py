"""The manifest: one parquet table of every image an experiment uses, with its label and split.

`manifest.parquet` has the columns `path` (absolute), `label`, `label_idx` (int64, the index of
`label` in the sorted training class names) and `split` (train, valid or test). `prepare` makes
it from an ImageFolder tree (`train/`, optional `valid/`, `test/`, each with class folders; a
zip of one is read too) or from the raw MarDCT layout (see `boatray.data.mardct`, where the
protocols apply). Without a `valid/` folder, a seeded stratified split carves the validation
set out of the training images. Every image is checked for integrity first; what is left out
is counted and printed, never silently dropped.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from boatray.config import Experiment, to_dict
from boatray.data import archives, checks, mardct, synthetic
from boatray.data.imagefiles import MAX_PIXELS, Exclusions, is_hidden, keep_intact, list_images
from boatray.errors import BoatrayError
from boatray.results import atomic_write_parquet, atomic_write_text

MANIFEST = "manifest.parquet"
SUMMARY = "prepare.txt"
INPUTS = "manifest.inputs.json"
SPLITS = ("train", "valid", "test")
COLUMNS = ("path", "label", "label_idx", "split")

Items = dict[str, list[tuple[Path, str]]]  # split -> (image path, label)


def prepare(source: str | Path, out_dir: str | Path, protocol: str = "lab16",
            valid_fraction: float = 0.15, seed: int = 0, max_pixels: int = MAX_PIXELS) -> Path:
    """Write `out_dir/manifest.parquet` from `source`, print the per-class counts, return its path.

    `protocol` (lab16 or full) applies to the raw MarDCT layout; an ImageFolder tree is taken
    as it is. Zip archives are extracted once under `out_dir/raw/`. Images of more than
    `max_pixels` pixels are left out like unreadable ones. Data that cannot make a study is
    refused (data.checks).
    """
    mardct.check_protocol(protocol)
    if not 0.0 <= valid_fraction < 1.0:
        raise BoatrayError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    source, out_dir = Path(source).expanduser(), Path(out_dir)
    if not source.exists():
        raise BoatrayError(f"data source not found: {source}")
    created = not out_dir.exists()
    _make_folder(out_dir)
    try:
        return _prepare(source, out_dir, protocol, valid_fraction, seed, max_pixels)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed prepare leaves no empty folder behind
        raise


def _prepare(source: Path, out_dir: Path, protocol: str, valid_fraction: float, seed: int,
             max_pixels: int) -> Path:
    exclusions = Exclusions()
    items, described = _collect(source, protocol, out_dir / "raw", exclusions)
    frame, classes = _assemble(items, exclusions, max_pixels)
    checks.check_classes(frame, Counter(label for _, label in items.get("train", [])),
                         exclusions.unreadable)
    checks.check_test(frame, exclusions.labels)
    if items.get("valid"):
        validation = "validation from the valid/ folder"
    else:
        validation = f"validation: {valid_fraction:.0%} of each class, seed {seed}"
        frame.loc[frame.split == "train", "split"] = np.where(
            stratified_valid(frame.label[frame.split == "train"].tolist(), valid_fraction, seed),
            "valid", "train")
    frame = frame.sort_values(["split", "label_idx", "path"], key=_split_order,
                              ignore_index=True)
    path = atomic_write_parquet(out_dir / MANIFEST, frame)
    headline = (f"{described}: {len(classes)} training classes, "
                f"{_test_class_count(frame)} test classes; {validation}")
    summary = "\n".join([headline, count_table(frame), *exclusions.lines(), f"manifest: {path}"])
    atomic_write_text(out_dir / SUMMARY, summary + "\n")
    print(summary)
    return path


def read_manifest(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A manifest (its file, or the folder holding it) and its sorted training class names."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise BoatrayError(f"manifest not found: {path} (run `python -m boatray.data prepare`)")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise BoatrayError(f"cannot read manifest {path}: {exc}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise BoatrayError(f"manifest {path} lacks the columns {', '.join(missing)}")
    classes = sorted(frame.label[frame.split == "train"].unique())
    index = {name: i for i, name in enumerate(classes)}
    if not classes or frame.label.map(index).ne(frame.label_idx).any():
        raise BoatrayError(f"manifest {path}: labels and label_idx disagree with the sorted "
                           "training classes; prepare it again")
    return frame, classes


def ensure_manifest(exp: Experiment) -> Path:
    """The experiment's manifest under results/<experiment>/data/, made only when needed.

    With `data.source` null, a synthetic set is generated there first. A source folder that
    `prepare --out` wrote (it holds manifest.parquet) is used as prepared. A manifest made from
    the same inputs (source, protocol, valid fraction, seed, synthetic settings) is reused.
    """
    data_dir = exp.layout.data
    source = exp.data.source
    prepared = Path(source) / MANIFEST if source else None
    if prepared is not None and not prepared.is_file():
        prepared = None
    inputs = {"source": str(Path(source).expanduser().resolve()) if source else None,
              "protocol": exp.data.protocol, "valid_fraction": exp.data.valid_fraction,
              "seed": exp.seed, "max_pixels": exp.data.max_pixels,
              "synthetic": None if source else to_dict(exp.data.synthetic),
              "prepared": prepared and prepared.stat().st_mtime_ns}
    manifest, stamp = data_dir / MANIFEST, data_dir / INPUTS
    if _still_valid(manifest, stamp, inputs):
        print(f"data: reusing {manifest} (same inputs)")
        return manifest
    stamp.unlink(missing_ok=True)
    if prepared is not None:
        frame, classes = read_manifest(prepared)
        checks.check_classes(frame, Counter(), [])
        checks.check_test(frame, ())
        path = atomic_write_parquet(manifest, frame)
        print(f"data: the manifest prepared in {source}, as prepared (data.protocol and "
              f"data.valid_fraction apply to raw sources only): {len(classes)} training "
              f"classes\n{count_table(frame)}")
    else:
        if source is None:
            tree = synthetic.generate(data_dir / "synthetic", exp.data.synthetic, exp.seed)
            print(f"SYNTHETIC images generated in {tree} (data.source is null)")
            source = tree
        path = prepare(source, data_dir, exp.data.protocol, exp.data.valid_fraction, exp.seed,
                       exp.data.max_pixels)
    atomic_write_text(stamp, json.dumps(inputs, indent=2) + "\n")
    return path


def stratified_valid(labels: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the items that go to validation: about `fraction` of every class.

    Seeded; a class of n >= 2 items keeps at least one in training, a class of one keeps it.
    The result depends only on the labels' order, so give them in a stable (sorted) order.
    """
    labels = np.asarray(labels, dtype=object)
    chosen = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        count = min(len(members) - 1, int(np.floor(len(members) * fraction + 0.5)))
        if count > 0:
            chosen[rng.choice(members, size=count, replace=False)] = True
    return chosen


def count_table(frame: pd.DataFrame) -> str:
    """Images per class and split, with totals, as printable text."""
    table = pd.crosstab(frame.label, frame.split).reindex(columns=list(SPLITS), fill_value=0)
    table.loc["total"] = table.sum()
    return table.rename_axis("class").reset_index().to_string(index=False)


def find_imagefolder(root: Path) -> Path | None:
    """The folder that holds `train/` (root itself or one level down), or None."""
    if (root / "train").is_dir():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not is_hidden(c)]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    return None


def read_imagefolder(root: Path, exclusions: Exclusions) -> Items:
    """(path, label) pairs per split from `root/{train,valid,test}/<class>/`."""
    if not (root / "test").is_dir():
        raise BoatrayError(f"ImageFolder tree {root} has train/ but no test/ folder")
    items: Items = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        items[split] = []
        for entry in sorted(folder.iterdir()):
            if is_hidden(entry):
                continue
            if not entry.is_dir():
                exclusions.note(f"ignored files outside class folders in {split}/", str(entry))
                continue
            images = list_images(entry, exclusions)
            if not images and split == "train":
                raise BoatrayError(f"class {entry.name!r} has no training image: {entry} holds "
                                   "none; add images or remove the folder")
            if not images:
                exclusions.note("empty class folders", str(entry))
            items[split] += [(path, entry.name) for path in images]
    return items


def _collect(source: Path, protocol: str, cache: Path, exclusions: Exclusions
             ) -> tuple[Items, str]:
    root = source
    if source.is_file():
        if source.suffix.lower() != ".zip":
            raise BoatrayError(f"data source {source} is a file but not a .zip archive")
        root = archives.unpacked(source, cache)
    tree = find_imagefolder(root)
    if tree is not None:
        return read_imagefolder(tree, exclusions), f"ImageFolder tree {tree}"
    return mardct.read(root, protocol, cache, exclusions), f"MarDCT {protocol} from {source}"


def _assemble(items: Items, exclusions: Exclusions, max_pixels: int
              ) -> tuple[pd.DataFrame, list[str]]:
    """Integrity-checked rows; evaluation images need a training class to be kept."""
    train = items.get("train", [])
    intact = set(keep_intact([path for path, _ in train], exclusions, max_pixels))
    rows = [(path, label, "train") for path, label in train if path in intact]
    classes = sorted({label for _, label, _ in rows})
    if not classes:
        raise BoatrayError("no usable training images found"
                           + (" (all were unreadable)" if train else ""))
    for split in ("valid", "test"):
        known = []
        for path, label in items.get(split, []):
            if label in classes:
                known.append((path, label))
            elif split == "valid":
                raise BoatrayError(f"class {label!r} has validation images but no training "
                                   f"image: add training images of it or remove its "
                                   f"validation folder ({Path(path).parent})")
            else:
                exclusions.labels[label] += 1
        intact = set(keep_intact([path for path, _ in known], exclusions, max_pixels))
        rows += [(path, label, split) for path, label in known if path in intact]
    index = {name: i for i, name in enumerate(classes)}
    frame = pd.DataFrame({
        "path": [os.path.abspath(path) for path, _, _ in rows],
        "label": [label for _, label, _ in rows],
        "label_idx": np.array([index[label] for _, label, _ in rows], dtype=np.int64),
        "split": [split for _, _, split in rows],
    })
    return frame, classes


def _make_folder(folder: Path) -> None:
    """Create `folder` if needed and make sure this process can write there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise BoatrayError(f"cannot write to the output folder {folder}: "
                           f"{exc.strerror or exc}") from None


def _split_order(column: pd.Series) -> pd.Series:
    return column.map(SPLITS.index) if column.name == "split" else column


def _test_class_count(frame: pd.DataFrame) -> int:
    return frame.label[frame.split == "test"].nunique()


def _still_valid(manifest: Path, stamp: Path, inputs: dict) -> bool:
    if not (manifest.is_file() and stamp.is_file()):
        return False
    try:
        if json.loads(stamp.read_text()) != inputs:
            return False
        first = pd.read_parquet(manifest, columns=["path"]).path.iloc[0]
    except (OSError, ValueError, IndexError):
        return False
    return Path(first).is_file()
