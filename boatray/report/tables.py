"""The report's tables as DataFrames of plain numbers (the CSV copies are exactly these)."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from boatray import approaches, metrics
from boatray.config import FREEZE_SPECS, flatten
from boatray.errors import BoatrayError
from boatray.report.study import Configuration, LoadedResults
from boatray.results import classes_of

SIGNIFICANCE = 0.05
SWEEP_METRICS = ("valid_macro_f1", "valid_accuracy", "valid_loss")
SWEEP_KEYS = ("freeze", "lr", "scheduler")
TIMINGS = ("wall_seconds", "prefix_cache_seconds", "extraction_seconds", "fit_seconds",
           "device_seconds", "images_per_second")


def _mean_of(configuration: Configuration, key: str) -> float:
    values = [r.record.get(key) for r in configuration.runs]
    if key == "device_seconds":  # time on an accelerator: only runs that had one
        values = [v for r, v in zip(configuration.runs, values)
                  if (r.record.get("host") or {}).get("gpus")]
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(numbers)) if numbers else float("nan")


def total_seconds(configuration: Configuration) -> float:
    """Everything the approach needed (mean over seeds): the run's wall time plus the
    frozen-prefix cache it trained from (the SVM's and probe's include their extraction)."""
    return float(np.mean([float(r.record.get("wall_seconds") or 0.0)
                          + float(r.record.get("prefix_cache_seconds") or 0.0)
                          for r in configuration.runs]))


def rate_counts(configuration: Configuration) -> str:
    """What `images_per_second` counts for this configuration."""
    approach = approaches.get(configuration.approach)
    if approach is not None and approach.uses_features:
        return "images through the trunk (extraction)"
    if configuration.record.get("trained_on") == "cached activations":
        return "cached activations (training)"
    return "images through the network (training)"


def headline(study: LoadedResults, resamples: int, seed: int) -> pd.DataFrame:
    """One row per configuration: test scores (mean over seeds), 95% CIs, time and speed-up."""
    rows = []
    for configuration in study.configurations:
        tests = configuration.tests
        mean = pd.DataFrame([run.scores for run in configuration.runs]).mean()
        ci = metrics.bootstrap_ci(tests[0]["y_true"].to_numpy(),
                                  np.vstack([t["y_pred"].to_numpy() for t in tests]),
                                  len(classes_of(tests[0])), resamples=resamples, seed=seed)
        rows.append({
            "configuration": configuration.label, "approach": configuration.approach,
            "seeds": len(tests), "n_test": len(tests[0]),
            "accuracy": mean["accuracy"], "accuracy_lo": ci["accuracy"][0],
            "accuracy_hi": ci["accuracy"][1], "macro_f1": mean["macro_f1"],
            "macro_f1_lo": ci["macro_f1"][0], "macro_f1_hi": ci["macro_f1"][1],
            **{k: mean[k] for k in ("weighted_precision", "weighted_recall", "weighted_f1",
                                    "macro_precision", "macro_recall", "log_loss",
                                    "top2_accuracy")},
            "train_seconds": total_seconds(configuration),
            "images_per_second": _mean_of(configuration, "images_per_second"),
        })
    table = pd.DataFrame(rows)
    table["speedup"] = table["train_seconds"].max() / table["train_seconds"]
    return table


def cost(study: LoadedResults) -> pd.DataFrame:
    """Where the time went: every timing field of the run records (mean over seeds) and
    epochs run."""
    return pd.DataFrame([{
        "configuration": c.label, "approach": c.approach,
        **{key: _mean_of(c, key) for key in TIMINGS},
        "total_seconds": total_seconds(c), "rate_counts": rate_counts(c),
        "epochs": len(c.record.get("history") or []) or np.nan,
    } for c in study.configurations])


def repeat_scores(study: LoadedResults) -> pd.DataFrame:
    """Test scores of every seed of the configurations that were repeated."""
    return pd.DataFrame([
        {"configuration": c.label, "seed": run.seed, **run.scores}
        for c in study.configurations if len(c.runs) > 1 for run in c.runs])


def repeat_summary(study: LoadedResults) -> pd.DataFrame:
    """Mean and standard deviation over seeds, one row per repeated configuration and score."""
    frames = [metrics.across_repeats([run.scores for run in c.runs])
              .rename_axis("score").reset_index()
              .assign(configuration=c.label)
              for c in study.configurations if len(c.runs) > 1]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)[["configuration", "score", "mean", "std",
                                                  "repeats"]]


def classification_reports(study: LoadedResults) -> pd.DataFrame:
    """Every run's per-class precision, recall, F1 and support, long form."""
    frames = [run.classification.rename_axis("class").reset_index()
              .assign(configuration=c.label, seed=run.seed)
              for c in study.configurations for run in c.runs]
    table = pd.concat(frames, ignore_index=True)
    return table[["configuration", "seed", "class", "precision", "recall", "f1-score",
                  "support"]]


