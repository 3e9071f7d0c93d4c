"""The experiment config: dataclasses loaded from YAML, `--set a.b=c` overrides, validation.

The config is checked once, here; code deeper down trusts it. A bad key, type or value is a
`BoatrayError` whose one-line message names the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from boatray import freezing, models, precision, storage
from boatray.backbones.weightfiles import looks_like_file
from boatray.data.imagefiles import MAX_PIXELS
from boatray.errors import BoatrayError
from boatray.results import Layout
from boatray.schema import build, option, set_dotted

FREEZE_SPECS = freezing.FREEZE_SPECS
DEVICES = (False, True, "auto")  # use_gpu: CPUs, GPUs, or GPUs where the cluster has or adds them
JOB_RESULTS_BASE = Path("~/boatray")
"""Where a Ray job's relative storage_path lands: its working directory is a temporary copy."""


@dataclass
class SyntheticConfig:
    """A generated ImageFolder tree (used when `data.source` is null)."""

    classes: int = option(4, min=2, max=64)
    train_per_class: int = option(40, min=2)
    test_per_class: int = option(12, min=1)
    image_size: tuple[int, int] = option((48, 160), min=8)
    imbalance: float = option(3.0, min=1.0)


@dataclass
class DataConfig:
    """Where the images come from and how they are split and fed."""

    source: str | None = None
    protocol: str = option("lab16", choices=("lab16", "full"))
    valid_fraction: float = option(0.15, min=0.0, max=0.9)
    image_size: tuple[int, int] = option((240, 800), min=8)
    augment: bool = False
    max_pixels: int = option(MAX_PIXELS, min=1)  # larger images are left out, counted
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The backbone: a registry name or `timm/<a timm CNN>`, its weights and the global pooling.
    The name is checked in `from_dict` (models.backbone)."""

    name: str = "resnet50"
    weights: str = "IMAGENET1K_V1"
    pooling: str = option("avg", choices=("avg", "max"))


@dataclass
class TrainConfig:
    """One fine-tuning run: the Ray Train worker loop's settings."""

    epochs: int = option(10, min=1)
    batch_size: int | str = option(32, min=1, words=("auto",))  # auto: sizing.py
    optimizer: str = option("adam", choices=("adam", "adamw", "sgd"))
    lr: float = option(1e-3, above=0.0)
    weight_decay: float = option(0.0, min=0.0)
    momentum: float = option(0.9, min=0.0, max=1.0)
    scheduler: str = option("none", choices=("none", "plateau", "cosine", "step"))
    step_size: int = option(5, min=1)
    gamma: float = option(0.1, min=0.0, max=1.0)
    plateau_factor: float = option(0.1, min=0.0, max=1.0)
    plateau_patience: int = option(3, min=0)
    freeze: str = option("head", choices=FREEZE_SPECS)
    gradual_every: int = option(2, min=1)
    lr_decay: float = option(1.0, min=0.0, max=1.0)
    class_weighted_loss: bool = False
    balanced_sampler: bool = False
    amp: bool | str = option("auto", choices=precision.AMP_CHOICES)  # precision.py
    channels_last: bool = True
    compile: bool = False
    cache_prefix: bool = True
    cache_decoded: bool = True  # decode each image once per node (without augmentation)
    cache_min_speedup: float = option(1.5, min=1.0)  # by FLOPs; else the cache is skipped
    seed: int = 0
    num_workers: int = option(1, min=0)
    use_gpu: bool | str = option(False, choices=DEVICES)
    cpus_per_worker: float = option(1.0, min=0.0)
    loader_workers: int = option(2, min=0)
    max_failures: int = option(1, min=0)
    checkpoint_every_s: float = option(60.0, min=0.0)  # and at ASHA's rungs and the end


@dataclass
class AshaConfig:
    """ASHA early stopping on the sweep's validation loss."""

    enabled: bool = True
    grace_period: int = option(2, min=1)
    reduction_factor: float = option(2.0, min=1.01)


