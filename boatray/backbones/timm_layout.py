"""A timm CNN's stages, read from the network itself: `feature_info` says where its output stride
reaches 4, 8, 16 and 32, `forward_features` where the feature maps end, `forward_head(...,
pre_logits=True)` what pools them into the feature vector and `get_classifier()` the head.

`layout(model)` traces one forward pass of each on the meta device (no compute, no memory)
with a hook on every module at the depth those names need, and accepts the network only when
the pass is those modules run one after another, each taking exactly what the one before it
returned, the same in training and in eval mode: then running the stages in order is the
model. Anything else (a ViT's stages all at stride 16, branches that merge, functional dropout
before the classifier) is a one-line `BoatrayError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from boatray.backbones.entry import STRIDE_CUTS, Layout
from boatray.errors import BoatrayError

REDUCTIONS = (4, 8, 16, 32)
NEEDS = ("boatray takes timm CNNs whose stages reduce the image by 4, 8, 16 and 32 and whose "
         "forward runs its modules one after another (e.g. timm/convnext_tiny, "
         "timm/efficientnet_b0, timm/regnety_016, timm/mobilenetv3_large_100)")


@dataclass
class _Call:
    name: str
    input: object
    output: object


def layout(model: nn.Module, name: str, input_size: tuple[int, int]) -> Layout:
    """The `Layout` of the timm CNN `model` (named `name` in errors): stem, stride4 ..
    stride32, pool, head."""
    stages = _stages(model, name)
    classifier = _classifier_name(model, name)
    modules = _modules_at_depth(model, [module for _, module in stages] + [classifier])
    x = torch.zeros(2, 3, *input_size, device=next(model.parameters()).device)
    was_training = model.training
    try:
        model.eval()
        in_eval = _trace(model, modules, model, x)
        model.train()
        whole = _trace(model, modules, model, x)
        features = _trace(model, modules, model.forward_features, x)
        pooled = _trace(model, modules, lambda f: model.forward_head(f, pre_logits=True),
                        features[1])
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(f"{name}: cannot trace its forward pass on a "
                           f"{input_size[0]}x{input_size[1]} image ({first}); {NEEDS}") from None
    finally:
        model.train(was_training)
    if [c.name for c in whole[0]] != [c.name for c in in_eval[0]]:
        raise BoatrayError(f"{name}: its forward runs other modules in training than in eval "
                           f"mode; {NEEDS}")
    for (calls, result), start in ((whole, x), (in_eval, x), (features, x),
                                   (pooled, features[1])):
        _check_chain(calls, start, result, name)
    if pooled[1].dim() != 2:
        raise BoatrayError(f"{name}: its pooled features have shape {list(pooled[1].shape)[1:]}, "
                           f"not a vector; {NEEDS}")
    feature_names, pool_names = _kept(model, features[0]), _kept(model, pooled[0])
    order, split = _kept(model, whole[0]), len(feature_names) + len(pool_names)
    if order[:split] != feature_names + pool_names or classifier not in order[split:]:
        raise BoatrayError(f"{name}: its forward is not forward_features, then forward_head's "
                           f"pooling, then its classifier {classifier}; {NEEDS}")
    return {**_by_stride(feature_names, stages, name), "pool": tuple(pool_names),
            "head": tuple(order[split:])}


def _stages(model: nn.Module, name: str) -> list[tuple[int, str]]:
    """(output stride, module) of the stages at strides 4 to 32, from `feature_info`."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise BoatrayError(f"{name} has no feature_info (its stages by output stride); {NEEDS}")
    reductions = [int(stage["reduction"]) for stage in info]
    if any(r not in reductions for r in REDUCTIONS) or max(reductions) != 32:
        raise BoatrayError(f"{name}: its stages reduce the image by "
                           f"{', '.join(map(str, reductions))} (feature_info), not 4, 8, 16 and "
                           f"32 (a ViT keeps one stride; boatray does not cut it); {NEEDS}")
    return [(int(stage["reduction"]), stage["module"]) for stage in info
            if stage["reduction"] >= REDUCTIONS[0]]


def _classifier_name(model: nn.Module, name: str) -> str:
    classifier = model.get_classifier()
    found = [n for n, m in model.named_modules() if m is classifier]
    if not found or isinstance(classifier, nn.Identity):
        raise BoatrayError(f"{name}: get_classifier() names no module of it; {NEEDS}")
    return found[0]


def _modules_at_depth(model: nn.Module, targets: list[str]) -> list[str]:
    """The model's children, each replaced by its own children while it holds a target."""
    out = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            full = prefix + child_name
            if any(t.startswith(full + ".") for t in targets):
                visit(full + ".", child)
            else:
                out.append(full)

    visit("", model)
    return out


def _trace(model: nn.Module, names: list[str], forward: Callable, x: torch.Tensor
           ) -> tuple[list[_Call], torch.Tensor]:
    """(the calls of the modules `names` while `forward(x)` runs, in order; its result)."""
    calls: list[_Call] = []

    def hook(name: str) -> Callable:
        return lambda _, args, output: calls.append(
            _Call(name, args[0] if len(args) == 1 else None, output))

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            result = forward(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, result


def _check_chain(calls: list[_Call], start: torch.Tensor, result: object, name: str) -> None:
    """Each call takes exactly what the one before returned, and the last returns `result`."""
    previous = start
    for call in calls:
        if call.input is not previous or not isinstance(call.output, torch.Tensor):
            raise BoatrayError(f"{name}: {call.name} does not take what the module before it "
                               f"returned (its forward does more than run its modules in "
                               f"order); {NEEDS}")
        previous = call.output
    if result is not previous:
        raise BoatrayError(f"{name}: its forward changes what its last module returned; {NEEDS}")


def _kept(model: nn.Module, calls: list[_Call]) -> list[str]:
    """The names of the calls, without those of `nn.Identity` (they change nothing)."""
    return [c.name for c in calls if not isinstance(model.get_submodule(c.name), nn.Identity)]


def _by_stride(names: list[str], stages: list[tuple[int, str]], name: str) -> Layout:
    """The feature modules grouped by output stride: the stem up to the first stride-4 stage,
    each stride up to and including its last stage, and the modules after the stride-32 stage
    (e.g. EfficientNet's conv_head and bn2) with stride 32."""
    try:
        first = names.index(stages[0][1])
        last = [max(names.index(m) for r, m in stages if r == stride) for stride in REDUCTIONS]
    except ValueError:
        raise BoatrayError(f"{name}: a feature_info stage does not run in forward_features; "
                           f"{NEEDS}") from None
    if last != sorted(last) or first > last[0]:
        raise BoatrayError(f"{name}: its feature_info stages run out of order; {NEEDS}")
    bounds = [0, first, *(i + 1 for i in last[:-1]), len(names)]
    return {stage: tuple(names[a:b])
            for stage, a, b in zip(STRIDE_CUTS[:-1], bounds, bounds[1:])}
