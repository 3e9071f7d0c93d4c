"""The raw MarDCT / ARGOS Venice boat layout, its label spellings and the two protocols.

Raw layout (folders, or the original zip archives extracted once into a cache): the training
folder `sc5/` (found by its `DBinfo.txt`) with one folder per class, and the test folder
`sc5-2013-Mar-Apr-Test-20130412/` (found by its `ground_truth.txt`, lines `FILE;Label`).
Test labels are spelled differently from the training folders (`normalise_label`); the
protocols (`PROTOCOLS`) say which classes are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from boatray.data import archives
from boatray.data.imagefiles import Exclusions, is_hidden, is_image_name, list_images
from boatray.errors import BoatrayError

PROTOCOLS = ("lab16", "full")
"""`full`: every training class folder that holds images (24 of the 25 that DBinfo.txt lists;
Lanciamaggioredi10m has 0 images), 4,774 images; a test image is kept when its normalised label
is a training class: 1,672 test images in 19 classes. `lab16`: the same normalisation, then only
the 16 LAB16_CLASSES, in training and test alike. From DBinfo.txt's per-class counts they hold
113+85+112+24+22+215+18+11+878+279+71+94+13+78+949+907 = 3,869 training images; the test set
keeps 1,324. Only `Lancia: fino 10 m` maps to Lanciafino10m; the `... Bianca`/`... Marrone`
variants are their own (non-lab16) classes."""
LAB16_CLASSES = (
    "Alilaguna", "Ambulanza", "Barchino", "Gondola", "Lanciafino10m", "Motobarca",
    "Motopontonerettangolare", "MotoscafoACTV", "Mototopo", "Patanella", "Polizia",
    "Raccoltarifiuti", "Sandoloaremi", "Topa", "VaporettoACTV", "Water",
)
LABEL_ALIASES = {"SnapshotAcqua": "Water"}
TRAIN_MARKER = "DBinfo.txt"
GROUND_TRUTH = "ground_truth.txt"
SEARCH_DEPTH = 3


def check_protocol(protocol: str) -> None:
    """Refuse a protocol name other than lab16 or full."""
    if protocol not in PROTOCOLS:
        raise BoatrayError(f"unknown protocol {protocol!r} (allowed: {', '.join(PROTOCOLS)})")


def normalise_label(label: str) -> str:
    """A ground_truth.txt label as a training folder name: no spaces or colons, aliases applied.

    `Vaporetto ACTV` -> VaporettoACTV, `Lancia: fino 10 m` -> Lanciafino10m, `Raccolta rifiuti`
    -> Raccoltarifiuti, `Snapshot Acqua` -> Water. `Snapshot Barca Multipla`, `Snapshot Barca
    Parziale` and `Mototopo corto` name no training class and are left out (counted).
    """
    name = re.sub(r"[\s:]", "", label)
    return LABEL_ALIASES.get(name, name)


def protocol_classes(protocol: str, training_classes: set[str]) -> set[str]:
    """The training classes a protocol keeps (test images are kept for exactly these)."""
    check_protocol(protocol)
    return training_classes & set(LAB16_CLASSES) if protocol == "lab16" else training_classes


def find_layout(source: Path, cache: Path) -> tuple[Path, Path]:
    """(training folder, test folder) under `source`, extracting zip archives there if needed."""
    if not source.is_dir():
        raise BoatrayError(f"data source is not a folder: {source}")
    train, test = _find(source, TRAIN_MARKER), _find(source, GROUND_TRUTH)
    if train is None or test is None:
        for archive in sorted(source.glob("*.zip")):
            unpacked = archives.unpacked(archive, cache)
            train = train or _find(unpacked, TRAIN_MARKER)
            test = test or _find(unpacked, GROUND_TRUTH)
    if train is None:
        raise BoatrayError(f"{source}: found neither an ImageFolder tree (train/, test/) nor "
                           f"MarDCT's training folder (sc5/ with {TRAIN_MARKER}, or sc5.zip)")
    if test is None:
        raise BoatrayError(f"{source}: found MarDCT's training folder {train} but no test "
                           f"folder with {GROUND_TRUTH} (nor a zip archive holding one)")
    return train, test


def read(source: Path, protocol: str, cache: Path, exclusions: Exclusions
         ) -> dict[str, list[tuple[Path, str]]]:
    """(path, class) pairs for train and test under `protocol`; what it leaves out is counted."""
    check_protocol(protocol)
    train_dir, test_dir = find_layout(source, cache)
    folders = {}
    for entry in sorted(train_dir.iterdir()):
        if entry.is_dir() and not is_hidden(entry):
            images = list_images(entry, exclusions)
            if images:
                folders[entry.name] = images
            else:
                exclusions.note("empty training class folders", entry.name)
    if not folders:
        raise BoatrayError(f"no images in the class folders of {train_dir}")
    kept = protocol_classes(protocol, set(folders))
    for name in sorted(set(folders) - kept):
        exclusions.note(f"training images of classes outside {protocol}", name,
                        count=len(folders[name]))
    train = [(path, name) for name in sorted(kept) for path in folders[name]]
    return {"train": train, "test": read_test(test_dir, kept, exclusions)}


def read_test(test_dir: Path, classes: set[str], exclusions: Exclusions
              ) -> list[tuple[Path, str]]:
    """(path, class) pairs from ground_truth.txt for the test images whose label is in `classes`."""
    text = (test_dir / GROUND_TRUTH).read_bytes().decode("utf-8-sig", errors="replace")
    seen: set[str] = set()
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, label = (part.strip() for part in line.partition(";"))
        if not sep or not name or not label:
            exclusions.note(f"malformed {GROUND_TRUTH} lines", f"line {number}")
            continue
        if name in seen:
            exclusions.note(f"repeated {GROUND_TRUTH} lines", f"line {number}")
            continue
        seen.add(name)
        path = test_dir / name
        if not path.resolve().is_relative_to(test_dir.resolve()):
            exclusions.note(f"{GROUND_TRUTH} lines naming a file outside the test folder", name)
        elif not path.is_file():
            exclusions.note(f"{GROUND_TRUTH} lines naming a missing file", name)
        elif normalise_label(label) in classes:
            items.append((path, normalise_label(label)))
        else:
            exclusions.labels[label] += 1
    unlisted = [path.name for path in sorted(test_dir.iterdir())
                if is_image_name(path) and not is_hidden(path) and path.name not in seen]
    if unlisted:
        exclusions.note(f"test images without a {GROUND_TRUTH} line", unlisted[0],
                        count=len(unlisted))
    return sorted(items)


def _find(root: Path, marker: str) -> Path | None:
    """The shallowest folder under `root` (at most SEARCH_DEPTH down) that holds `marker`."""
    for depth in range(SEARCH_DEPTH + 1):
        found = sorted(path.parent for path in root.glob("/".join(["*"] * depth + [marker]))
                       if not any(is_hidden(Path(part)) for part in path.relative_to(root).parts))
        if found:
            return found[0]
    return None