@dataclass
class FreezeSettings:
    """What one freeze spec's trials take instead of the sweep's own settings (`head` on cached
    features costs about a second an epoch: it can have the epochs and rates it needs)."""

    epochs: int | None = option(None, min=1)  # None: train.epochs
    lr: list[float] | None = option(None, above=0.0)  # None: sweep.lr (a grid's rates)


@dataclass
class SweepConfig:
    """The Ray Tune search over freezing depth and learning rate (x scheduler)."""

    enabled: bool = True
    freeze: list[str] = option([s for s in FREEZE_SPECS if s != "last4"],  # the seeds' depths
                             each_choices=FREEZE_SPECS)
    lr: list[float] = option([1e-2, 1e-3, 1e-4, 1e-5], above=0.0)
    scheduler: list[str] = option(["none"], each_choices=("none", "plateau", "cosine", "step"))
    search: str = option("grid", choices=("grid", "random", "optuna"))
    num_samples: int = option(8, min=1)
    repeats: int = option(1, min=1)
    metric: str = option("valid_macro_f1",
                       choices=("valid_macro_f1", "valid_accuracy", "valid_loss"))
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int = option(1, min=1)
    trial_resource: str | None = None
    tensorboard: bool = False
    mlflow: bool = False
    per_freeze: dict[str, FreezeSettings] = option({}, each_choices=FREEZE_SPECS)

    def epochs(self, freeze: str, default: int) -> int:
        """The epochs of a `freeze` trial: its per_freeze epochs, else `default` (train's)."""
        settings = self.per_freeze.get(freeze)
        return settings.epochs if settings and settings.epochs else default

    def rates(self, freeze: str) -> list[float]:
        """The learning rates a grid search gives `freeze` trials: its per_freeze lr, else lr."""
        settings = self.per_freeze.get(freeze)
        return settings.lr if settings and settings.lr else self.lr


@dataclass
class BaselineConfig:
    """The lab's BetterCNN trained from scratch by the same loop."""

    enabled: bool = True
    image_size: tuple[int, int] = option((30, 100), min=8)
    epochs: int = option(10, min=1)
    lr: float = option(1e-3, above=0.0)
    optimizer: str = option("adam", choices=("adam", "adamw", "sgd"))
    batch_size: int = option(32, min=1)


@dataclass
class FeaturesConfig:
    """Ray Data feature extraction with the backbone trunk."""

    enabled: bool = True
    batch_size: int | str = option("auto", min=1, words=("auto",))  # auto: sizing.py
    num_actors: int | None = option(None, min=1)
    cpus_per_actor: float = option(1.0, min=0.0)
    threads_per_actor: int | None = option(None, min=1)  # None: the node's cores / actors
    use_gpu: bool | str = option(False, choices=DEVICES)
    stage: str = option("pool", choices=models.all_cut_points())  # checked against the model
    dtype: str = option("float32", choices=("float32", "float16"))
    amp: bool | str = option("auto", choices=precision.AMP_CHOICES)  # precision.py
    channels_last: bool = True
    gpu_decode: bool = True  # GPU actors decode JPEGs on their GPU (nvJPEG); else CPU tasks
    compile: bool = False  # torch.compile (freezing) per actor: ~30 s once, then faster


@dataclass
class HeadConfig:
    """What every classical head on the extracted features shares: whether it runs, how its
    setting is chosen on the valid split, and what its final model is fitted on."""

    enabled: bool = True
    metric: str = option("macro_f1", choices=("macro_f1", "accuracy"))  # selection on valid
    refit: str = option("train+valid", choices=("train", "train+valid"))


@dataclass
class SvmConfig(HeadConfig):
    """The RBF SVM: C and gamma chosen on the valid split, calibrated probabilities."""

    C: list[float] = option([0.1, 1.0, 10.0, 100.0], above=0.0)
    gamma: list[float | str] = option(["scale"], above=0.0, words=("scale", "auto"))
    class_weight: str | None = option(None, choices=(None, "balanced"))