def per_class_f1(study: LoadedResults) -> pd.DataFrame:
    """F1 of each class (rows, by name) for each configuration (columns; mean over seeds)."""
    reports = classification_reports(study)
    reports = reports[~reports["class"].isin(metrics.AVERAGES)]
    table = reports.pivot_table(index="class", columns="configuration", values="f1-score",
                                aggfunc="mean", sort=False)
    support = reports.groupby("class", sort=False)["support"].first()
    table = table[[c.label for c in study.configurations]]
    table.insert(0, "support", support.loc[table.index])
    return table.rename_axis(columns=None)


def confusions(configurations: list[Configuration]) -> dict[str, pd.DataFrame]:
    """The confusion matrix of each configuration's representative run (first seed)."""
    return {c.label: metrics.confusion(c.tests[0]) for c in configurations}


def best_of(configurations: list[Configuration]) -> tuple[Configuration | None, str]:
    """The configuration of one approach that the comparison uses, and how it was chosen
    (never by test): the one its selection marked best, the only one, or the best on valid."""
    if not configurations:
        return None, ""
    marked = [c for c in configurations if c.selected == "best"]
    if marked:
        return marked[0], "its selection chose it on the validation split"
    if len(configurations) == 1:
        return configurations[0], "it is the approach's only configuration"
    if all(not r.valid.empty for c in configurations for r in c.runs):
        valid = {c.label: np.mean([metrics.scores(r.valid)["macro_f1"] for r in c.runs])
                 for c in configurations}
        best = max(configurations, key=lambda c: valid[c.label])
        return best, "it has the highest validation macro F1 of the approach's configurations"
    return configurations[0], "no run is marked best and validation predictions are missing"


def contenders(study: LoadedResults) -> list[Configuration]:
    """Each approach's configuration that the comparison uses (`best_of`), in registry order."""
    chosen = (best_of(study.of(approach.name))[0] for approach in approaches.APPROACHES)
    return [configuration for configuration in chosen if configuration is not None]


def meaning(a: str, b: str, test: metrics.McNemar) -> str:
    """One plain sentence saying what a McNemar result means."""
    if test.discordant == 0:
        return f"{a} and {b} are right and wrong on exactly the same images: no difference."
    if test.only_a_right == test.only_b_right:
        verdict = "so the test set shows no difference between them"
    elif test.p_value < SIGNIFICANCE:
        winner = a if test.only_a_right > test.only_b_right else b
        verdict = f"so {winner} is really the more accurate here (p < {SIGNIFICANCE:g})"
    else:
        verdict = "so this test set cannot tell them apart"
    return (f"{a} is right on {test.only_a_right} test images where {b} is wrong and {b} on "
            f"{test.only_b_right} where {a} is wrong; if both were equally accurate a split at "
            f"least this uneven would happen with probability {test.p_value:.2g}, {verdict}.")


def significance(study: LoadedResults) -> pd.DataFrame:
    """McNemar's exact test between every pair of contenders (first seed of each)."""
    rows = []
    for a, b in combinations(contenders(study), 2):
        try:
            test = metrics.mcnemar(a.tests[0], b.tests[0])
        except BoatrayError as exc:
            rows.append({"a": a.label, "b": b.label, "meaning": f"{a.label} and {b.label} cannot "
                         f"be compared: {exc}."})
            continue
        rows.append({"a": a.label, "b": b.label, "n": test.n, "only_a_right": test.only_a_right,
                     "only_b_right": test.only_b_right, "p_value": test.p_value,
                     "meaning": meaning(a.label, b.label, test)})
    return pd.DataFrame(rows, columns=["a", "b", "n", "only_a_right", "only_b_right", "p_value",
                                       "meaning"])


def edge_notes(study: LoadedResults) -> list[str]:
    """A sentence for every chosen hyperparameter that sits on the edge of its grid: the best
    value may lie beyond the values tried. Grids are a run record's `grid` rows with its
    `selected` setting (the classical heads), or its `search_space` with the run's own value
    (the fine-tunes' sweep: only for the configurations compared)."""
    notes = []
    for configuration in study.configurations:
        record = configuration.record
        grid = record.get("grid") or []
        selected = record.get("selected")
        for key, chosen in selected.items() if grid and isinstance(selected, dict) else ():
            values = sorted({row[key] for row in grid if isinstance(row.get(key), (int, float))})
            if len(values) > 1 and chosen in (values[0], values[-1]):
                notes.append(_edge(configuration.label, key, chosen, values))
    for configuration in contenders(study):
        record = configuration.record
        for key, values in (record.get("search_space") or {}).items():
            values = sorted({float(v) for v in values})
            chosen = record.get(key)
            if len(values) > 1 and isinstance(chosen, (int, float)) and float(chosen) in (
                    values[0], values[-1]):
                notes.append(_edge(configuration.label, key, float(chosen), values))
    return notes


def _edge(label: str, key: str, chosen: float, values: list[float]) -> str:
    side = "smallest" if chosen == values[0] else "largest"
    return (f"{label}: the selected {key}={chosen:g} is the {side} value of its grid "
            f"({', '.join(f'{v:g}' for v in values)}); a better value may lie beyond it.")


