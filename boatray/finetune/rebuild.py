"""A resumed sweep's Tune state checked against its trial folders, and the plan that rebuilds
the sweep where that state cannot be used.

Tune restores a sweep from its experiment state (tune/experiment_state-*.json). That state
cannot be used when it cannot be read, when it was written before the results folder moved
(Tune would restore some trials at the old place), when it names a checkpoint that is gone with
no intact one of its trial to continue from (else: stale_checkpoints), or when a trial it
holds as finished has no intact checkpoint left. The sweep is then rebuilt from what each
trial's folder holds (params.json, result.json, and the checkpoints with their manifests): the
trials that ended with an intact checkpoint are kept, and the others run again in a new Tune
experiment, each from its newest intact checkpoint where it has one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from boatray import storage
from boatray.config import Experiment
from boatray.finetune.checkpoints import META_FILE, checkpoints_under, intact_or_beside
from boatray.finetune.stale_checkpoints import newest_intact
from boatray.results import Layout

STATE_PREFIX = "experiment_state-"


def config_key(config: dict) -> str:
    """What tells a sweep's trials apart: freeze/lr/scheduler/repeat."""
    return (f"{config['freeze']}/{float(config['lr'])!r}/{config['scheduler']}/"
            f"{int(config['repeat'])}")


def describe_config(config: dict) -> str:
    """`last1 lr=1e-02 none r0`."""
    return (f"{config['freeze']} lr={float(config['lr']):.0e} {config['scheduler']} "
            f"r{config['repeat']}")


@dataclass
class TrialFolder:
    """A trial's folder under tune/ as the storage holds it, read without Tune's experiment
    state: its config (params.json), whether Tune recorded its end (result.json: it finished
    or ASHA stopped it), and its newest intact checkpoint."""

    location: str
    trial_id: str
    config: dict
    ended: bool
    checkpoint: str | None
    epochs: int
    damaged: str | None  # why its newest checkpoint is not `checkpoint`, when it is not

    @property
    def key(self) -> str:
        return config_key(self.config)

    @property
    def kept(self) -> bool:
        """Whether it ended with its newest checkpoint intact: nothing to run again."""
        return self.ended and self.checkpoint is not None and not self.damaged

    def describe(self) -> str:
        """`1a2b3_00001 (last1 lr=1e-02 none r0)`."""
        return f"{self.trial_id} ({describe_config(self.config)})"


def trial_folders(exp: Experiment) -> list[TrialFolder]:
    """Every trial folder of the experiment's sweep (tune/), each with its newest intact
    checkpoint (in the folder, or under train/ for a trial that drove a Train run)."""
    root = exp.storage_uri
    found = []
    for location, relative in storage.files_under(storage.join(root, Layout.TUNE)):
        if len(relative.parts) != 2 or relative.name != "params.json":
            continue
        folder = storage.parent(location)
        trial_id = relative.parts[0].split("-")[0]
        try:
            config = json.loads(storage.read_bytes(location))
            config_key(config)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of this sweep's trials
        kept = (checkpoints_under(folder)
                or checkpoints_under(storage.join(root, Layout.TRAIN, trial_id)))
        checkpoint, damaged = intact_or_beside(kept[0][1]) if kept else (None, None)
        epochs = max(next((e for e, c in kept if c == checkpoint), 0), 0)
        ended = _ended(folder) or epochs >= exp.sweep.epochs(config["freeze"], exp.train.epochs)
        found.append(TrialFolder(folder, trial_id, config, ended, checkpoint, epochs, damaged))
    return found


def _ended(folder: str) -> bool:
    """Whether Tune recorded a trial's end: the last result in its result.json is `done`."""
    try:
        lines = storage.read_bytes(storage.join(folder, "result.json")).decode().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in reversed([line for line in lines if line.strip()]):
        try:
            return bool(json.loads(line).get("done"))
        except ValueError:
            continue  # a line cut short
    return False


