"""The model registry: torchvision ResNets, EfficientNet-Lite0, the lab's BetterCNN, and any timm
CNN as `timm/<name>`; one `Backbone` per name and process answers everything about it.

`backbone(name)` is built once per process (the registry is the only place that knows which
names exist). `build(name, weights, num_classes, pooling)` is the one way to make a network;
`trunk(model, upto)` and `suffix(model, after)` cut a network `build` made into two parts that
share its modules and compose to it, so features and the frozen-prefix cache run exactly its
layers. What trains is boatray.freezing's, from the Backbone's answers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from boatray.backbones import bettercnn, lite0, resnets, timm_cnns, weightfiles
from boatray.backbones.backbone import TAG, Backbone, forward_flops, unwrap
from boatray.backbones.bettercnn import BetterCNN
from boatray.backbones.entry import STRIDE_CUTS, Entry
from boatray.errors import BoatrayError

__all__ = ["BetterCNN", "Backbone", "all_cut_points", "backbone", "backbone_of", "build",
           "cut_points", "fetch_weights", "forward_flops", "load_state", "names", "stage_modules",
           "suffix", "trunk", "unwrap", "weights_source"]

_REGISTRY: dict[str, Entry] = {**resnets.entries(), lite0.NAME: lite0.ENTRY,
                               "bettercnn": bettercnn.ENTRY}
_FAMILIES = {timm_cnns.PREFIX: timm_cnns.entry}
"""Name prefixes that stand for a whole library's networks, and their entry for a name."""


def names() -> tuple[str, ...]:
    """Every registered model name (and, apart, any `timm/<name>` of a timm CNN)."""
    return tuple(sorted(_REGISTRY))


@functools.cache
def _entry(name: str) -> Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, family in _FAMILIES.items():
        if name.startswith(prefix):
            return family(name)
    raise BoatrayError(f"unknown model {name!r}; choose one of {', '.join(names())}, or "
                       f"{timm_cnns.PREFIX}<a timm CNN> (e.g. timm/convnext_tiny)")


@functools.cache
def backbone(name: str) -> Backbone:
    """The Backbone of model `name`, built once per process (a one-line error for a name the
    registry does not know or a network it cannot cut into stages)."""
    return Backbone(name, _entry(name))


def backbone_of(model: nn.Module) -> Backbone:
    """The Backbone of a network `build` made (also inside a DDP or torch.compile wrapper)."""
    name = getattr(unwrap(model), TAG, None)
    if name is None:
        raise BoatrayError(f"{type(unwrap(model)).__name__} was not built by "
                           "boatray.models.build")
    return backbone(name)


def cut_points(name: str) -> tuple[str, ...]:
    """Where `trunk` may end and `suffix` begin on model `name` (without building it)."""
    return _entry(name).cuts


def all_cut_points() -> tuple[str, ...]:
    """Every cut point of any model, each once."""
    return tuple(dict.fromkeys([c for entry in _REGISTRY.values() for c in entry.cuts]
                               + list(STRIDE_CUTS)))


def build(name: str, weights: str | None = "none", num_classes: int = 16,
          pooling: str = "avg") -> nn.Module:
    """Model `name` with a new head of `num_classes` and global `avg` or `max` pooling
    (`Backbone.build`). `weights`: `none`, a named weights of that architecture
    (torchvision's `IMAGENET1K_V1` or the full `ResNet50_Weights.IMAGENET1K_V1`;
    efficientnet_lite0's packaged `IMAGENET`; a timm CNN's `pretrained`), or a weights file
    (`.safetensors`, `.pth`)."""
    return backbone(name).build(weights, num_classes, pooling)


def trunk(model: nn.Module, upto: str = "pool") -> nn.Sequential:
    """The prefix of a network `build` made, up to and including `upto` (shares its modules):
    `pool` gives the pooled features (2,048-d for resnet50), a stage (`layer3`, `stride16`)
    its feature maps."""
    return backbone_of(model).trunk(model, upto)


def suffix(model: nn.Module, after: str = "pool") -> nn.Sequential:
    """The rest of the network after `after`: `suffix(model, s)(trunk(model, s)(x)) ==
    model(x)`."""
    return backbone_of(model).suffix(model, after)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
               name: str = "the model") -> None:
    """Load a state dict read from `path` into a network `build` made: strictly, its head only
    where the shape fits; a mismatch is one line naming `path` (weightfiles.load_state)."""
    weightfiles.load_state(model, state, backbone_of(model).head, path, name)


def stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """A network `build` made as an ordered table stage -> modules (cut points, then head)."""
    return backbone_of(model).stage_modules(model)


def fetch_weights(name: str, weights: str) -> None:
    """Make the named weights of `name` available before a run starts: torchvision's and timm's
    found on this machine or downloaded once (without internet, one line names the file to
    place, and where); efficientnet_lite0's in the installed lite0 extra."""
    backbone(name).fetch_weights(weights)


def weights_source(name: str, weights: str) -> dict[str, str]:
    """Which weights `build(name, weights)` starts from and where they come from: a
    `description`, and for files their `file` and `sha256`."""
    return backbone(name).weights_source(weights)

