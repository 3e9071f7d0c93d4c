"""The benchmark scripts stay runnable: every one imports and parses its defaults, and the SVM
benchmark (no images needed) runs end to end on a small problem.

The image benchmarks need the real MarDCT sample and minutes of CPU; they are run by hand
(benchmarks/README.md), not here.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from boatray import config, freezing, models

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("extraction", "finetune_epoch", "decoded_epoch", "svm_fit", "smoke_sweep", "scaling",
           "gpu_check", "lab16_projection")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_defaults_to_the_study_it_measures(name, monkeypatch):
    """Run with no arguments, a benchmark measures the lab6 study's shapes: its image size,
    a registered model, real freeze specs, the 16 classes, and the shared MarDCT sample."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    defaults = vars(module.build_parser().parse_args([]))
    lab6 = config.load(BENCHMARKS.parent / "ray_jobs" / "lab6.yaml")
    assert callable(module.main)
    if "size" in defaults:
        assert tuple(defaults["size"]) == lab6.data.image_size
    if "model" in defaults:
        assert defaults["model"] in models.names()
    if "freeze" in defaults:
        assert set(defaults["freeze"]) <= set(freezing.FREEZE_SPECS)
    if "classes" in defaults:
        assert defaults["classes"] == 16
    if defaults.get("sample") is not None:  # gpu_check: its travelling copy, else this one
        assert defaults["sample"].name == "mardct-sample"


@pytest.mark.slow  # a benchmark run: about a minute
def test_the_svm_benchmark_prints_its_ratio_and_agreement():
    run = subprocess.run([sys.executable, str(BENCHMARKS / "svm_fit.py"), "--train", "300",
                          "--test", "100", "--dim", "64", "--classes", "4"],
                         capture_output=True, text=True, timeout=600, check=True)
    table = run.stdout.split("\npath ", 1)[1]
    assert "scikit-learn SVC(kernel='rbf')" in table and "boatray RbfSvm" in table
    assert "same predictions on 100.00% of 100 held-out rows" in run.stdout, run.stdout
    ratios = [float(line.split(":")[1]) for line in run.stdout.splitlines()
              if line.startswith("probe/svm time ratio:")]
    assert len(ratios) == 3 and all(r > 0 for r in ratios), run.stdout
