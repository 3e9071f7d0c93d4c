"""Models you can use: the folder format of every approach's model, results/<exp>/models/<run>/.

A model folder holds no pickle: `model.json` (the format, the approach that exported it, the
classes, the image size, the network or trunk) and `weights.pt`, a plain state dict that loads
with `torch.load(weights_only=True)` (what trained; `weights.refs.json` names the frozen
tensors kept once in the results folder's weight store, weightstore.py). A network (fine-tune,
baseline) predicts by itself; an approach on features keeps the trunk its features came from
and adds its head as arrays (approaches/heads.py). `Model` maps a batch of images to class
probabilities; the approach named in model.json rebuilds it (`boatray.approaches.load_model`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from boatray import models, weightstore
from boatray.errors import BoatrayError
from boatray.finetune.checkpoints import MODEL_FILE, read_meta
from boatray.results import atomic_write_text

SPEC = "model.json"
WEIGHTS = "weights.pt"
TRUNK = "trunk.pt"
FORMAT = "boatray-model/1"


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, approach: str) -> Path:
    """A training checkpoint folder (model.pt + meta.json) as the model folder of `approach`."""
    meta = read_meta(checkpoint_dir)
    out_dir = Path(out_dir)
    weightstore.copy(Path(checkpoint_dir) / MODEL_FILE, out_dir / WEIGHTS)
    return write_spec(out_dir, {"kind": "network", "approach": approach,
                                "classes": meta["classes"], "image_size": meta["image_size"],
                                "model": {"name": meta["model"]["name"],
                                          "pooling": meta["model"]["pooling"]}})


def trunk_path(features_path: str | Path) -> Path:
    """trunk.pt beside a features file: the weights of the trunk that computed them."""
    return Path(features_path).with_name(TRUNK)


def save_trunk(trunk: nn.Module, features_path: str | Path, store: str | None = None) -> Path:
    """Keep the extraction trunk's state dict (random weights cannot be rebuilt later); its
    tensors go to the weight store `store`, if given."""
    state = trunk.state_dict()
    return weightstore.save(state, trunk_path(features_path), store, state)


def write_spec(out_dir: Path, spec: dict[str, Any]) -> Path:
    """Write model.json (last: a folder with it is a whole model); return the folder."""
    atomic_write_text(out_dir / SPEC, json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
    return out_dir


def read_spec(folder: str | Path) -> dict[str, Any]:
    """A model folder's model.json, checked: one line when it is not a boatray model."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC).read_text())
    except (OSError, ValueError):
        raise BoatrayError(f"{folder} is not an exported boatray model ({SPEC} missing or "
                           "unreadable); models are under results/<experiment>/models/") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else None
        raise BoatrayError(f"{folder / SPEC} has format {found!r}, expected {FORMAT}")
    return spec


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model folder's state dict (weights only): one line when the file is missing."""
    if not path.is_file():
        raise BoatrayError(f"{path.parent} lacks {path.name}: the model folder is incomplete "
                           "(copy it whole, or run the study again with --resume)")
    return weightstore.load(path)


@dataclass
class Model:
    """An exported model: a network, or a trunk with a head on its features (`head`: features
    (n, d) to probabilities over every class)."""

    spec: dict
    network: nn.Module
    head: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.spec["image_size"])

    def proba(self, outputs: torch.Tensor) -> np.ndarray:
        """Class probabilities (n, classes) from the network's outputs on a batch of images."""
        if self.head is None:
            return torch.softmax(outputs.double(), dim=1).numpy()
        return self.head(outputs.flatten(1).double().numpy())


def load_network(folder: Path, spec: dict[str, Any]) -> Model:
    """A network model folder (`kind: network`) rebuilt from its files."""
    network = models.build(spec["model"]["name"], "none", len(spec["classes"]),
                           spec["model"]["pooling"])
    models.load_state(network, read_weights(folder / WEIGHTS), folder / WEIGHTS,
                      spec["model"]["name"])
    return Model(spec, network.eval())


def load_trunk(folder: Path, spec: dict[str, Any]) -> nn.Module:
    """The trunk of a features+head model folder (up to its `stage`), in eval mode."""
    network = models.build(spec["model"]["name"], "none", len(spec["classes"]),
                           spec["model"]["pooling"])
    trunk = models.trunk(network, spec["stage"])
    trunk.load_state_dict(read_weights(folder / WEIGHTS))
    return trunk.eval()