@dataclass
class ProbeConfig(HeadConfig):
    """The linear probe: a logistic regression on standardised features, C chosen on valid."""

    C: list[float] = option([0.01, 0.1, 1.0], above=0.0)
    class_weight: str | None = option(None, choices=(None, "balanced"))


@dataclass
class KnnConfig(HeadConfig):
    """k-NN on L2-normalised features: similarity-weighted votes of the k nearest training
    images (weight exp(cosine similarity / temperature)), k chosen on valid."""

    k: list[int] = option([1, 3, 5, 10, 20], min=1)
    temperature: float = option(0.07, above=0.0)


@dataclass
class ReportConfig:
    """The comparison report."""

    bootstrap: int = option(1000, min=1000)


@dataclass
class Experiment:
    """A whole study: data, fine-tuning sweep, features + SVM, baseline, report."""

    name: str = option("lab6", folder_name=True)
    storage_path: str = "results"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    svm: SvmConfig = field(default_factory=SvmConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def remote_storage(self) -> bool:
        """Whether storage_path is a storage URI rather than a local folder."""
        return storage.is_remote(self.storage_path)

    @property
    def results_dir(self) -> Path:
        """Where the driver writes results/<experiment>/: storage_path/<name>, or for a remote
        storage_path a local staging folder that boatray.storage mirrors there."""
        if self.remote_storage:
            return storage.staging_dir(self.name)
        return Path(self.storage_path) / self.name

    @property
    def layout(self) -> Layout:
        """The files and folders of results/<experiment>/ (on the driver)."""
        return Layout(self.results_dir)

    @property
    def storage_uri(self) -> str:
        """results/<experiment>/ as Ray Tune and Train see it (shared storage on a cluster)."""
        if self.remote_storage:
            return storage.join(self.storage_path, self.name)
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
    if isinstance(obj, dict):
        return {key: to_dict(value) for key, value in obj.items()}
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `section.key` -> value (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


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
        set_dotted(raw, key.strip(), _override_value(item, value))
    if data:
        set_dotted(raw, "data.source", data)
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
    where = storage.absolute(exp.storage_path, base if base is not None else results_base())
    source = exp.data.source and str(Path(exp.data.source).expanduser().resolve())
    weights = exp.model.weights
    if _is_file_path(weights):
        weights = str(Path(weights).expanduser().resolve())
    return dataclasses.replace(
        exp, storage_path=where, data=dataclasses.replace(exp.data, source=source),
        model=dataclasses.replace(exp.model, weights=weights))


def absolute_path(text: str) -> Path:
    """A path from the command line, made absolute (an argparse `type`)."""
    return Path(text).expanduser().resolve()


def _is_file_path(weights: str) -> bool:
    """Whether model.weights names a file rather than `none` or a weights name."""
    return looks_like_file(weights) or Path(weights).is_file()


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
    exp = build(Experiment, raw, "")
    backbone = models.backbone(exp.model.name)  # an unknown or uncuttable network stops here
    backbone.check_size(exp.data.image_size)
    cuts = backbone.cuts
    if exp.features.stage not in cuts:
        raise BoatrayError(f"features.stage must be one of {', '.join(cuts)} for "
                           f"{exp.model.name}; got {exp.features.stage!r}")
    return exp


def _override_value(item: str, value: str) -> Any:
    """The YAML value of one `--set key=value` (None for an empty value)."""
    import yaml  # here, not at the top: the Ray-free steps (benchmarks/gpu_check.py) have none

    if not value.strip():
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise BoatrayError(f"--set {item}: the value is not valid YAML ({problem}); e.g. "
                           "--set 'sweep.lr=[0.01, 0.001]', and quote text with ':' or '#' in "
                           "it") from None


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise BoatrayError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise BoatrayError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                           f"offset {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise BoatrayError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BoatrayError(f"{path}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise BoatrayError(f"{path}: the top level must be a mapping of sections")
    return raw


