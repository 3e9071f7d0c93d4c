"""The experiment config: YAML, overrides, one-line errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from boatray import config
from boatray.errors import BoatrayError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_lab_protocol():
    exp = config.Experiment()
    assert (exp.model.name, exp.model.weights, exp.data.image_size) == (
        "resnet50", "IMAGENET1K_V1", (240, 800))
    assert exp.sweep.freeze == ["head", "last1", "last2", "last3", "all", "gradual"]
    assert exp.sweep.lr == [1e-2, 1e-3, 1e-4, 1e-5]


def test_builtin_smoke_preset_equals_the_job_file():
    assert config.load() == config.load(REPO / "ray_jobs" / "smoke.yaml")
    assert config.load().data.source is None


def test_lab6_job_file_is_the_seeds_study():
    exp = config.load(REPO / "ray_jobs" / "lab6.yaml")
    assert exp.data.protocol == "lab16" and exp.train.epochs == 10
    assert len(exp.sweep.freeze) * len(exp.sweep.lr) == 24


def test_overrides_and_yaml_number_spellings(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: t\ntrain: {lr: 1e-3}\nsweep: {lr: [1e-2, 3e-4]}\n"
                    "svm: {gamma: [scale, 1e-3]}\n")
    exp = config.load(path, ["train.freeze=gradual", "data.image_size=[64, 200]",
                             "features.num_actors=2", "svm.class_weight=balanced"])
    assert exp.train.lr == 1e-3 and exp.sweep.lr == [1e-2, 3e-4]
    assert exp.svm.gamma == ["scale", 1e-3]
    assert exp.train.freeze == "gradual" and exp.data.image_size == (64, 200)
    assert exp.features.num_actors == 2 and exp.svm.class_weight == "balanced"
    assert config.from_dict(exp.to_dict()) == exp


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("trian.lr=1", "unknown key 'trian'"),
    ("train.lr=-1", "train.lr must be > 0.0"),
    ("train.lr=0", "train.lr must be > 0.0"),
    ("train.lr=.nan", "train.lr must be a finite number"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("sweep.lr=[0.01, .inf]", "sweep.lr must be a finite number"),
    ("baseline.lr=0", "baseline.lr must be > 0.0"),
    ("svm.C=[1, 0]", "svm.C must be > 0.0"),
    ("probe.C=[-1]", "probe.C must be > 0.0"),
    ("name=", "name must be a string, got None"),
    ("name=''", "name must be a plain folder name"),
    ("name=../../x", "name must be a plain folder name"),
    ("name=a/b", "name must be a plain folder name"),
    ("name=..", "name must be a plain folder name"),
    ("svm.C=[]", "svm.C must not be empty"),
    ("sweep.freeze=[]", "sweep.freeze must not be empty"),
    ("sweep.scheduler=[]", "sweep.scheduler must not be empty"),
    ("train.freeze=layer4", "train.freeze must be one of head, last1"),
    ("train.epochs=abc", "train.epochs must be an integer"),
    ("train.amp=maybe", "train.amp must be one of false, true, auto"),
    ("features.batch_size=big", "features.batch_size must be a number or auto"),
    ("sweep.freeze=[head, x]", "sweep.freeze entries must be among"),
    ("sweep.lr=[]", "sweep.lr must not be empty"),
    ("data.image_size=[1, 2, 3]", "data.image_size must be a list of 2 numbers"),
    ("data.image_size=[4, 800]", "data.image_size must be >= 8"),
    ("data.protocol=lab17", "data.protocol must be one of lab16, full"),
    ("train", "override 'train' must look like section.key=value"),
    ("train.lr.x=1", "override train.lr.x: 'lr' is not a section"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(BoatrayError) as err:
        config.load(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(BoatrayError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(BoatrayError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(BoatrayError, match="top level must be a mapping"):
        config.load(bad)
    bad.write_bytes(b"name: caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(BoatrayError, match=r"not UTF-8 text \(byte 0xe9 at offset 9\)"):
        config.load(bad)


@pytest.mark.parametrize("override", ["sweep.lr=[0.1,", "train.freeze={head", "name=a: b: c"])
def test_an_override_that_is_not_yaml_is_one_line(override):
    with pytest.raises(BoatrayError, match=f"--set {re.escape(override)}: the value is not "
                                           "valid YAML"):
        config.load(None, [override])


def test_local_paths_are_made_absolute_at_the_door(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").touch()
    exp = config.load(None, ["model.weights=w.pt"], data="data/mardct")
    assert exp.storage_path == str(tmp_path / "results")
    assert exp.results_dir == tmp_path / "results" / "smoke"
    assert exp.data.source == str(tmp_path / "data" / "mardct")
    assert exp.model.weights == str(tmp_path / "w.pt")
    assert config.load(None, ["storage_path=s3://b/p"]).storage_path == "s3://b/p"
    assert config.load(None, ["model.weights=IMAGENET1K_V1"]).model.weights == "IMAGENET1K_V1"


def test_a_ray_jobs_relative_results_land_outside_its_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.load().results_dir == tmp_path / "boatray" / "results" / "smoke"


def test_use_gpu_is_true_false_or_auto():
    assert config.load(None, ["train.use_gpu=auto"]).train.use_gpu == "auto"
    assert config.load(None, ["features.use_gpu=true"]).features.use_gpu is True
    with pytest.raises(BoatrayError, match="train.use_gpu must be one of false, true, auto"):
        config.load(None, ["train.use_gpu=maybe"])
