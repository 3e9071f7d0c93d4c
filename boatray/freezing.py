"""Freeze specs on a network: what trains and what stays frozen, as its Backbone says.

`head` trains the head only, `lastK` the last K stages and the head, `all` everything, and
`gradual` is a schedule of these over the epochs (`spec_at`: the one place it is special).
Which stages a spec trains on which backbone is `Backbone.trains`; here the network's
parameters are set accordingly, frozen BatchNorm layers stay in eval mode (`train_mode`), and
`param_groups` gives each stage its own (discriminative) learning rate.
"""

from __future__ import annotations

from torch import nn

from boatray import models
from boatray.backbones.backbone import FREEZE_SPECS, GRADUAL

__all__ = ["FREEZE_SPECS", "GRADUAL", "describe", "freeze", "frozen_prefix", "gradual_schedule",
           "param_groups", "spec_at", "stage_table", "train_mode", "trainable_names"]


def freeze(model: nn.Module, spec: str) -> None:
    """Make what `spec` trains trainable and the rest not: `head` (the head only), `lastK`
    (the last K stages and the head), `all`. `gradual` is a schedule of these
    (`gradual_schedule`). A network trained from scratch (BetterCNN) takes only `all`."""
    backbone = models.backbone_of(model)
    trained = set(backbone.trains(spec))
    for group, params in backbone.group_parameters(model):
        for param in params:
            param.requires_grad_(group in trained)


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
    return models.backbone(name).frozen_prefix(spec)


def stage_table(name: str) -> list[dict[str, str]]:
    """What each freeze spec trains on model `name`: its stages and their module names."""
    return models.backbone(name).stage_table()


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
    groups = []
    for k, (stage, params) in enumerate(reversed(models.backbone_of(model)
                                                 .group_parameters(model))):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": lr * lr_decay ** k, "stage": stage})
    return groups[::-1]


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require gradients (without any DDP/compile prefix)."""
    return {name for name, p in models.unwrap(model).named_parameters() if p.requires_grad}


def describe(name: str, weights: str) -> dict:
    """The backbone as the report names it: model, weights and their source, its feature
    width, and what each freeze spec trains (`stage_table`)."""
    backbone = models.backbone(name)
    return {"model": name, "weights": backbone.weights_source(weights),
            "feature_width": backbone.feature_width, "stages": backbone.stage_table()}
