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

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("extraction", "finetune_epoch", "svm_fit", "smoke_sweep", "scaling")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_and_parses_its_defaults(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    assert module.build_parser().parse_args([]) is not None


def test_the_svm_benchmark_prints_its_ratio_and_agreement():
    run = subprocess.run([sys.executable, str(BENCHMARKS / "svm_fit.py"), "--train", "300",
                          "--test", "100", "--dim", "64", "--classes", "4"],
                         capture_output=True, text=True, timeout=600, check=True)
    table = run.stdout.split("\npath ", 1)[1]
    assert "scikit-learn SVC(kernel='rbf')" in table and "boatray RbfSvm" in table
    assert "same predictions on 100.00% of 100 held-out rows" in run.stdout, run.stdout
