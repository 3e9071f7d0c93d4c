"""The report's sections, in reading order, built from a loaded LoadedResults."""

from __future__ import annotations

import re

import pandas as pd
import yaml

from boatray import approaches, estimate
from boatray.report import plots, tables
from boatray.report.render import Code, Plot, Section, Table, format_frame
from boatray.report.study import LoadedResults
from boatray.results import RUN_JSON

FORMATS = {"train_seconds": "{:.1f}", "wall_seconds": "{:.1f}", "device_seconds": "{:.1f}",
           "total_seconds": "{:.1f}", "prefix_cache_seconds": "{:.1f}",
           "extraction_seconds": "{:.1f}", "fit_seconds": "{:.1f}",
           "images_per_second": "{:.1f}", "epoch_seconds": "{:.1f}", "epochs": "{:.0f}",
           "speedup": "{:.1f}x", "p_value": "{:.3g}", "n": "{:.0f}", "only_a_right": "{:.0f}",
           "only_b_right": "{:.0f}"}


def build(study: LoadedResults, headline: pd.DataFrame, significance: pd.DataFrame,
          resamples: int, seed: int) -> list[Section]:
    """Every section the data in `study` supports, then what is missing, config and
    environment (`headline`, `significance`: tables.headline and tables.significance of it)."""
    sections = [status_section(study),
                synthetic_banner(study),
                summary(study, headline, significance),
                headline_section(study, headline, resamples, seed),
                cost_section(study),
                repeats_section(study),
                significance_section(study, significance),
                backbone_section(study),
                sweep_section(study),
                curves_section(study),
                per_class_section(study),
                confusion_section(study),
                missing_section(study),
                environment_section(study)]
    return [s for s in sections if s is not None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def synthetic_banner(study: LoadedResults) -> Section | None:
    """A warning first of all when the images were generated (data.source null)."""
    data = study.config.get("data")
    if not isinstance(data, dict) or data.get("source") is not None:
        return None
    return Section("SYNTHETIC DATA: these are not MarDCT results", [
        "The images of this run were GENERATED (data.source is null: boatray's synthetic "
        "boat shapes). Its scores test the pipeline and say nothing about real boats. Run "
        "with --config ray_jobs/lab6.yaml --data DIR for the study."])


def status_section(study: LoadedResults) -> Section | None:
    """First, when the run did not finish or a stage failed: what this report is not."""
    state = study.state or {}
    status = state.get("status")
    partial = "What follows is partial: it is not the study."
    if status == "interrupted":
        return Section("This run was interrupted", [
            f"The run was stopped by {state.get('signal', 'a signal')} before it finished. "
            f"{partial} Finish it with: {state.get('resume', '--resume')}"])
    if status == "failed":
        return Section("This run failed", [
            f"The run stopped: {state.get('cause', 'see run_state.json')}. {partial} Finish it "
            f"with: {state.get('resume', '--resume')}"])
    if status == "running":
        return Section("This run has not finished", [
            "run_state.json says the run is still running, or its driver was killed. "
            f"{partial} Finish a killed run with the same command and --resume."])
    failures = state.get("failures") or []
    if failures:
        return Section("Failed stages", [
            "These stages (or trials) failed; what they would have produced is missing below:",
            [str(failure) for failure in failures]])
    return None


def summary(study: LoadedResults, headline: pd.DataFrame, significance: pd.DataFrame) -> Section:
    """The answer in a few sentences: which approach, by how much, at what cost, is it real."""
    approaches = sorted({c.approach for c in study.configurations})
    sizes = sorted(headline["n_test"].unique())
    images = (f"the same {sizes[0]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}")
    lines = [f"{len(study.configurations)} configuration(s) of {len(approaches)} approach(es) "
             f"({', '.join(approaches)}), scored on {images} test images."]
    for column, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        top = headline.loc[headline[column].idxmax()]
        lines.append(f"Highest test {name}: {top['configuration']}, {top[column]:.3f} "
                     f"(95% CI {top[column + '_lo']:.3f} to {top[column + '_hi']:.3f}).")
    timed = headline.dropna(subset=["train_seconds"])
    if len(timed) > 1:
        fast = timed.loc[timed["train_seconds"].idxmin()]
        slow = timed.loc[timed["train_seconds"].idxmax()]
        lines.append(f"Fastest to train: {fast['configuration']} ({fast['train_seconds']:.1f} s), "
                     f"{fast['speedup']:.1f}x faster than the slowest, {slow['configuration']} "
                     f"({slow['train_seconds']:.1f} s).")
    if significance["p_value"].notna().any():
        ranked = headline.set_index("configuration")["accuracy"]
        pairs = significance.dropna(subset=["p_value"])
        pairs = pairs.assign(score=[ranked[a] + ranked[b] for a, b in zip(pairs["a"], pairs["b"])])
        lines.append("Is the gap between the two best real? "
                     + pairs.loc[pairs["score"].idxmax(), "meaning"])
    lines += tables.edge_notes(study) + tables.label_rule_notes(study)
    if study.missing:
        lines.append(f"Not in this results folder: {', '.join(study.missing)}.")
    return Section("Summary", [lines])


def headline_section(study: LoadedResults, headline: pd.DataFrame, resamples: int,
                     seed: int) -> Section:
    """Every configuration's test scores with confidence intervals, time and speed-up."""
    shown = headline.assign(**{
        f"{name} [95% CI]": [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                             zip(headline[col], headline[col + "_lo"], headline[col + "_hi"])]
        for col, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1"))})
    shown = shown[["configuration", "seeds", "accuracy [95% CI]", "macro F1 [95% CI]",
                   "weighted_precision", "weighted_recall", "weighted_f1", "macro_precision",
                   "macro_recall", "log_loss", "top2_accuracy", "train_seconds",
                   "images_per_second", "speedup"]]
    shown = format_frame(shown, FORMATS).rename(columns={
        "weighted_precision": "weighted P", "weighted_recall": "weighted R",
        "weighted_f1": "weighted F1", "macro_precision": "macro P", "macro_recall": "macro R",
        "log_loss": "log loss", "top2_accuracy": "top-2 acc", "train_seconds": "train time (s)",
        "images_per_second": "images/s", "speedup": "speed-up"})
    blocks = [
        ("Scores on the test split only. For a configuration run with several seeds each score "
         "is the mean over its seeds. Intervals: percentile bootstrap over the test images "
         f"({resamples} resamples, seed {seed}). Train time counts everything the approach "
         "needed (the cost table's total_seconds: a fine-tune's frozen-prefix cache build "
         "included); speed-up is the slowest train time divided by this one; images/s counts "
         "what the cost table's rate_counts says."),
        Table("headline", headline, shown)]
    empty = _classes_without_test_images(study)
    if empty:
        blocks.append(f"{len(empty)} class(es) have no test image ({', '.join(empty)}); the "
                      "macro averages count them as 0 (scikit-learn's zero_division=0).")
    return Section("Headline: every approach on the test set", blocks)


def _classes_without_test_images(study: LoadedResults) -> list[str]:
    per_class = tables.per_class_f1(study)
    return list(per_class.index[per_class["support"] == 0])


def cost_section(study: LoadedResults) -> Section:
    """The timing fields of every configuration."""
    cost = tables.cost(study)
    shown = cost.dropna(axis=1, how="all").drop(columns="approach")
    return Section("Cost: where the time went", [
        (f"Seconds from {RUN_JSON} (mean over seeds). total_seconds counts everything the "
         "approach needed: wall_seconds (the whole run; for the SVM and probe it includes "
         "their feature extraction, extraction_seconds, and classifier fit, fit_seconds) plus "
         "prefix_cache_seconds, the frozen-prefix cache a fine-tune trained from (charged in "
         "full to every run that used it, though runs with the same freeze spec share it). "
         "device_seconds, the time on an accelerator, appears only for runs that had one. "
         "images_per_second counts what rate_counts says: images through the network, or "
         "cached activations, which skip the frozen layers and are not comparable with "
         "images. epochs is the length of the run's history."),
        Table("cost", cost, format_frame(shown, FORMATS)),
        *_estimate_items(study)])


def _estimate_items(study: LoadedResults) -> list:
    """Each stage's wall time as the run estimated it before it started, and as it was."""
    times = estimate.stage_times(study.results_dir)
    if times is None:
        return []
    return [f"Each stage's wall time as estimated before the run (from a calibration on the "
            f"driver's node, {estimate.TIMING_FILE}) and as it was:",
            Table("estimate", times, format_frame(times, {
                "estimated_seconds": "{:.0f}", "actual_seconds": "{:.0f}",
                "actual / estimate": "{:.2f}"}))]


def repeats_section(study: LoadedResults) -> Section | None:
    """Mean and standard deviation over seeds, where configurations were repeated."""
    summary_table = tables.repeat_summary(study)
    if summary_table.empty:
        return None
    wanted = {"accuracy": "accuracy", "macro_f1": "macro F1", "weighted_f1": "weighted F1",
              "log_loss": "log loss"}
    picked = summary_table[summary_table["score"].isin(wanted)]
    shown = picked.assign(value=[f"{m:.3f} ± {s:.3f}" for m, s in
                                 zip(picked["mean"], picked["std"])])
    shown = shown.pivot(index=["configuration", "repeats"], columns="score", values="value")
    shown = (shown[[k for k in wanted if k in shown.columns]].rename(columns=wanted)
             .reset_index().rename_axis(columns=None))
    per_seed = tables.repeat_scores(study)
    return Section("Repeats: how much the seed alone moves the scores", [
        ("Mean ± standard deviation over the seeds of each repeated configuration (test split). "
         "A gap between configurations smaller than these spreads is not a ranking."),
        Table("repeats_summary", summary_table, shown),
        Table("repeats_per_seed", per_seed, format_frame(per_seed))])


def significance_section(study: LoadedResults, significance: pd.DataFrame) -> Section:
    """McNemar's exact test between every approach's configuration in the comparison."""
    blocks = [("McNemar's exact test looks only at the test images on which two approaches "
               "disagree (one right, the other wrong) and asks how likely so uneven a split "
               "would be if both were equally accurate. Each approach takes part with one "
               "configuration, and each configuration with the predictions of its first seed.")]
    for approach in approaches.APPROACHES:
        configurations = study.of(approach.name)
        if len(configurations) > 1:
            best, rule = tables.best_of(configurations)
            blocks.append(f"{approach.title} in this comparison: {best.label} ({rule}).")
    if significance.empty:
        blocks.append("There is only one approach here, so there is nothing to compare.")
        return Section("Is the difference real? (McNemar)", blocks)
    shown = format_frame(significance.drop(columns="meaning"), FORMATS).rename(columns={
        "a": "A", "b": "B", "only_a_right": "only A right", "only_b_right": "only B right",
        "p_value": "p (two-sided)"})
    blocks += [Table("mcnemar", significance, shown), list(significance["meaning"])]
    return Section("Is the difference real? (McNemar)", blocks)


def sweep_section(study: LoadedResults) -> Section | None:
    """The freeze x lr table of the validation metric, its heatmap and every trial's curve."""
    metric = tables.sweep_metric(study)
    if metric is None:
        return None
    summary_table = tables.sweep_summary(study.trials, metric)
    blocks = [(f"{study.trials['trial_id'].nunique()} trials; each trial's {metric} at its last "
               "reported epoch (trials that early stopping ended early have fewer epochs), "
               "averaged over repeats. This is the validation split: the test set played no part "
               "in selection.")]
    grid = tables.sweep_grid(summary_table)
    if grid is not None:
        shown_grid = format_frame(grid.rename(columns=lambda lr: f"lr {lr:g}")).reset_index()
        blocks += [Table("sweep_grid", grid, shown_grid),
                   Plot("sweep_heatmap", plots.sweep_heatmap(grid, metric),
                        f"{metric} by freeze spec and learning rate")]
    blocks.append(Table("sweep_summary", summary_table,
                        format_frame(summary_table.rename(columns={"mean": metric}),
                                     {**FORMATS, "lr": "{:g}"})))
    blocks.append(Plot("sweep_curves", plots.sweep_curves(study.trials, metric),
                       f"{metric} of every trial by epoch"))
    blocks.append(Table("trials", tables.sweep_trials(study.trials, metric)))
    return Section("Fine-tuning sweep (validation)", blocks)


def curves_section(study: LoadedResults) -> Section | None:
    """Learning curves of the runs that recorded a history."""
    history = tables.histories(study)
    if history.empty:
        return None
    return Section("Learning curves", [
        ("Per-epoch loss and accuracy of each selected run (first seed): training dashed, "
         "validation solid."),
        Plot("learning_curves", plots.learning_curves(history), "loss and accuracy by epoch"),
        Table("learning_curves", history)])


def per_class_section(study: LoadedResults) -> Section:
    """F1 of every class by approach, as the seeds' per-class tables gave it."""
    per_class = tables.per_class_f1(study)
    shown = format_frame(per_class, {"support": "{:.0f}"}).rename_axis("class").reset_index()
    return Section("Per-class F1", [
        ("F1 of each class on the test split (mean over seeds), with the class's number of test "
         "images. Every run's full per-class precision, recall and F1 are in "
         "tables/classification_reports.csv."),
        Table("per_class_f1", per_class, shown),
        Plot("per_class_f1", plots.per_class_heatmap(per_class), "F1 per class and approach"),
        Table("classification_reports", tables.classification_reports(study))])


def confusion_section(study: LoadedResults) -> Section:
    """Confusion matrices: plotted for the compared approaches, saved for every configuration."""
    shown = tables.confusions(tables.contenders(study))
    blocks: list = [("Rows are the true class, columns the predicted class; numbers are image "
                     "counts, shading is the share of the true class. Plotted for the approaches "
                     "compared above (first seed); every configuration's matrix is saved as CSV."),
                    Plot("confusion_matrices", plots.confusion_grid(shown),
                         "confusion matrices on the test split")]
    blocks += [Table(f"confusion_{_slug(label)}", matrix)
               for label, matrix in tables.confusions(study.configurations).items()]
    return Section("Confusion matrices", blocks)


def missing_section(study: LoadedResults) -> Section | None:
    """What this results folder lacks, so a partial report says so."""
    items = [f"no {approach} run" for approach in study.missing]
    if study.trials is None:
        items.append(f"no {study.layout.trials.name}: no sweep table")
    no_history = [c.label for c in study.configurations
                  if getattr(approaches.get(c.approach), "trains_network", False)
                  and not c.record.get("history")]
    if no_history:
        items.append(f"no learning curve ({RUN_JSON} has no history): {', '.join(no_history)}")
    untimed = [c.label for c in study.configurations if "wall_seconds" not in c.record]
    if untimed:
        items.append(f"no wall_seconds: {', '.join(untimed)}")
    items += study.notes
    return Section("What is missing", [items]) if items else None


def backbone_section(study: LoadedResults) -> Section | None:
    """The backbone, which pretrained weights it started from and where they came from, and
    the stages each freeze spec trains (backbone.json)."""
    backbone = study.backbone
    if not backbone:
        return None
    source = backbone.get("weights") or {}
    origin = "".join(f", {key} {source[key]}" for key in ("file", "sha256") if key in source)
    lines = [f"Backbone {backbone.get('model')}; weights `{source.get('weights')}`: "
             f"{source.get('description', 'not recorded')}{origin}."]
    stages = pd.DataFrame(backbone.get("stages") or [])
    if not stages.empty:
        lines += ["What each freeze spec trains (the rest stays frozen):",
                  Table("freeze_specs", stages, format_frame(stages))]
    return Section("Backbone and pretrained weights", lines)


def environment_section(study: LoadedResults) -> Section:
    """Ray and torch versions, nodes and GPUs (the runs' `host`), and the experiment's config."""
    environment = tables.environment(study)
    blocks: list = [_environment_sentence(environment), Table("environment", environment,
                                                               format_frame(environment))]
    config = study.config
    source = (study.layout.experiment.name if study.experiment is not None
              else f"the first {RUN_JSON}")
    if config:
        blocks += [f"The experiment's config (from {source}):",
                   Code(yaml.safe_dump(config, sort_keys=False, default_flow_style=None)),
                   Table("config", tables.config_rows(config))]
    else:
        blocks.append("No config was recorded.")
    return Section("Configuration and environment", blocks)


def _environment_sentence(environment: pd.DataFrame) -> str:
    def values(column: str) -> str:
        found = environment[column].dropna().astype(str).unique() if column in environment else []
        return ", ".join(found) if len(found) else "not recorded"

    if "nodes" in environment and environment["nodes"].notna().any():
        nodes = int(environment["nodes"].max())
    else:
        nodes = environment["hostname"].nunique()
    if "cluster_gpus" in environment and environment["cluster_gpus"].notna().any():
        gpus = int(environment["cluster_gpus"].max())
    elif "gpus" in environment:
        gpus = int(environment.groupby("hostname")["gpus"].max().fillna(0).sum())
    else:
        gpus = 0
    gpu_names = values("gpu_name")
    return (f"Ray {values('ray')}, torch {values('torch')}, Python {values('python')}; "
            f"{nodes} node(s), {gpus} GPU(s)"
            + (f" ({gpu_names})." if gpu_names != "not recorded" else "."))
