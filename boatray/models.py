"""The model registry (torchvision ResNets, the lab's BetterCNN), weights, freezing, cut points.

`build(name, weights, num_classes, pooling)` is the one way to make a model (timm style: each
architecture registers itself with `@register`). A model knows nothing of training; this module
adds what the study varies around it:

- weights: a torchvision weights name (`IMAGENET1K_V1` is the lab's `pretrained=True`), a local
  state-dict file, or `none`;
- freeze specs by the first trainable stage (`fc`, `layer4`, ..., `all`), `gradual_schedule`
  for gradual unfreezing, `train_mode` that keeps frozen BatchNorm layers in eval mode, and
  `param_groups` with discriminative learning rates;
- cut points: `trunk(model, upto)` and `suffix(model, after)` share the model's modules and
  compose to the model, so features and the frozen-prefix cache run exactly its layers.
"""

from __future__ import annotations

import copy
import functools
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from boatray.errors import BoatrayError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
"""A ResNet's trainable stages, input to output; a freeze spec names the first trainable one."""

CUT_POINTS = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
"""Where `trunk` may end and `suffix` begin; `pool` is global pooling + flatten (the features)."""

GRADUAL = ("fc", "layer4", "layer3", "layer2", "layer1", "all")
"""The phases of gradual unfreezing, head first."""

_REGISTRY: dict[str, Callable[[int, str, object], nn.Module]] = {}
_GLOBAL_POOL = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


def register(name: str) -> Callable:
    """Register a builder `fn(num_classes, pooling, torchvision_weights_or_None) -> model`."""

    def add(fn: Callable) -> Callable:
        _REGISTRY[name] = fn
        return fn

    return add


def names() -> tuple[str, ...]:
    """Every registered model name."""
    return tuple(sorted(_REGISTRY))


def _resnet(arch: str, num_classes: int, pooling: str, weights: object) -> nn.Module:
    try:
        model = getattr(torchvision.models, arch)(weights=weights)
    except OSError as exc:  # no network and nothing in the torch hub cache
        raise BoatrayError(f"cannot fetch torchvision weights {weights} for {arch}: "
                           f"{str(exc).splitlines()[0]}; use a local state-dict file") from None
    model.avgpool = _GLOBAL_POOL[pooling]((1, 1))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(_arch)(functools.partial(_resnet, _arch))


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


@register("bettercnn")
def _bettercnn(num_classes: int, pooling: str, weights: object) -> nn.Module:
    return BetterCNN(num_classes, pooling)  # no torchvision weights exist: `weights` is None


def build(name: str, weights: str | None = "none", num_classes: int = 16,
          pooling: str = "avg") -> nn.Module:
    """A registered model with a new head of `num_classes` and global `avg` or `max` pooling.

    `weights`: `none`, a torchvision weights name of that architecture (`IMAGENET1K_V1`, or the
    full `ResNet50_Weights.IMAGENET1K_V1`) or a state-dict file (see `load_weights`).
    """
    if name not in _REGISTRY:
        raise BoatrayError(f"unknown model {name!r}; choose one of {', '.join(names())}")
    if pooling not in _GLOBAL_POOL:
        raise BoatrayError(f"unknown pooling {pooling!r}; choose avg or max")
    weights = "none" if weights is None else str(weights)
    if weights.lower() == "none":
        return _REGISTRY[name](num_classes, pooling, None)
    file = Path(weights).expanduser()
    if file.is_file():
        model = _REGISTRY[name](num_classes, pooling, None)
        load_weights(model, file, name)
        return model
    return _REGISTRY[name](num_classes, pooling, _torchvision_weights(name, weights))


def fetch_weights(name: str, weights: str) -> None:
    """Make torchvision weights of `name` available before a run starts: found in torch's hub
    cache, or downloaded there once. Without internet, one line names the ways out."""
    if weights.lower() == "none" or Path(weights).expanduser().is_file():
        return
    found = _torchvision_weights(name, weights)
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


def _torchvision_weights(name: str, weights: str) -> object:
    try:
        members = torchvision.models.get_model_weights(name).__members__
    except ValueError:  # not a torchvision architecture
        members = {}
    if weights in members:
        return members[weights]
    if "." in weights:
        try:
            found = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            found = None
        if found is not None and found in members.values():
            return found
    if "/" in weights or weights.endswith((".pt", ".pth")):
        raise BoatrayError(f"weights file not found: {weights}")
    valid = ", ".join(["none", *members, "or a state-dict file"])
    what = (f"unknown weights {weights!r} for {name}" if members
            else f"{name} has no torchvision weights (got {weights!r})")
    raise BoatrayError(f"{what}; valid: {valid}")


