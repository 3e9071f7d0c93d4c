"""The experiment config: dataclasses loaded from YAML, `--set a.b=c` overrides, validation.

The config is checked once, here; code deeper down trusts it. A bad key, type or value is a
`BoatrayError` whose one-line message names the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from boatray.errors import BoatrayError

FREEZE_SPECS = ("fc", "layer4", "layer3", "layer2", "layer1", "all", "gradual")
DEVICES = (False, True, "auto")  # use_gpu: CPUs, GPUs, or GPUs where the cluster has or adds them
JOB_RESULTS_BASE = Path("~/boatray")
"""Where a Ray job's relative storage_path lands: its working directory is a temporary copy."""
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "bettercnn")


def _opt(default: Any, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, each_choices: tuple | None = None) -> Any:
    """A dataclass field with validation metadata."""
    meta = {"choices": choices, "min": min, "max": max, "each_choices": each_choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SyntheticConfig:
    """A generated ImageFolder tree (used when `data.source` is null)."""

    classes: int = _opt(4, min=2, max=64)
    train_per_class: int = _opt(40, min=2)
    test_per_class: int = _opt(12, min=1)
    image_size: tuple[int, int] = _opt((48, 160), min=8)
    imbalance: float = _opt(3.0, min=1.0)


@dataclass
class DataConfig:
    """Where the images come from and how they are split and fed."""

    source: str | None = None
    protocol: str = _opt("lab16", choices=("lab16", "full"))
    valid_fraction: float = _opt(0.15, min=0.0, max=0.9)
    image_size: tuple[int, int] = _opt((240, 800), min=8)
    augment: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The backbone: a registry name, its weights and the global pooling."""

    name: str = _opt("resnet50", choices=MODELS)
    weights: str = "IMAGENET1K_V1"
    pooling: str = _opt("avg", choices=("avg", "max"))


@dataclass
class TrainConfig:
    """One fine-tuning run: the Ray Train worker loop's settings."""

    epochs: int = _opt(10, min=1)
    batch_size: int = _opt(32, min=1)
    optimizer: str = _opt("adam", choices=("adam", "adamw", "sgd"))
    lr: float = _opt(1e-3, min=0.0)
    weight_decay: float = _opt(0.0, min=0.0)
    momentum: float = _opt(0.9, min=0.0, max=1.0)
    scheduler: str = _opt("none", choices=("none", "plateau", "cosine", "step"))
    step_size: int = _opt(5, min=1)
    gamma: float = _opt(0.1, min=0.0, max=1.0)
    plateau_factor: float = _opt(0.1, min=0.0, max=1.0)
    plateau_patience: int = _opt(3, min=0)
    freeze: str = _opt("fc", choices=FREEZE_SPECS)
    gradual_every: int = _opt(2, min=1)
    lr_decay: float = _opt(1.0, min=0.0, max=1.0)
    class_weighted_loss: bool = False
    balanced_sampler: bool = False
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    cache_prefix: bool = True
    cache_min_speedup: float = _opt(1.5, min=1.0)  # by FLOPs; else the cache is skipped
    seed: int = 0
    num_workers: int = _opt(1, min=0)
    use_gpu: bool | str = _opt(False, choices=DEVICES)
    cpus_per_worker: float = _opt(1.0, min=0.0)
    loader_workers: int = _opt(2, min=0)
    max_failures: int = _opt(1, min=0)


@dataclass
class AshaConfig:
    """ASHA early stopping on the sweep's validation loss."""

    enabled: bool = True
    grace_period: int = _opt(2, min=1)
    reduction_factor: float = _opt(2.0, min=1.01)


@dataclass
class SweepConfig:
    """The Ray Tune search over freezing depth and learning rate (x scheduler)."""

    enabled: bool = True
    freeze: list[str] = _opt(["fc", "layer4", "layer3", "layer2", "all", "gradual"],
                             each_choices=FREEZE_SPECS)
    lr: list[float] = _opt([1e-2, 1e-3, 1e-4, 1e-5])
    scheduler: list[str] = _opt(["none"], each_choices=("none", "plateau", "cosine", "step"))
    search: str = _opt("grid", choices=("grid", "random", "optuna"))
    num_samples: int = _opt(8, min=1)
    repeats: int = _opt(1, min=1)
    metric: str = _opt("valid_macro_f1",
                       choices=("valid_macro_f1", "valid_accuracy", "valid_loss"))
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int = _opt(1, min=1)
    trial_resource: str | None = None
    tensorboard: bool = False
    mlflow: bool = False


@dataclass
class BaselineConfig:
    """The lab's BetterCNN trained from scratch by the same loop."""

    enabled: bool = True
    image_size: tuple[int, int] = _opt((30, 100), min=8)
    epochs: int = _opt(10, min=1)
    lr: float = _opt(1e-3, min=0.0)
    optimizer: str = _opt("adam", choices=("adam", "adamw", "sgd"))
    batch_size: int = _opt(32, min=1)


@dataclass
class FeaturesConfig:
    """Ray Data feature extraction with the backbone trunk."""

    enabled: bool = True
    batch_size: int = _opt(64, min=1)
    num_actors: int | None = _opt(None, min=1)
    cpus_per_actor: float = _opt(1.0, min=0.0)
    threads_per_actor: int | None = _opt(None, min=1)  # None: the node's cores / actors
    use_gpu: bool | str = _opt(False, choices=DEVICES)
    stage: str = _opt("pool", choices=("stem", "layer1", "layer2", "layer3", "layer4", "pool"))
    dtype: str = _opt("float32", choices=("float32", "float16"))
    amp: bool = True  # bf16 autocast on GPU
    channels_last: bool = True
    compile: bool = False  # torch.compile (freezing) per actor: ~30 s once, then faster


@dataclass
class SvmConfig:
    """The classical heads fitted on the driver: RBF SVM and a logistic-regression probe."""

    C: list[float] = _opt([0.1, 1.0, 10.0, 100.0])
    gamma: list[float | str] = _opt(["scale"])
    class_weight: str | None = _opt(None, choices=(None, "balanced"))
    refit: str = _opt("train+valid", choices=("train", "train+valid"))
    probe: bool = True
    probe_C: list[float] = _opt([0.01, 0.1, 1.0])
    metric: str = _opt("macro_f1", choices=("macro_f1", "accuracy"))  # selection on valid


@dataclass
class ReportConfig:
    """The comparison report."""

    bootstrap: int = _opt(1000, min=1000)


@dataclass
class Experiment:
    """A whole study: data, fine-tuning sweep, features + SVM, baseline, report."""

    name: str = "lab6"
    storage_path: str = "results"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    svm: SvmConfig = field(default_factory=SvmConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def remote_storage(self) -> bool:
        """Whether storage_path is a URI (s3://, gs://, ...) rather than a local folder."""
        return "://" in self.storage_path

    @property
    def results_dir(self) -> Path:
        """Where the driver writes results/<experiment>/: storage_path/<name>, or for a remote
        storage_path a local staging folder that boatray.storage mirrors there."""
        if self.remote_storage:
            return Path(tempfile.gettempdir()) / "boatray" / self.name
        return Path(self.storage_path) / self.name

    @property
    def storage_uri(self) -> str:
        """results/<experiment>/ as Ray Tune and Train see it (shared storage on a cluster)."""
        if self.remote_storage:
            return f"{self.storage_path.rstrip('/')}/{self.name}"
        return str(self.results_dir.resolve())

    def to_dict(self) -> dict:
        """A plain, YAML/JSON-ready dict of every setting."""
        return to_dict(self)


def to_dict(obj: Any) -> Any:
    """Dataclasses to plain dicts, tuples to lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped with the package (`smoke`)."""
    path = Path(str(resources.files("boatray") / "presets" / f"{name}.yaml"))
    if not path.is_file():
        raise BoatrayError(f"unknown preset {name!r}")
    return path


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         data: str | None = None, base: Path | None = None) -> Experiment:
    """Load an experiment from YAML (None: the built-in smoke preset) plus `a.b=value` overrides
    and a data source; every local path in it is made absolute here (`absolute_paths`)."""
    raw = _read_yaml(Path(path) if path is not None else preset_path("smoke"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BoatrayError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    if data:
        _set_dotted(raw, "data.source", data)
    return absolute_paths(from_dict(raw), base)


def results_base() -> Path:
    """What a relative storage_path is relative to: the working directory, or for the driver of
    a Ray job (whose working directory is a copy Ray deletes) JOB_RESULTS_BASE."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return JOB_RESULTS_BASE.expanduser()
    return Path.cwd()


def absolute_paths(exp: Experiment, base: Path | None = None) -> Experiment:
    """`exp` with storage_path, data.source and a model.weights file made absolute, so that no
    process (Tune trials and Train workers change their working directory) depends on its own.

    A relative storage_path is taken relative to `base` (default: `results_base()`)."""
    storage = exp.storage_path
    if "://" not in storage and base is not None:
        storage = str(base / storage)
    elif "://" not in storage:
        storage = str((results_base() / Path(storage).expanduser()).resolve())
    source = exp.data.source and str(Path(exp.data.source).expanduser().resolve())
    weights = exp.model.weights
    if _is_file_path(weights):
        weights = str(Path(weights).expanduser().resolve())
    return dataclasses.replace(
        exp, storage_path=storage, data=dataclasses.replace(exp.data, source=source),
        model=dataclasses.replace(exp.model, weights=weights))


def absolute_path(text: str) -> Path:
    """A path from the command line, made absolute (an argparse `type`)."""
    return Path(text).expanduser().resolve()


def _is_file_path(weights: str) -> bool:
    """Whether model.weights names a file rather than `none` or a torchvision weights name."""
    return ("/" in weights or weights.startswith("~") or weights.endswith((".pt", ".pth"))
            or Path(weights).is_file())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment options every command shares: --config, --set (repeatable), --data."""
    parser.add_argument("--config", help="experiment YAML (default: the built-in smoke "
                                         "experiment on generated images)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    parser.add_argument("--data", help="data source: raw MarDCT (folders or zips) or an "
                                       "ImageFolder tree (overrides data.source)")


def from_arguments(args: argparse.Namespace, overrides: list[str] | None = None,
                   base: Path | None = None) -> Experiment:
    """The validated experiment of a command line made with `add_arguments` (`base`: see
    `absolute_paths`)."""
    return load(args.config, args.overrides if overrides is None else overrides, args.data, base)


def from_dict(raw: dict) -> Experiment:
    """Build and validate an Experiment from a nested dict."""
    return _build(Experiment, raw, "")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise BoatrayError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BoatrayError(f"{path}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise BoatrayError(f"{path}: the top level must be a mapping of sections")
    return raw


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BoatrayError(f"override {key}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BoatrayError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BoatrayError(
            f"unknown key '{prefix}{unknown[0]}' (allowed in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _check(key, _coerce(key, hint, value), fields[name].metadata)
    return cls(**values)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is str):  # try str last: "1e-3" is a number
            try:
                return _coerce(key, arg, value)
            except BoatrayError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(key, a, v) for a, v in zip(args, value))
        raise BoatrayError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
    elif origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(key, args[0], v) for v in items]
    elif hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise BoatrayError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _shown(choice: Any) -> str:
    """A choice as it is written in YAML."""
    return "null" if choice is None else str(choice).lower() if isinstance(choice, bool) else str(
        choice)


def _check(key: str, value: Any, meta: typing.Mapping) -> Any:
    choices, each = meta.get("choices"), meta.get("each_choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(_shown(c) for c in choices)
        raise BoatrayError(f"{key} must be one of {allowed}; got {value!r}")
    for item in value if each is not None else ():
        if item not in each:
            raise BoatrayError(f"{key} entries must be among {', '.join(each)}; got {item!r}")
    low, high = meta.get("min"), meta.get("max")
    for number in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if low is not None and number < low:
                raise BoatrayError(f"{key} must be >= {low}, got {number}")
            if high is not None and number > high:
                raise BoatrayError(f"{key} must be <= {high}, got {number}")
    if isinstance(value, list) and not value:
        raise BoatrayError(f"{key} must not be empty")
    return value
