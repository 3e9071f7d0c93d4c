"""`Backbone`: everything boatray asks of one registered architecture, answered once.

It reads its entry's `Layout` off one copy of the network on the meta device (no compute, no
memory) and then knows its stages grouped by output stride, its cut points, its head, its
pooled feature width, its FLOPs per image, its weights' source, and what each freeze spec
trains; it builds the network, and cuts any network it built into a trunk and a suffix that
share its modules.

Freeze specs mean the same on every backbone: `head` trains the head only, `lastK` the last K
stages with parameters and the head, `all` everything, `gradual` is a schedule of these.
Parameters in `pool` (ConvNeXt's head norm, MobileNetV3's conv_head after its pooling) train
and freeze with the stage before it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from boatray.backbones import weightfiles
from boatray.backbones.entry import FLATTEN, GLOBAL_POOL, Entry
from boatray.errors import BoatrayError

FREEZE_SPECS = ("head", "last1", "last2", "last3", "last4", "all", "gradual")
"""What trains: the head only, the last k stages + head, everything, or gradual unfreezing."""
GRADUAL = FREEZE_SPECS[:-1]
"""The phases of gradual unfreezing, head first."""
TAG = "boatray_backbone"
"""The attribute `Backbone.build` sets on a network: its backbone's name."""