def load_weights(model: nn.Module, path: str | Path, name: str = "the model") -> None:
    """Load a state-dict file (`torch.load(weights_only=True)`) into `model`, strictly.

    Accepted: a plain state dict, or one under a `model`/`state_dict` key (a checkpoint); the
    `module.` prefix of DDP and `_orig_mod.` of torch.compile are removed. The head is loaded
    when its shape fits and left new otherwise (an ImageNet file's 1,000-class head), and may
    be absent. Anything else (not a state dict, missing or extra keys, wrong shapes) is a
    one-line BoatrayError naming the file.
    """
    path = Path(path)
    state = _read_state_dict(path)
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


def _unwrap(model: nn.Module) -> nn.Module:
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
    return "fc3" if isinstance(_unwrap(model), BetterCNN) else "fc"


def _stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The model as an ordered table stage -> modules; running them in order is `model(x)`."""
    model = _unwrap(model)
    if isinstance(model, torchvision.models.ResNet):
        return {"stem": [model.conv1, model.bn1, model.relu, model.maxpool],
                "layer1": [model.layer1], "layer2": [model.layer2], "layer3": [model.layer3],
                "layer4": [model.layer4], "pool": [model.avgpool, nn.Flatten(1)],
                "fc": [model.fc]}
    if isinstance(model, BetterCNN):
        return {"pool": [model.conv1, model.act, model.down, model.conv2, model.act, model.down,
                         model.pool, nn.Flatten(1)],
                "fc": [model.fc1, model.act, model.fc2, model.act, model.fc3]}
    raise BoatrayError(f"{type(model).__name__} is not a boatray model")


def _cut(model: nn.Module, stage: str) -> tuple[list[str], list[str]]:
    table = list(_stage_modules(model))
    if stage not in table[:-1]:
        raise BoatrayError(f"unknown cut point {stage!r} for {_name_of(model)}; "
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
    table = _stage_modules(model)
    return nn.Sequential(*(m for s in _cut(model, upto)[0] for m in table[s]))


def suffix(model: nn.Module, after: str = "pool") -> nn.Sequential:
    """The rest of the model after `after`: `suffix(model, s)(trunk(model, s)(x)) == model(x)`."""
    table = _stage_modules(model)
    return nn.Sequential(*(m for s in _cut(model, after)[1] for m in table[s]))


def _trainable_stages(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Stages that hold parameters, input to output, with their parameters."""
    out = []
    for stage, modules in _stage_modules(model).items():
        params = [p for m in modules for p in m.parameters()]
        if params:
            out.append((stage, params))
    return out


def _name_of(model: nn.Module) -> str:
    return "bettercnn" if isinstance(_unwrap(model), BetterCNN) else "this ResNet"


def freeze(model: nn.Module, spec: str) -> None:
    """Make the stages from `spec` (the first trainable one) to the head trainable, the rest not.

    Specs: `fc` (head only), `layer4`, `layer3`, `layer2`, `layer1`, `all`. `gradual` is a
    schedule of these (`gradual_schedule`). BetterCNN trains from scratch: only `all`.
    """
    stages = _trainable_stages(model)
    names_ = [s for s, _ in stages]
    if isinstance(_unwrap(model), BetterCNN) and spec != "all":
        raise BoatrayError(f"bettercnn trains from scratch: freeze must be 'all', got {spec!r}")
    if spec not in GRADUAL or (spec != "all" and spec not in names_):
        raise BoatrayError(f"unknown freeze spec {spec!r}; choose one of "
                           f"{', '.join(GRADUAL)} (or gradual, as a schedule)")
    first = 0 if spec == "all" else names_.index(spec)
    for index, (_, params) in enumerate(stages):
        for param in params:
            param.requires_grad_(index >= first)


def gradual_schedule(epoch: int, every: int) -> str:
    """The freeze spec of gradual unfreezing at 0-based `epoch`: `fc` for the first `every`
    epochs, then one stage more every `every` epochs (`layer4`, ..., `layer1`), then `all`."""
    return GRADUAL[min(epoch // max(every, 1), len(GRADUAL) - 1)]


def frozen_prefix(spec: str) -> str | None:
    """The last cut point that `spec` leaves entirely frozen (None for `all`/`gradual`): its
    trunk computes the same activations every epoch when there is no random augmentation."""
    if spec not in GRADUAL[:-1]:
        return None
    return "pool" if spec == "fc" else CUT_POINTS[STAGES.index(spec) - 1]


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, then every BatchNorm layer whose parameters are all frozen back to eval,
    so frozen stages keep their running statistics (and compute what the cache stored)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def param_groups(model: nn.Module, lr: float, lr_decay: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters, one per stage (key `stage`).

    The head gets `lr`, and each earlier stage `lr * lr_decay**k`, k stages before the head
    (discriminative learning rates; `lr_decay=1` gives every group `lr`).
    """
    stages = _trainable_stages(model)
    groups = []
    for k, (stage, params) in enumerate(reversed(stages)):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": lr * lr_decay ** k, "stage": stage})
    return groups[::-1]


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require gradients (without any DDP/compile prefix)."""
    return {name for name, p in _unwrap(model).named_parameters() if p.requires_grad}