def damage_lines(folders: list[TrialFolder]) -> list[str]:
    """One line per unfinished trial whose newest checkpoint is damaged: where it resumes."""
    return [f"trial {f.describe()}: its newest checkpoint is damaged ({f.damaged}); it "
            + (f"resumes from {f.checkpoint}" if f.checkpoint else "trains again from epoch 1")
            for f in folders if f.damaged and not f.ended]


def problem(tune_path: str, folders: list[TrialFolder]) -> str | None:
    """Why Tune's saved state of the sweep at `tune_path` cannot be used, or None."""
    return _state_problem(tune_path, folders) or _lost_checkpoints(folders)


def _state_problem(tune_path: str, folders: list[TrialFolder]) -> str | None:
    """What is wrong with the newest experiment state itself (the module says what can be)."""
    states = sorted(location for location, relative in storage.files_under(tune_path)
                    if len(relative.parts) == 1 and relative.name.startswith(STATE_PREFIX)
                    and relative.suffix == ".json")
    if not states:
        return "it holds no experiment state"
    name = storage.name(states[-1])
    try:
        state = json.loads(storage.read_bytes(states[-1]))
        trials = [(json.loads(trial), trial, metadata) for trial, metadata in state["trial_data"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{name} cannot be read ({type(exc).__name__})"
    here = storage.open_location(tune_path)[1]
    by_id = {folder.trial_id: folder for folder in folders}
    for record, trial, metadata in trials:
        written, named = _trial_places(trial, metadata)
        if written and written.rstrip("/") != here.rstrip("/"):
            return f"{name} was written in {written} (the results folder was moved since)"
        if named and _gone_for_good(tune_path, named):
            shown = "/".join(named.rstrip("/").split("/")[-2:])
            return (f"{name} names checkpoint {shown}, which is gone, and no later checkpoint "
                    "of its trial replaced it")
        folder = by_id.get(record.get("trial_id"))
        if record.get("status") == "TERMINATED" and folder and folder.checkpoint is None:
            return (f"trial {folder.describe()} ended, and its checkpoint is damaged "
                    f"({folder.damaged})")
    return None


def _gone_for_good(tune_path: str, named: str) -> bool:
    """Whether the checkpoint Tune's state names is gone with no intact checkpoint of its trial
    to continue from (where there is one, stale_checkpoints.RecoverCheckpoints points Tune at
    it)."""
    if storage.is_file(storage.join(storage.same_kind(tune_path, named), META_FILE)):
        return False
    filesystem, _ = storage.open_location(tune_path)
    trial = named.rstrip("/").rsplit("/", 1)[0]  # a path in `filesystem`, no scheme or query
    return newest_intact(filesystem, trial)[0] is None


def _trial_places(trial: str, metadata: str) -> tuple[str | None, str | None]:
    """(the experiment folder a trial's saved state was written in, the checkpoint it would be
    restored from), from Tune's own records of the trial (None where they cannot be read)."""
    from ray.tune.experiment.trial import _TrainingRunMetadata
    from ray.tune.utils.serialization import TuneFunctionDecoder

    try:  # boatray's own results folder: its Tune state is trusted like Tune trusts it
        written = TuneFunctionDecoder(allow_cloudpickle=True).decode(trial)[
            "storage"].experiment_fs_path
        result = _TrainingRunMetadata.from_json_state(
            metadata).checkpoint_manager.latest_checkpoint_result
    except Exception:  # noqa: BLE001 - a Tune that keeps its state otherwise: Tune decides
        return None, None
    return written, result.checkpoint.path if result is not None else None


def _lost_checkpoints(folders: list[TrialFolder]) -> str | None:
    """Trials Tune would not run again (they ended) though their last checkpoint is damaged,
    where no other trial of their configuration was kept."""
    kept = {f.key for f in folders if f.kept}
    lost = [f for f in folders if f.ended and f.damaged and f.key not in kept]
    return "; ".join(f"trial {f.describe()} ended, and its checkpoint is damaged ({f.damaged})"
                     for f in lost) or None


@dataclass
class Rebuild:
    """How a sweep is rebuilt: the trials kept as they ended, the configurations to run (each
    resumed from an earlier trial's folder where it has an intact checkpoint), and how many new
    samples a random search still draws."""

    kept: list[TrialFolder]
    points: list[dict[str, Any]]
    resumed: dict[str, TrialFolder] = field(default_factory=dict)
    fresh: int = 0

    def line(self) -> str:
        """Which trials are kept, resumed and started again."""
        again = [describe_config(c) for c in self.points if config_key(c) not in self.resumed]
        groups = {"kept as they ended": [f.describe() for f in self.kept],
                  "resume from their checkpoints": [f"{f.describe()} at epoch {f.epochs}"
                                                    for f in self.resumed.values()],
                  "start again from epoch 1": again}
        return ("the sweep is rebuilt from its trial folders: "
                + "; ".join(f"{len(group)} {what}" + (f": {', '.join(group)}" if group else "")
                            for what, group in groups.items())
                + (f"; {self.fresh} new sample(s)" if self.fresh else ""))

    def kept_results(self) -> list[tune.Result]:
        return [ended_result(folder) for folder in self.kept]


def plan(exp: Experiment, folders: list[TrialFolder], trials: int) -> Rebuild:
    """The rebuild of a sweep of `trials` trials from its trial folders."""
    best = _best_per_config(folders)
    kept = {key: f for key, f in best.items() if f.kept}
    wanted = (grid_configs(exp) if exp.sweep.search == "grid"
              else [f.config for f in best.values()])
    points = [config for config in wanted if config_key(config) not in kept]
    resumed = {config_key(c): best[config_key(c)] for c in points
               if config_key(c) in best and best[config_key(c)].checkpoint}
    fresh = max(0, trials - len(best)) if exp.sweep.search != "grid" else 0
    return Rebuild(list(kept.values()), points, resumed, fresh)


def _best_per_config(folders: list[TrialFolder]) -> dict[str, TrialFolder]:
    """Per configuration, the trial folder that got furthest: kept first, then the most epochs
    in an intact checkpoint."""
    best: dict[str, TrialFolder] = {}
    for folder in folders:
        held = best.get(folder.key)
        if held is None or (folder.kept, folder.epochs) > (held.kept, held.epochs):
            best[folder.key] = folder
    return best


def grid_configs(exp: Experiment) -> list[dict[str, Any]]:
    """Every point of the seeds' grid, in Tune's order: each freeze spec with its learning
    rates, and under each, every scheduler and repeat."""
    return [{"freeze": f, "lr": lr, "scheduler": s, "repeat": r}
            for f in exp.sweep.freeze for lr in exp.sweep.rates(f)
            for s, r in itertools.product(exp.sweep.scheduler, range(exp.sweep.repeats))]


def set_aside(tune_path: str) -> None:
    """Rename the experiment state Tune cannot use (it would try it again) to *.damaged."""
    filesystem, base = storage.open_location(tune_path)
    for _, relative in list(storage.files_under(tune_path)):
        if (len(relative.parts) == 1 and relative.name.startswith(STATE_PREFIX)
                and relative.suffix == ".json"):
            filesystem.move(f"{base}/{relative.name}", f"{base}/{relative.name}.damaged")


def ended_result(folder: TrialFolder) -> tune.Result:
    """A kept trial's result as Tune recorded it in its folder; an error it recovered from
    (it ended afterwards) is not its outcome."""
    quiet = logging.getLogger("ray.air.result")  # it warns of checkpoints it has no metrics of
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        result = tune.Result.from_path(folder.location)
    finally:
        quiet.setLevel(level)
    return dataclasses.replace(result, error=None)


def kept_outside(results: list[tune.Result], folders: list[TrialFolder]) -> list[tune.Result]:
    """Trials an earlier rebuild kept (they ended) that the restored Tune state does not hold."""
    ids = {Path(r.path).name.split("-")[0] for r in results}
    keys = {config_key(r.config) for r in results if r.config}
    return [ended_result(f) for key, f in _best_per_config(folders).items()
            if key not in keys and f.trial_id not in ids and f.kept]