class Backbone:
    """One registered architecture (`boatray.models.backbone(name)` gives the process's one)."""

    def __init__(self, name: str, entry: Entry) -> None:
        self.name, self.entry = name, entry
        self.cuts = entry.cuts
        self._meta: dict[tuple[int, str], nn.Module] = {}
        self._sizes: set[tuple[int, ...]] = set()
        model = self._meta_model(2, "avg")
        self.layout = entry.layout(model)
        self.stages = (*self.cuts, "head")
        if tuple(self.layout) != self.stages:
            raise BoatrayError(f"{name}: its stages {', '.join(self.layout)} are not its cut "
                               f"points {', '.join(self.stages)}")
        self.head = self.layout["head"][-1]
        """The classifier: its shape follows the number of classes."""
        self.feature_width = self.output_shape(entry.input_size, "pool")[0]
        self.groups = self._freeze_groups(model)
        """(group, its stages) of the stages with parameters, input to output, head last."""
        self.freeze_specs = ("all",) if entry.from_scratch else GRADUAL

    def _meta_model(self, num_classes: int, pooling: str) -> nn.Module:
        key = (num_classes, pooling)
        if key not in self._meta:
            with torch.device("meta"):
                self._meta[key] = self.entry.make(num_classes, pooling, None).eval()
        return self._meta[key]

    def _freeze_groups(self, model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        groups: list[tuple[str, tuple[str, ...]]] = []
        for stage, modules in self.stage_modules(model).items():
            if not any(True for m in modules for _ in m.parameters()):
                continue
            if stage == "pool" and groups:  # pooling with parameters trains with the stage before
                groups[-1] = (groups[-1][0], (*groups[-1][1], stage))
            else:
                groups.append((stage, (stage,)))
        return tuple(groups)

    # ------------------------------------------------------------------ the network

    def build(self, weights: str | None = "none", num_classes: int = 16,
              pooling: str = "avg") -> nn.Module:
        """The network with a new head of `num_classes` and global `avg` or `max` pooling.

        `weights`: `none` (random), a named weights of this architecture, or a weights file
        (`.safetensors`, `.pth`/`.pt`: see weightfiles.read_state_dict), loaded strictly except
        for a head of another shape.
        """
        if pooling not in GLOBAL_POOL:
            raise BoatrayError(f"unknown pooling {pooling!r}; choose avg or max")
        weights = "none" if weights is None else str(weights)
        file = Path(weights).expanduser()
        if weights.lower() == "none":
            model = self.entry.make(num_classes, pooling, None)
        elif file.is_file():
            model = self.entry.make(num_classes, pooling, None)
            weightfiles.load_state(model, weightfiles.read_state_dict(file), self.head, file,
                                   self.name)
        else:
            model = self.entry.make(num_classes, pooling, self.resolve(weights))
        setattr(model, TAG, self.name)
        return model

    def resolve(self, weights: str) -> object:
        """The named weights `weights` of this architecture, as its entry takes them."""
        if weightfiles.looks_like_file(weights):
            raise BoatrayError(f"weights file not found: {weights}")
        if self.entry.weights is None:
            raise BoatrayError(f"{self.name} has no named weights (got {weights!r}); valid: "
                               "none, or a weights file (.safetensors, .pth)")
        return self.entry.weights.resolve(weights)

    def fetch_weights(self, weights: str) -> None:
        """Make the weights `build(weights)` needs available here before a run starts; one
        line naming the file to place, and where, when they cannot be had."""
        if weights.lower() == "none" or Path(weights).expanduser().is_file():
            return
        self.entry.weights.fetch(self.resolve(weights))

    def check_weights(self, weights: str) -> None:
        """That `build(weights)` will load: a weights file is read and checked against the
        network's shapes (on the meta device), a weights name against the valid ones."""
        file = Path(weights).expanduser()
        if weights.lower() == "none":
            return
        if not file.is_file():
            self.resolve(weights)
            return
        weightfiles.check_state(self._meta_model(2, "avg").state_dict(),
                                weightfiles.read_state_dict(file), self.head, file, self.name)

    def weights_source(self, weights: str) -> dict[str, str]:
        """Which weights `build(weights)` starts from and where they come from: `weights`, a
        `description`, and for files their `file` and `sha256`."""
        file = Path(weights).expanduser()
        if weights.lower() == "none":
            source = {"description": "random initialisation (no pretrained weights)"}
        elif file.is_file():
            source = {"description": f"weights file {file.resolve()}", "file": file.name,
                      "sha256": weightfiles.file_sha256(file)}
        else:
            source = self.entry.weights.source(self.resolve(weights))
        return {"weights": weights, **source}

    def check_size(self, image_size: Sequence[int]) -> None:
        """That the network takes images of `image_size` (a transformer may take one size
        only): one forward pass on the meta device, once per size and process."""
        size = tuple(image_size)
        if size in self._sizes:
            return
        try:
            with torch.no_grad():
                self._meta_model(2, "avg")(torch.zeros(1, 3, *size, device="meta"))
        except (RuntimeError, ValueError, AssertionError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BoatrayError(f"{self.name} cannot take {size[0]}x{size[1]} images ({reason}); "
                               f"set data.image_size to a size it takes, e.g. "
                               f"{list(self.entry.input_size)}") from None
        self._sizes.add(size)

    def output_shape(self, image_size: Sequence[int], upto: str, pooling: str = "avg"
                     ) -> tuple[int, ...]:
        """The shape of one image's activations at the cut point `upto` (meta device)."""
        with torch.no_grad():
            out = self.trunk(self._meta_model(2, pooling), upto)(
                torch.zeros(1, 3, *image_size, device="meta"))
        return tuple(int(n) for n in out.shape[1:])

    def flops(self, image_size: Sequence[int], num_classes: int = 2, pooling: str = "avg",
              upto: str | None = None) -> int:
        """FLOPs (2 per multiply-add) of one eval-mode forward pass on one image, of the whole
        network or of its trunk up to `upto`, counted on the meta device."""
        model = self._meta_model(num_classes, pooling)
        return forward_flops(model if upto is None else self.trunk(model, upto), image_size)

    # ------------------------------------------------------------------ cutting a network

    def stage_modules(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """A network this backbone built, as an ordered table stage -> modules (its cut points,
        then `head`); running them in order is `model(x)`."""
        model = unwrap(model)
        return {stage: [nn.Flatten(1) if n == FLATTEN else model.get_submodule(n)
                        for n in names] for stage, names in self.layout.items()}

    def _cut(self, stage: str) -> int:
        if stage not in self.cuts:
            raise BoatrayError(f"unknown cut point {stage!r} for {self.name}; choose one of "
                               f"{', '.join(self.cuts)}")
        return self.stages.index(stage) + 1

    def trunk(self, model: nn.Module, upto: str = "pool") -> nn.Sequential:
        """The network's prefix up to and including `upto` (shares its modules; no copy):
        `pool` gives the pooled feature vectors, a stage its feature maps."""
        table = self.stage_modules(model)
        return nn.Sequential(*(m for s in self.stages[:self._cut(upto)] for m in table[s]))

    def suffix(self, model: nn.Module, after: str = "pool") -> nn.Sequential:
        """The rest after `after`: `suffix(model, s)(trunk(model, s)(x)) == model(x)`."""
        table = self.stage_modules(model)
        return nn.Sequential(*(m for s in self.stages[self._cut(after):] for m in table[s]))

    # ------------------------------------------------------------------ freeze specs

    def trains(self, spec: str) -> tuple[str, ...]:
        """The groups (`groups`) the freeze spec `spec` trains, input to output."""
        if spec not in GRADUAL:
            raise BoatrayError(f"unknown freeze spec {spec!r}; choose one of "
                               f"{', '.join(GRADUAL)} (or gradual, as a schedule)")
        if spec not in self.freeze_specs:
            raise BoatrayError(f"{self.name} trains from scratch: freeze must be "
                               f"{' or '.join(map(repr, self.freeze_specs))}, got {spec!r}")
        names = [group for group, _ in self.groups]
        if spec == "all":
            return tuple(names)
        first = len(names) - 1 - (0 if spec == "head" else int(spec.removeprefix("last")))
        if first < 0:
            raise BoatrayError(f"freeze {spec!r}: {self.name} has only {len(names) - 1} stages "
                               "before its head")
        return tuple(names[first:])

    def frozen_prefix(self, spec: str) -> str | None:
        """The last cut point that `spec` leaves entirely frozen (None for `all`/`gradual`):
        its trunk computes the same activations every epoch when nothing random happens."""
        if spec not in GRADUAL[:-1]:
            return None
        first = dict(self.groups)[self.trains(spec)[0]][0]
        return self.stages[self.stages.index(first) - 1]

    def group_parameters(self, model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        """(group, its parameters) of a network this backbone built, input to output."""
        table = self.stage_modules(model)
        return [(group, list(dict.fromkeys(p for s in stages for m in table[s]
                                           for p in m.parameters())))
                for group, stages in self.groups]

    def stage_table(self) -> list[dict[str, str]]:
        """What each freeze spec trains: its stages and their module names."""
        rows = []
        for spec in self.freeze_specs:
            try:
                trained = self.trains(spec)
            except BoatrayError:  # a spec deeper than this backbone
                continue
            stages = [s for group, held in self.groups if group in trained for s in held]
            modules = [n for s in stages for n in self.layout[s] if n != FLATTEN]
            rows.append({"freeze": spec, "stages": " + ".join(stages),
                         "modules": ", ".join(dict.fromkeys(modules))})
        return rows


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


def forward_flops(module: nn.Module, image_size: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass of `module` on one image,
    counted by torch's FlopCounterMode on the meta device: no compute, no memory."""
    meta = module if _on_meta(module) else _meta_copy(module)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.zeros(1, 3, *image_size, device="meta"))
    return counter.get_total_flops()


def _on_meta(module: nn.Module) -> bool:
    return all(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _meta_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("meta").eval()
