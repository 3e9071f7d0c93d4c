"""The approach registry (boatray/approaches/): one protocol that everything above iterates,
and the drifted duplicates it replaced (trial counts, resources, devices, staging, umask)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from boatray import approaches, preflight, sweep
from boatray.config import Experiment, from_dict
from boatray.errors import BoatrayError
from boatray.finetune import engine, tuning
from boatray.finetune.trainer import worker_resources
from boatray.results import atomic_write_text

PACKAGE = Path(approaches.__file__).resolve().parents[1]


def test_every_approach_has_its_own_name_stage_and_config_section():
    names = approaches.names()
    assert len(set(names)) == len(names) == len(approaches.APPROACHES)
    assert len({a.stage for a in approaches.APPROACHES}) == len(names)
    sections = {f.name for f in dataclasses.fields(Experiment)}
    for approach in approaches.APPROACHES:
        assert approach.section in sections, approach.name
        assert approaches.get(approach.name) is approach
    assert approaches.get("nothing") is None


def test_no_module_outside_the_approaches_names_an_approach_on_features():
    """The issue's check: grep for the feature heads' names outside boatray/approaches/."""
    quoted = re.compile("|".join(f'"{a.name}"' for a in approaches.APPROACHES
                                 if a.uses_features))
    found = [f"{path.relative_to(PACKAGE)}:{number}"
             for path in PACKAGE.rglob("*.py") if "approaches" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if quoted.search(line)]
    assert not found, found


def test_each_approach_is_switched_by_its_section_and_features_switch_the_heads():
    config = Experiment().to_dict()
    assert approaches.enabled(config) == list(approaches.APPROACHES)
    for approach in approaches.APPROACHES:
        off = {**config, approach.section: {**config[approach.section], "enabled": False}}
        assert approach not in approaches.enabled(off)
    no_features = {**config, "features": {**config["features"], "enabled": False}}
    assert [a.name for a in approaches.enabled(no_features)] == [
        a.name for a in approaches.APPROACHES if not a.uses_features]


@pytest.mark.parametrize("search, expected", [("grid", 2 * 3 * 2), ("random", 4 * 2),
                                              ("optuna", 4)])
def test_the_plan_counts_the_trials_the_sweep_runs(search, expected):
    exp = from_dict({"sweep": {"search": search, "freeze": ["head", "last1"],
                               "lr": [1e-2, 1e-3, 1e-4], "num_samples": 4, "repeats": 2},
                     "model": {"name": "resnet18", "weights": "none"},
                     "data": {"image_size": [32, 64]}})
    manifest = pd.DataFrame({"label": ["a", "b"] * 4, "split": ["train"] * 8})
    assert tuning.trial_count(exp) == expected
    assert approaches.get("finetune").plan(exp, manifest).line.startswith(
        f"stage fine-tuning sweep: {expected} trials, epochs head 10, last1 10: ")


def test_a_trial_and_the_plan_ask_for_the_same_resources():
    one = from_dict({"train": {"num_workers": 1, "cpus_per_worker": 2}})
    assert tuning.trial_resources(one) == worker_resources(one.train) == {"CPU": 2.0, "GPU": 0.0}
    two = from_dict({"train": {"num_workers": 2, "cpus_per_worker": 1}})
    share = preflight._worker_share(two)  # one worker plus its half of the trial's own CPU
    assert share["CPU"] * 2 == pytest.approx(2 * 1 + tuning.trial_resources(two)["CPU"])


def test_a_gpu_asked_for_where_torch_sees_none_is_one_line(monkeypatch):
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    with pytest.raises(BoatrayError, match="a GPU was asked for but torch sees none"):
        engine.device_for(True)
    assert engine.device_for(False).type == "cpu"


def test_a_dry_run_leaves_the_staging_folder_of_remote_storage_alone(tmp_path):
    name = f"dry-{os.getpid()}"
    exp = from_dict({"name": name, "storage_path": (tmp_path / "bucket").as_uri()})
    assert exp.remote_storage
    sweep.check_results_dir(exp, resume=False)  # a fresh machine: no staging folder, no error
    exp.results_dir.mkdir(parents=True)
    kept = exp.results_dir / "from-the-running-study.txt"
    kept.write_text("held by the run that holds the lock")
    sweep.check_results_dir(exp, resume=False)
    assert kept.read_text().startswith("held")
    kept.unlink()
    exp.results_dir.rmdir()


def test_results_files_get_the_umask_and_importing_boatray_leaves_it_alone(tmp_path):
    code = ("import os, sys; os.umask(0o027); import boatray.results as r; "
            "assert os.umask(0o027) == 0o027; "
            "r.atomic_write_text(sys.argv[1], 'x'); print(oct(os.stat(sys.argv[1]).st_mode))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("640")
    atomic_write_text(tmp_path / "b.txt", "y")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
