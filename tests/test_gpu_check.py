"""The GPU check is honest without a GPU: `benchmarks/gpu_check.sh` runs in a Python that has
only the GPU machine's packages (torch, torchvision, numpy, pandas, pyarrow, scikit-learn,
pillow and what they need), with no Ray and no PyYAML, on the CPU at toy sizes, and prints
a complete table and JSON.

That Python is a venv (`--without-pip`, seconds to make) whose site-packages holds links to
exactly those distributions of this environment, found through importlib.metadata: nothing
else is importable there, which the test checks (`import ray` and `import yaml` fail).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
GPU_MACHINE_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "scikit-learn",
                        "pillow")
"""What the GPU machine's Python is known to hold that boatray's GPU check may use."""
MEASURED_STEPS = ("environment", "extraction", "finetune_all", "finetune_last1", "batch_sweep")
RAY_STEPS = ("smoke", "ray_extract")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need, themselves included (markers evaluated for
    this interpreter, extras left out)."""
    environment = default_environment()
    found: set[str] = set()
    todo = [_canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({**environment,
                                                                       "extra": ""}):
                continue
            todo.append(_canonical(requirement.name))
    return found


def site_entries(name: str) -> tuple[Path, set[str]]:
    """(the site-packages folder of a distribution, the top-level entries its files occupy
    there: packages, modules, bundled libraries, its .dist-info)."""
    dist = metadata.distribution(name)
    site = Path(dist.locate_file(""))
    entries = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    return site, {e for e in entries if not e.endswith(".pth") and e != "__pycache__"}


@pytest.fixture(scope="module")
def gpu_machine_python(tmp_path_factory) -> Path:
    """A venv with links to the GPU machine's packages alone; its python."""
    root = tmp_path_factory.mktemp("gpu-machine") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    linked = set()
    for name in sorted(requirement_closure(GPU_MACHINE_PACKAGES)):
        source, entries = site_entries(name)
        for entry in entries - linked:
            (site / entry).symlink_to(source / entry)
        linked |= entries
    assert not {"ray", "yaml", "_yaml", "boatray"} & linked
    return python


def test_the_gpu_machine_python_has_no_ray_and_no_yaml(gpu_machine_python):
    for module in ("ray", "yaml", "boatray"):
        run = subprocess.run([str(gpu_machine_python), "-c", f"import {module}"],
                             capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin"})
        assert f"No module named '{module}'" in run.stderr, (module, run.stderr[-500:])
    run = subprocess.run([str(gpu_machine_python), "-c", "import torch, torchvision, numpy, "
                          "pandas, pyarrow, sklearn, PIL"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow  # the check's five steps on toy sizes: about a minute on 2 cores
def test_the_gpu_check_runs_without_ray_or_yaml_and_prints_a_complete_table(
        gpu_machine_python, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # the CPU at toy sizes; a loaded CI machine gets more than the GPU machine's 8 minutes
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OUT": str(out),
           "PYTHON": str(gpu_machine_python), "GPU_CHECK_TIMEOUT": "1500"}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--device", "cpu", "--tiny",
                          "--budget", "1400"], capture_output=True, text=True, env=env,
                         timeout=1600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Ray absent, PyYAML absent" in run.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert [status[s] for s in MEASURED_STEPS] == ["ok"] * len(MEASURED_STEPS), status
    assert all(status[s].startswith("skipped: ray") for s in RAY_STEPS), status
    assert report["complete"] and report["environment"]["ray"] == "absent"
    assert report["environment"]["yaml"] == "absent"
    rows = {(r["step"], r["row"]): r for r in report["rows"]}
    measured = [r for r in rows.values() if r["step"] in MEASURED_STEPS[1:]
                and "batch_size auto" not in r["row"]]
    assert len(measured) == 4 + 4 + 4 + 4  # every pair of every step, every sweep size
    for r in measured:
        assert r["img/s"] > 0 and r["% of peak"] > 0, r
    pairs = [r for r in measured if not r["row"].startswith("sweep")]
    assert all(r["vs plain"] > 0 for r in pairs)
    for r in measured:  # the printed table holds every row of the JSON
        assert r["row"] in run.stdout
    assert (out / "gpu_check.log").read_text().count("===== ") == len(MEASURED_STEPS)


def test_the_check_s_steps_and_table(monkeypatch):
    """Every step has a limit and an implementation; the table joins each boatray row to its
    plain PyTorch row and states its share of the matmul peak."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    check, steps = (importlib.import_module(n) for n in ("gpu_check", "gpu_steps"))
    assert list(check.LIMITS) == list(steps.STEPS) == [*MEASURED_STEPS, *RAY_STEPS]
    assert sum(check.LIMITS[s] for s in MEASURED_STEPS) <= 480 - 30
    rows = check.table_rows([
        {"step": "extraction", "status": "ok", "rows": [
            {"row": "b", "pair": "p", "kind": "boatray", "images_per_second": 300.0,
             "flops_per_image": 1e9},
            {"row": "a", "pair": "p", "kind": "plain", "images_per_second": 200.0,
             "flops_per_image": 1e9}]},
        {"step": "smoke", "status": "skipped: ray not importable here"}], peak=1e12)
    assert [(r["row"], r["vs plain"], r["% of peak"]) for r in rows[:2]] == [
        ("b", 1.5, 30.0), ("a", 1.0, 20.0)]
    assert rows[2]["row"] == "(skipped: ray not importable here)"
