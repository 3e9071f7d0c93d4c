"""Disk space: the run's storage estimated from the model and the manifest, checked against
the free space of its folders before anything starts (boatray.diskspace)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pandas as pd
import pytest

from boatray import config, diskspace, models
from boatray.errors import BoatrayError

Usage = namedtuple("Usage", "total used free")


def smoke_manifest() -> pd.DataFrame:
    """The smoke experiment's counts: 4 classes, 79 train, 21 valid, 30 test images."""
    splits = ["train"] * 79 + ["valid"] * 21 + ["test"] * 30
    return pd.DataFrame({"split": splits, "label": [f"boat0{i % 4}" for i in range(130)]})


def test_the_estimate_adds_up_what_the_smoke_study_stores(tmp_path):
    """The smoke study stores 155 MB once finished (README: the frozen tensors once, what each
    trial trained, the exports); at its peak it may also hold each trial's KEEP_CHECKPOINTS
    checkpoints with their Adam states and the next checkpoint each of its 2 concurrent trials
    writes: what the estimate counts."""
    exp = config.load(None, [f"storage_path={tmp_path}"])
    results, temporary, *_ = diskspace.needs(exp, smoke_manifest())
    assert results.folder == tmp_path / "smoke" and temporary.what == "temporary files"
    network = models.build("resnet18", "none", 4)
    model = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    last1 = sum(p.numel() * 4 for name, p in network.named_parameters()
                if name.startswith(("layer4", "fc")))
    assert results.required["frozen tensors, once"] == model
    assert results.required["exported fine-tunes"] == pytest.approx(last1, rel=0.01)
    assert results.required[diskspace.TRIALS_LAST] == pytest.approx(2 * last1, rel=0.01)
    peak = sum(results.required.values())
    finished = peak - results.required[diskspace.WHILE_SWEEPING]
    assert 140e6 < finished < 170e6 and 700e6 < peak < 900e6
    assert results.optional["frozen-prefix caches"] > 0


def test_too_little_space_is_refused_up_front_with_both_figures(tmp_path, monkeypatch):
    exp = config.load(None, [f"storage_path={tmp_path}"])
    real = shutil.disk_usage

    def small(path):  # a 40 MB results disk, the other folders as they are
        return Usage(40e6, 0, 40e6) if str(path).startswith(str(tmp_path)) else real(path)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", small)
    # tmp_path shares its disk with the temporary folders: their needs add up
    with pytest.raises(BoatrayError, match=r"not enough disk space: this run needs about "
                                           rf"[\d.]+ [MG]B for its results \({tmp_path}/smoke\)"
                                           rf"[^,]*, and {tmp_path} has 40\.0 MB free: free "):
        diskspace.check(exp, smoke_manifest())
    line = diskspace.plan_line(exp, smoke_manifest())
    assert line.startswith(f"storage: results {tmp_path}/smoke: about ") and "40.0 MB free" in line
    monkeypatch.setattr(diskspace.shutil, "disk_usage", real)
    diskspace.check(exp, smoke_manifest())  # this machine has room