def label_rule_notes(study: LoadedResults) -> list[str]:
    """How the classical heads label images, and how often the SVM's own vote agrees."""
    notes = []
    for configuration in study.configurations:
        record = configuration.record
        if record.get("label_rule"):
            agree = record.get("own_label_agreement")
            notes.append(f"{configuration.label}: labels are {record['label_rule']}, so labels "
                         "and log loss describe one prediction"
                         + (f"; the classifier's own vote agrees on {agree:.1%} of the test "
                            "images" if isinstance(agree, (int, float)) else "") + ".")
    return notes


def sweep_metric(study: LoadedResults) -> str | None:
    """The validation metric the sweep selected by (config sweep.metric), if trials have it."""
    if study.trials is None:
        return None
    wanted = (study.config.get("sweep") or {}).get("metric")
    for name in (wanted, *SWEEP_METRICS):
        if name in study.trials.columns:
            return name
    return None


def _trial_config(trials: pd.DataFrame, key: str) -> pd.Series | None:
    """A config value per trial: Tune's `config/<key>` column, else `<key>` at the first epoch."""
    for column in (f"config/{key}", key):
        if column in trials.columns:
            return trials.sort_values("epoch").groupby("trial_id")[column].first()
    return None


def sweep_trials(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial: its config, epochs run, the metric at its last reported epoch, and
    whether it finished or failed (and why)."""
    last = trials.sort_values("epoch").groupby("trial_id").last()
    table = pd.DataFrame({"epochs": trials.groupby("trial_id")["epoch"].max(),
                          metric: last[metric]})
    for key in (*SWEEP_KEYS, "seed", "repeat", "status", "cause"):
        values = _trial_config(trials, key)
        if values is not None:
            table[key] = values
    for column in ("epoch_seconds", "images_per_second"):
        if column in trials.columns:
            table[column] = trials.groupby("trial_id")[column].mean()
    return table.reset_index()


def sweep_summary(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (freeze, lr, scheduler): the metric's mean and std over the repeats that finished,
    epochs, speed."""
    per_trial = sweep_trials(trials, metric)
    if "status" in per_trial.columns:
        per_trial = per_trial[per_trial["status"] != "failed"]
    keys = [k for k in SWEEP_KEYS if k in per_trial.columns] or ["trial_id"]
    aggregations = {"mean": (metric, "mean"), "std": (metric, "std"),
                    "repeats": ("trial_id", "count"), "epochs": ("epochs", "max")}
    for column in ("epoch_seconds", "images_per_second"):
        if column in per_trial.columns:
            aggregations[column] = (column, "mean")
    summary = per_trial.groupby(keys, dropna=False).agg(**aggregations).reset_index()
    if "freeze" in summary.columns:
        order = {spec: i for i, spec in enumerate(FREEZE_SPECS)}
        summary = summary.sort_values(["freeze"] + (["lr"] if "lr" in keys else []),
                                      key=lambda s: s.map(order) if s.name == "freeze" else -s)
    return summary.reset_index(drop=True)


def sweep_grid(summary: pd.DataFrame) -> pd.DataFrame | None:
    """The freeze x lr table of the metric's mean (rows: freeze[, scheduler]; columns: lr)."""
    if not {"freeze", "lr"} <= set(summary.columns):
        return None
    rows = ["freeze"] + (["scheduler"] if summary.get("scheduler", pd.Series()).nunique() > 1
                         else [])
    grid = summary.pivot_table(index=rows, columns="lr", values="mean", sort=False)
    return grid[sorted(grid.columns, reverse=True)]


def histories(study: LoadedResults) -> pd.DataFrame:
    """Per-epoch history of each configuration's representative run (the run record's `history`)."""
    frames = []
    for configuration in study.configurations:
        history = pd.DataFrame(configuration.record.get("history") or [])
        if history.empty:
            continue
        if "epoch" not in history.columns:
            history.insert(0, "epoch", np.arange(1, len(history) + 1))
        frames.append(history.assign(configuration=configuration.label))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


HOST_FIELDS = ("hostname", "platform", "python", "torch", "ray", "gpus", "gpu_name", "nodes",
               "cluster_gpus", "cpu_bf16")


def environment(study: LoadedResults) -> pd.DataFrame:
    """One row per distinct host the runs report (the run records' `host`), with the runs on it."""
    rows = []
    for configuration in study.configurations:
        for run in configuration.runs:
            host = run.record.get("host") or {}
            rows.append({k: host.get(k) for k in HOST_FIELDS} | {"run": run.record["name"]})
    table = pd.DataFrame(rows)
    keys = [k for k in HOST_FIELDS if table[k].notna().any()] or ["hostname"]
    return (table.groupby(keys, dropna=False, sort=False)["run"].agg(", ".join)
            .rename("runs").reset_index())


def config_rows(config: dict[str, Any]) -> pd.DataFrame:
    """A nested config flattened to `section.key` / value rows."""
    return pd.DataFrame(list(flatten(config).items()), columns=["key", "value"])
