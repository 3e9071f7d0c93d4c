"""Models you can use: every approach's selected model under results/<experiment>/models/<run>/.

A model folder is self-contained and holds no pickle: `model.json` (what it is: the classes,
the image size, the network or trunk spec) and `weights.pt`, a plain state dict that loads with
`torch.load(weights_only=True)`. A fine-tune or baseline run's network predicts by itself; the
SVM and the linear probe keep their trunk (up to the cut point the features came from) and
add `head.npz`, the fitted head as arrays (`np.load(allow_pickle=False)`). Every head predicts
the most probable class of its (calibrated) probabilities. `load` gives a `Model` that maps
images to class probabilities; `python -m boatray.predict --model DIR` uses it.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from boatray import models
from boatray.errors import BoatrayError
from boatray.finetune.checkpoints import MODEL_FILE, read_meta
from boatray.results import atomic_write, atomic_write_text
from boatray.svm.estimators import rbf_gram, squared_distances

SPEC = "model.json"
WEIGHTS = "weights.pt"
HEAD = "head.npz"
TRUNK = "trunk.pt"
FORMAT = "boatray-model/1"


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, approach: str) -> Path:
    """A fine-tune or baseline checkpoint folder (model.pt + meta.json) as a model folder."""
    meta = read_meta(checkpoint_dir)
    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS,
                 lambda tmp: shutil.copyfile(Path(checkpoint_dir) / MODEL_FILE, tmp))
    return _write_spec(out_dir, {"kind": "network", "approach": approach,
                                 "classes": meta["classes"], "image_size": meta["image_size"],
                                 "model": {"name": meta["model"]["name"],
                                           "pooling": meta["model"]["pooling"]}})


def trunk_path(features_path: str | Path) -> Path:
    """trunk.pt beside a features file: the weights of the trunk that computed them."""
    return Path(features_path).with_name(TRUNK)


def save_trunk(trunk: nn.Module, features_path: str | Path) -> Path:
    """Keep the extraction trunk's state dict (random weights cannot be rebuilt later)."""
    return atomic_write(trunk_path(features_path), lambda tmp: torch.save(trunk.state_dict(), tmp))


def head_arrays(head: str, estimator: Any) -> dict[str, np.ndarray]:
    """A fitted `RbfSvm` or linear-probe pipeline as plain arrays."""
    if head == "probe":
        scaler, logistic = estimator[0], estimator[-1]
        return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": logistic.coef_,
                "intercept": logistic.intercept_, "classes": logistic.classes_}
    svc, calibrator = estimator.svc_, estimator.calibrator_
    return {"mean": estimator.scaler_.mean_, "scale": estimator.scaler_.scale_,
            "gamma": np.float64(estimator.gamma_),
            "support": estimator.train_[svc.support_], "n_support": svc.n_support_,
            "dual_coef": svc.dual_coef_, "svc_intercept": svc.intercept_,
            "svc_classes": svc.classes_, "pair_classes": estimator.classes_,
            "coef": calibrator.coef_, "intercept": calibrator.intercept_,
            "classes": calibrator.classes_}


def export_head(head: str, estimator: Any, features_info: dict, features_path: str | Path,
                out_dir: str | Path) -> Path:
    """The SVM or probe with the trunk that made its features, as a model folder."""
    source = trunk_path(features_path)
    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS, lambda tmp: shutil.copyfile(source, tmp))
    arrays = head_arrays(head, estimator)
    atomic_write(out_dir / HEAD, lambda tmp: _save_arrays(tmp, arrays))
    spec = features_info["model"]
    return _write_spec(out_dir, {"kind": "features+head", "approach": head, "head": head,
                                 "classes": features_info["classes"],
                                 "image_size": features_info["image_size"],
                                 "model": {"name": spec["name"], "pooling": spec["pooling"]},
                                 "stage": features_info["stage"]})


def _save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add .npz to a name
        np.savez(file, **arrays)


def _write_spec(out_dir: Path, spec: dict) -> Path:
    atomic_write_text(out_dir / SPEC, json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
    return out_dir


@dataclass
class Model:
    """An exported model: a network (its logits) or a trunk with a head on its features."""

    spec: dict
    network: nn.Module
    head: dict[str, np.ndarray] | None = None

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
        x = outputs.flatten(1).double().numpy()
        scaled = (x - self.head["mean"]) / self.head["scale"]
        if self.spec["head"] == "svm":
            scaled = svm_margins(scaled, self.head)
        proba = np.zeros((len(x), len(self.classes)))
        proba[:, self.head["classes"]] = logistic_proba(scaled, self.head["coef"],
                                                        self.head["intercept"])
        return proba


def logistic_proba(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """scikit-learn LogisticRegression.predict_proba from its coefficients."""
    z = x @ coef.T + intercept
    if z.shape[1] == 1:  # two classes: one logit
        z = np.hstack([np.zeros_like(z), z])
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def svm_margins(scaled: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """The RBF SVM's one-vs-one decision values, placed as `RbfSvm.decision_function` places them
    (one column per pair of the calibrator's classes; 0 for a class the SVM never saw)."""
    kernel = rbf_gram(squared_distances(scaled, head["support"]), float(head["gamma"]))
    starts = np.concatenate([[0], np.cumsum(head["n_support"])])
    pair_classes = list(head["pair_classes"])
    pairs = {p: i for i, p in enumerate(itertools.combinations(range(len(pair_classes)), 2))}
    seen = np.searchsorted(head["pair_classes"], head["svc_classes"])
    out = np.zeros((len(scaled), len(pairs)))
    for column, (i, j) in enumerate(itertools.combinations(range(len(seen)), 2)):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        out[:, pairs[(seen[i], seen[j])]] = (
            kernel[:, si] @ head["dual_coef"][j - 1, si]
            + kernel[:, sj] @ head["dual_coef"][i, sj] + head["svc_intercept"][column])
    return out


def load(folder: str | Path) -> Model:
    """An exported model folder, rebuilt from its files alone (weights only, no pickle)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC).read_text())
    except (OSError, ValueError):
        raise BoatrayError(f"{folder} is not an exported boatray model ({SPEC} missing or "
                           "unreadable); models are under results/<experiment>/models/") from None
    if spec.get("format") != FORMAT:
        raise BoatrayError(f"{folder / SPEC} has format {spec.get('format')!r}, "
                           f"expected {FORMAT}")
    name, pooling = spec["model"]["name"], spec["model"]["pooling"]
    if spec["kind"] == "network":
        network = models.build(name, str(folder / WEIGHTS), len(spec["classes"]), pooling)
        return Model(spec, network.eval())
    trunk = models.trunk(models.build(name, "none", len(spec["classes"]), pooling),
                         spec["stage"])
    trunk.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    with np.load(folder / HEAD, allow_pickle=False) as arrays:
        head = {key: arrays[key] for key in arrays.files}
    return Model(spec, trunk.eval(), head)
