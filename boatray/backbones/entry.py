"""What the registry knows of one architecture: how to make it, its stages, its named weights.

A `Layout` is the model as an ordered table stage -> the names of the modules that run in it
(`FLATTEN` stands for a flatten the model does in its forward), its cut points then `head`:
running every stage's modules in order is `model(x)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Layout = dict[str, tuple[str, ...]]
FLATTEN = "(flatten)"
"""A `Layout` item that is not one of the model's modules: `nn.Flatten(1)` (no parameters)."""

GLOBAL_POOL = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
STRIDE_CUTS = ("stem", "stride4", "stride8", "stride16", "stride32", "pool")
"""Cut points of a backbone grouped by output stride: the stem, four stages (output strides 4,
8, 16, 32) and `pool` (global pooling to the feature vector); the head follows."""


@dataclass(frozen=True)
class NamedWeights:
    """An architecture's named pretrained weights.

    `resolve(name)` checks the name (a one-line error listing the valid ones) and returns what
    `Entry.make` takes; `fetch(resolved)` makes them available on this machine before a run
    (one line naming the file to place, and where, when it cannot); `source(resolved)` says
    where they come from (`description`, `file`, where known `sha256`).
    """

    resolve: Callable[[str], object]
    fetch: Callable[[object], None]
    source: Callable[[object], dict[str, str]]


@dataclass(frozen=True)
class Entry:
    """A registered architecture.

    `make(num_classes, pooling, resolved_weights_or_None)` builds it with a new head;
    `cuts` are its cut points; `layout(model)` is the `Layout` of a model `make` built;
    `weights` its named weights (None: only `none` or a weights file); `from_scratch`: a
    network only ever trained whole (the freeze spec `all`).
    """

    make: Callable[[int, str, object], nn.Module]
    cuts: tuple[str, ...]
    layout: Callable[[nn.Module], Layout]
    weights: NamedWeights | None = None
    from_scratch: bool = False
    input_size: tuple[int, int] = (224, 224)
    """A size the network takes, to read its shapes and feature width on the meta device."""
