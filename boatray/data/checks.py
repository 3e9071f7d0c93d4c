"""Data that cannot make a study, refused before anything trains, in one line each.

A study needs two or more training classes, a training image of every class it trains, test
images of those classes, and a validation split that can rank models: images of at least
`MIN_VALID_CLASSES` classes (one class scores any model that always predicts it as perfect,
by macro F1 and accuracy alike). Training classes without a validation image are allowed (the
selection's macro F1 then averages over the classes it has) and named in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pandas as pd

from boatray.errors import BoatrayError

MIN_VALID_CLASSES = 2


def check_classes(frame: pd.DataFrame, listed: Counter, unreadable: list[tuple[str, str]]
                  ) -> None:
    """Refuse fewer than 2 training classes, and a class listed for training (`listed`:
    training images per class, before the integrity check) with no training image left."""
    classes = set(frame.label[frame.split == "train"])
    for label, count in sorted(listed.items()):
        if label not in classes:
            example = next((f" (e.g. {path}: {problem})" for path, problem in unreadable
                            if f"/{label}/" in path), "")
            raise BoatrayError(f"class {label!r} has no training image left: its {count} "
                               f"training image(s) cannot be read{example}; replace them or "
                               "remove the class")
    if len(classes) < 2:
        raise BoatrayError(f"only {len(classes)} training class ({', '.join(sorted(classes))}): "
                           "a classifier needs at least 2; add a folder of images per class")


def check_test(frame: pd.DataFrame, unknown: Iterable[str]) -> None:
    """Refuse a test split with no image of a training class (`unknown`: the test labels left
    out because no training class has them)."""
    if (frame.split == "test").any():
        return
    unknown = sorted(set(unknown))
    classes = sorted(set(frame.label[frame.split == "train"]))
    if unknown:
        raise BoatrayError(f"the test split's classes ({', '.join(unknown)}) are all unknown to "
                           f"training ({', '.join(classes)}): name the test folders as the "
                           "training ones")
    raise BoatrayError("the test split holds no image: add test/<class>/ images")


def check_selection(frame: pd.DataFrame) -> list[str]:
    """Refuse a validation split that cannot rank models; return a note naming the training
    classes it has no image of (empty when it has them all)."""
    valid = frame.label[frame.split == "valid"]
    if valid.empty:
        raise BoatrayError("the validation split is empty, and models are selected on it: set "
                           "data.valid_fraction > 0 or add a valid/ folder")
    if valid.nunique() < MIN_VALID_CLASSES:
        raise BoatrayError(
            f"the validation split holds images of {valid.nunique()} class "
            f"({', '.join(sorted(set(valid)))}), and a model that always predicts it scores "
            "perfectly there: raise data.valid_fraction or add valid/ images of more classes")
    missing = sorted(set(frame.label[frame.split == "train"]) - set(valid))
    if not missing:
        return []
    return [f"note: the validation split has no image of {len(missing)} training class(es) "
            f"({', '.join(missing)}): model selection's macro F1 leaves them out"]
