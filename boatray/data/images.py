"""The one image pipeline: decode + resize on the CPU (uint8), normalise on the device.

Training, feature extraction and prediction all use it, so a model always sees exactly the
pixels it was trained on. It equals the lab's
`Compose([Resize((h, w)), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])`, split in two
so that uint8 tensors (4x smaller than float32) cross process and host-to-device boundaries.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
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


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_on(paths: Sequence[str], size: tuple[int, int], device: torch.device
              ) -> tuple[torch.Tensor, list[str]]:
    """Decode and resize many images on `device`: uint8 (n, 3, height, width) there, and per
    image '' or why it could not be decoded (its pixels then stay zero).

    JPEGs go through `torchvision.io.decode_jpeg` on that device (nvJPEG on a GPU) and are
    resized there (bilinear with antialiasing, like PIL's); whatever it cannot decode (other
    formats, CMYK) goes through `decode` (PIL). On a CPU the pixels equal `decode`'s for JPEGs
    already at `size` (both are libjpeg-turbo) and lie within a few levels of them resized.
    """
    from torchvision.transforms.v2.functional import resize

    out = torch.zeros((len(paths), 3, *size), dtype=torch.uint8, device=device)
    errors = [""] * len(paths)
    files = {}
    for i, path in enumerate(paths):
        try:
            files[i] = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            errors[i] = f"cannot decode image {path}: {exc}"
    decoded = _decode_jpegs({i: data for i, data in files.items()
                             if data[:3].tobytes() == JPEG_MAGIC}, device)
    for i in files:
        try:
            out[i] = (to_chw(decode(str(paths[i]), size)).to(device) if i not in decoded
                      else decoded[i] if tuple(decoded[i].shape[1:]) == tuple(size)
                      else resize(decoded[i], list(size), antialias=True))
        except BoatrayError as exc:
            errors[i] = str(exc)
    return out, errors


def _decode_jpegs(jpegs: dict[int, np.ndarray], device: torch.device
                  ) -> dict[int, torch.Tensor]:
    """RGB uint8 (3, h, w) on `device` of each JPEG torchvision decodes (all in one call where
    they all decode); none where torchvision has no image decoding (deprecated in 0.29 in
    favour of TorchCodec)."""
    with warnings.catch_warnings():  # torchvision's deprecation notice is not boatray's
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            return {}
        data = {i: torch.from_numpy(raw) for i, raw in jpegs.items()}
        try:
            return dict(zip(data, decode_jpeg(list(data.values()), mode=ImageReadMode.RGB,
                                              device=device))) if data else {}
        except RuntimeError:  # one bad JPEG fails the batch: each alone
            found = {}
            for i, raw in data.items():
                with contextlib.suppress(RuntimeError):
                    found[i] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            return found


def to_chw(hwc: np.ndarray) -> torch.Tensor:
    """A uint8 (..., h, w, 3) array as a uint8 (..., 3, h, w) tensor (no copy of the pixels)."""
    tensor = torch.from_numpy(np.ascontiguousarray(hwc))
    return tensor.movedim(-1, -3)


@functools.cache
def _scale(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std (x 255) as tensors on `device`, made once per device:
    building them per batch would copy them from the host, a stall on a GPU."""
    with torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def normalize(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (n, 3, h, w) on any device to float32, scaled to [0, 1] and ImageNet-normalised."""
    mean, std = _scale(batch.device)
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
