"""Freeze specs, one meaning on every backbone: what trains and what stays frozen.

`head` trains the head only, `lastK` the last K stages and the head, `all` everything, and
`gradual` is a schedule of these over the epochs (`spec_at`: the one place it is special).
Frozen BatchNorm layers stay in eval mode (`train_mode`), and `param_groups` gives each stage
its own (discriminative) learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from boatray import models
from boatray.errors import BoatrayError

FREEZE_SPECS = ("head", "last1", "last2", "last3", "last4", "all", "gradual")
"""What trains: the head only, the last k stages + head, everything, or gradual unfreezing."""


GRADUAL = FREEZE_SPECS[:-1]
"""The phases of gradual unfreezing, head first."""


def _trainable_stages(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Stages that hold parameters, input to output (the head last), with their parameters."""
    out = []
    for stage, modules in models.stage_modules(model).items():
        params = [p for m in modules for p in m.parameters()]
        if params:
            out.append((stage, params))
    return out


def _first_trainable(stages: Sequence[str], spec: str, what: str) -> int:
    """Index into `stages` (input to output, head last) of the first stage `spec` trains."""
    if spec not in GRADUAL:
        raise BoatrayError(f"unknown freeze spec {spec!r}; choose one of "
                           f"{', '.join(GRADUAL)} (or gradual, as a schedule)")
    if spec == "all":
        return 0
    first = len(stages) - 1 - (0 if spec == "head" else int(spec.removeprefix("last")))
    if first < 1:
        raise BoatrayError(f"freeze {spec!r}: {what} has only {len(stages) - 1} stages "
                           "before its head")
    return first


def freeze(model: nn.Module, spec: str) -> None:
    """Make what `spec` trains trainable and the rest not: `head` (the head only), `lastK`
    (the last K stages and the head), `all`. `gradual` is a schedule of these
    (`gradual_schedule`). models.BetterCNN trains from scratch: only `all`."""
    stages = _trainable_stages(model)
    if isinstance(models.unwrap(model), models.BetterCNN) and spec != "all":
        raise BoatrayError(f"bettercnn trains from scratch: freeze must be 'all', got {spec!r}")
    first = _first_trainable([s for s, _ in stages], spec, type(models.unwrap(model)).__name__)
    for index, (_, params) in enumerate(stages):
        for param in params:
            param.requires_grad_(index >= first)


def spec_at(spec: str, epoch: int, every: int) -> str:
    """The freeze spec in force at 0-based `epoch`: `spec` itself, or for `gradual` the phase
    its schedule has reached (`gradual_schedule`)."""
    return gradual_schedule(epoch, every) if spec == "gradual" else spec


def gradual_schedule(epoch: int, every: int) -> str:
    """The freeze spec of gradual unfreezing at 0-based `epoch`: `head` for the first `every`
    epochs, then one stage more every `every` epochs (`last1`, ..., `last4`), then `all`."""
    return GRADUAL[min(epoch // max(every, 1), len(GRADUAL) - 1)]


def frozen_prefix(name: str, spec: str) -> str | None:
    """The last cut point of model `name` that `spec` leaves entirely frozen (None for
    `all`/`gradual`): its trunk computes the same activations every epoch when there is no
    random augmentation."""
    if spec not in GRADUAL[:-1]:
        return None
    if spec == "head":
        return "pool"
    cuts = models.cut_points(name)
    stages = (*cuts[:-1], "head")  # the stages that hold parameters (pool has none)
    return cuts[_first_trainable(stages, spec, name) - 1]


def stage_table(name: str) -> list[dict[str, str]]:
    """What each freeze spec trains on model `name`: its stages and their module names."""
    model = models.build(name, "none", 2)
    where = {id(m): n for n, m in model.named_modules()}
    stages = [s for s, _ in _trainable_stages(model)]
    table = models.stage_modules(model)
    rows = []
    for spec in ("all",) if isinstance(model, models.BetterCNN) else GRADUAL:
        try:
            trained = stages[_first_trainable(stages, spec, name):]
        except BoatrayError:  # a spec deeper than this backbone
            continue
        modules = [where[id(m)] for s in trained for m in table[s] if id(m) in where]
        rows.append({"freeze": spec, "stages": " + ".join(trained),
                     "modules": ", ".join(dict.fromkeys(modules))})
    return rows


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
    return {name for name, p in models.unwrap(model).named_parameters() if p.requires_grad}


def describe(name: str, weights: str) -> dict:
    """The backbone as the report names it: model, weights and their source, and what each
    freeze spec trains (`stage_table`)."""
    return {"model": name, "weights": models.weights_source(name, weights),
            "stages": stage_table(name)}
