"""Which files are images, whether they are intact, and the log of what preparation left out.

Every image is decoded completely, exactly as the training pipeline will (`images.to_rgb`),
on a thread per core (PIL releases the GIL while it decodes): a JPEG whose end marker is
intact can still be damaged in the middle, which only a full decode finds. An image of more
pixels than a limit (`data.max_pixels`) is not decoded at all. The files left out are counted
and listed, never silently dropped.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from boatray.data.images import to_rgb

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 89_478_485
"""Images of more pixels are left out like unreadable ones (`data.max_pixels`); PIL's own
decompression-bomb threshold, far above any camera frame (MarDCT's are 800x240)."""


def is_image_name(path: Path) -> bool:
    """An image by its suffix (what the checker then opens)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_hidden(path: Path) -> bool:
    """Hidden files and archive clutter (`.DS_Store`, `._x.jpg`, `__MACOSX/`)."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def image_problem(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why `path` cannot be used as an image, or None when it decodes completely."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                return (f"{image.width}x{image.height} = {pixels:,} pixels, over the limit of "
                        f"{max_pixels:,} (data.max_pixels)")
            to_rgb(image)
        return None
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError:  # over twice PIL's own limit: not even opened
        return f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, PIL's own limit"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot decode ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


@dataclass
class Exclusions:
    """What preparation left out, counted by reason, with the files where there are files."""

    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    labels: Counter = field(default_factory=Counter)  # test label without a training class
    other: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few names

    def note(self, reason: str, example: str | None = None, count: int = 1) -> None:
        """Count `count` items left out for `reason` (keeping a few examples to show)."""
        self.other[reason] += count
        if example is not None and len(self.examples.setdefault(reason, [])) < 5:
            self.examples[reason].append(example)

    def lines(self) -> list[str]:
        """The printed summary: one line per reason, every unreadable file listed."""
        out = []
        if self.labels:
            total = sum(self.labels.values())
            out.append(f"excluded {total} test images whose label has no training class:")
            out += [f"  {count:5d}  {label}" for label, count in sorted(self.labels.items())]
        if self.unreadable:
            out.append(f"excluded {len(self.unreadable)} unreadable image files:")
            out += [f"  {path}: {problem}" for path, problem in self.unreadable]
        for reason, count in sorted(self.other.items()):
            shown = self.examples.get(reason, [])
            more = f" (e.g. {', '.join(shown)})" if shown else ""
            out.append(f"{reason}: {count}{more}")
        return out or ["nothing excluded"]


def keep_intact(paths: list[Path], exclusions: Exclusions,
                max_pixels: int = MAX_PIXELS) -> list[Path]:
    """The paths that are intact images of at most `max_pixels` pixels; the others are
    recorded in `exclusions`."""
    kept = []
    # the size is checked before decoding: PIL's own warning about large images is noise
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        problems = list(pool.map(lambda path: image_problem(path, max_pixels), paths))
    for path, problem in zip(paths, problems):
        if problem is None:
            kept.append(path)
        else:
            exclusions.unreadable.append((str(path), problem))
    return kept


def list_images(folder: Path, exclusions: Exclusions) -> list[Path]:
    """Image files directly in `folder`, sorted by name; other files are counted, not kept."""
    images = []
    for path in sorted(folder.iterdir()):
        if is_hidden(path):
            continue
        if path.is_dir():
            exclusions.note("ignored sub-folders of class folders", str(path))
        elif is_image_name(path):
            images.append(path)
        else:
            exclusions.note("ignored files that are not images", str(path))
    return images
