"""The one image pipeline: decode + resize on the CPU (uint8), normalise on the device.

Training, feature extraction and prediction all use it, so a model always sees exactly the
pixels it was trained on. It equals the lab's
`Compose([Resize((h, w)), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])`, split in two
so that uint8 tensors (4x smaller than float32) cross process and host-to-device boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from boatray.errors import BoatrayError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(path: str, size: tuple[int, int]) -> np.ndarray:
    """Read one image as RGB uint8 of shape (height, width, 3), resized to `size` = (h, w)."""
    height, width = size
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            return np.array(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BoatrayError(f"cannot decode image {path}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, decoded completely. 16- and 32-bit greyscale and float
    images are scaled to 8 bits first: PIL's own conversion clips them (a 16-bit PNG would turn
    near-white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() <= 65535 else pixels.max()
        image = Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def decode_batch(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Decode many images into one uint8 array of shape (n, height, width, 3)."""
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode(path, size)
    return out


def to_chw(hwc: np.ndarray) -> torch.Tensor:
    """A uint8 (..., h, w, 3) array as a uint8 (..., 3, h, w) tensor (no copy of the pixels)."""
    tensor = torch.from_numpy(np.ascontiguousarray(hwc))
    return tensor.movedim(-1, -3)


def normalize(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (n, 3, h, w) on any device to float32, scaled to [0, 1] and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255.0
    out = (batch.float() - mean) / std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 CHW tensor, label index) pairs from file paths; optional random horizontal flip."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: tuple[int, int],
                 augment: bool = False) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.size = tuple(size)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = to_chw(decode(self.paths[index], self.size))
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


def reference_transform(size: tuple[int, int]):
    """The lab's torchvision transform, for equivalence tests and the plain-PyTorch benchmarks."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(tuple(size)), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
