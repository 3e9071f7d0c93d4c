"""torchvision's ResNets with torchvision's weights (`IMAGENET1K_V1` is the lab's
`pretrained=True`), found in torch's hub cache or downloaded there once."""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from boatray.backbones.entry import FLATTEN, GLOBAL_POOL, Entry, Layout, NamedWeights
from boatray.errors import BoatrayError

CUTS = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
LAYOUT: Layout = {"stem": ("conv1", "bn1", "relu", "maxpool"), "layer1": ("layer1",),
                  "layer2": ("layer2",), "layer3": ("layer3",), "layer4": ("layer4",),
                  "pool": ("avgpool", FLATTEN), "head": ("fc",)}
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _make(arch: str, num_classes: int, pooling: str, weights: object) -> nn.Module:
    try:
        model = getattr(torchvision.models, arch)(weights=weights)
    except OSError as exc:  # no network and nothing in the torch hub cache
        raise BoatrayError(f"cannot fetch torchvision weights {weights} for {arch}: "
                           f"{str(exc).splitlines()[0]}; use a local state-dict file") from None
    model.avgpool = GLOBAL_POOL[pooling]((1, 1))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _resolve(arch: str, weights: str) -> object:
    members = torchvision.models.get_model_weights(arch).__members__
    if weights in members:
        return members[weights]
    if "." in weights:
        try:
            found = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            found = None
        if found is not None and found in members.values():
            return found
    valid = ", ".join(["none", *members, "or a weights file"])
    raise BoatrayError(f"unknown weights {weights!r} for {arch}; valid: {valid}")


def _fetch(arch: str, weights: object) -> None:
    """torchvision's weights in torch's hub cache, downloaded there once (without internet,
    one line names the file to place and the ways out)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if cached.is_file():
        return
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(
            f"cannot download the {weights.name} weights of {arch} ({reason}): put {cached.name} "
            f"in {cached.parent}, or --set model.weights=/path/to/state_dict.pt, or "
            f"--set model.weights=none (random init)") from None


def _source(weights: object) -> dict[str, str]:
    return {"description": f"torchvision {weights} ({weights.url})",
            "file": Path(weights.url).name}


def entries() -> dict[str, Entry]:
    """The registry's torchvision ResNets."""
    return {arch: Entry(make=functools.partial(_make, arch), cuts=CUTS, layout=lambda _: LAYOUT,
                        weights=NamedWeights(functools.partial(_resolve, arch),
                                             functools.partial(_fetch, arch), _source))
            for arch in ARCHITECTURES}
