"""A generated ImageFolder tree with learnable classes, for the tests and the smoke experiment.

Every image is a boat-like shape (a hull with a cabin) on a water texture. A class is a hull
colour and a hull length (three lengths, hues spread over the colour wheel), so a small CNN
separates the classes within a couple of epochs even at tiny sizes; position, length, colour,
waves and pixel noise are jittered so that it still has something to learn. Classes shrink
geometrically from the first to the last (`imbalance` = largest / smallest), like MarDCT's.
Deterministic for a seed; a few hundred small JPEGs take about a second.
"""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from boatray.config import SyntheticConfig, to_dict
from boatray.errors import BoatrayError

MARKER = "synthetic.json"
SPLITS = ("train", "test")
HULL_LENGTHS = (0.3, 0.5, 0.7)  # fraction of the image width, cycled over the classes


def class_names(count: int) -> list[str]:
    """The generated classes' names, already in sorted (= class index) order."""
    return [f"boat{index:02d}" for index in range(count)]


def class_sizes(per_class: int, count: int, imbalance: float, minimum: int) -> list[int]:
    """Images per class, from `per_class` down to `per_class / imbalance` geometrically."""
    ratios = np.power(float(imbalance), -np.linspace(0.0, 1.0, count)) if count > 1 else [1.0]
    return [max(minimum, round(per_class * r)) for r in ratios]


def generate(out_dir: str | Path, cfg: SyntheticConfig, seed: int) -> Path:
    """Write `out_dir/{train,test}/<class>/*.jpg` and return `out_dir` (the tree's root).

    A folder that an earlier `generate` wrote (it holds synthetic.json) is replaced; any
    other folder that already has train/ or test/ is refused, so nothing of the user's is lost.
    """
    root = Path(out_dir)
    _clear(root)
    rng = np.random.default_rng(seed)
    height, width = cfg.image_size
    names = class_names(cfg.classes)
    sizes = {"train": class_sizes(cfg.train_per_class, cfg.classes, cfg.imbalance, 2),
             "test": class_sizes(cfg.test_per_class, cfg.classes, cfg.imbalance, 1)}
    for split in SPLITS:
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(sizes[split][index]):
                pixels = _image(rng, index, cfg.classes, height, width)
                Image.fromarray(pixels).save(folder / f"{name}_{number:04d}.jpg", quality=92)
    settings = {"seed": seed, **to_dict(cfg)}
    (root / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return root


def _clear(root: Path) -> None:
    if (root / MARKER).is_file():
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
        (root / MARKER).unlink()
    elif any((root / split).exists() for split in SPLITS):
        raise BoatrayError(f"{root} already holds train/ or test/ that boatray did not generate; "
                           "choose an empty folder for synthetic data")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BoatrayError(f"cannot create folder {root}: {exc.strerror}") from None


def _class_colour(index: int, count: int) -> np.ndarray:
    hue = index / count
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95), dtype=np.float32) * 255.0


def _water(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = np.array([25.0, 70.0, 105.0], dtype=np.float32) + rng.uniform(-12, 12, 3)
    deep = np.array([10.0, 35.0, 60.0], dtype=np.float32)
    image = base + (deep - base) * rows
    phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(20, 40)
    waves = np.sin(frequency * rows + 6.0 * cols + phase) * np.sin(70.0 * cols + 3.0 * phase)
    return image + 10.0 * waves


def _image(rng: np.random.Generator, index: int, count: int, height: int,
           width: int) -> np.ndarray:
    image = _water(rng, height, width)
    length = int(width * HULL_LENGTHS[index % len(HULL_LENGTHS)] * rng.uniform(0.9, 1.1))
    hull_height = max(2, int(height * rng.uniform(0.16, 0.22)))
    left = int(rng.integers(0, max(1, width - length)))
    top = int(np.clip(height * rng.uniform(0.4, 0.65), 1, height - hull_height))
    colour = _class_colour(index, count) + rng.uniform(-15, 15, 3)
    image[top:top + hull_height, left:left + length] = colour
    cabin_height = max(1, hull_height // 2)
    cabin_left = left + length // 4
    image[max(0, top - cabin_height):top, cabin_left:cabin_left + length // 3] = 0.6 * colour + 90
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
