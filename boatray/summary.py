"""The block the sweep prints last: who won, by how much, at what cost, what failed, and what
to do next (the report's file URL, a ready-to-run predict command; with remote storage, the
report's URI, the command that fetches the results and a predict command that reads the
model from the storage, so that they work on another machine).

Its figures are the report's: it reads the tables the report was written from
(`report.WrittenReport`), not their CSV copies.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pandas as pd

from boatray import export, fetch, storage
from boatray.errors import BoatrayError
from boatray.report import WrittenReport, tables

METRICS = {"valid_macro_f1": ("macro_f1", "macro F1"), "valid_accuracy": ("accuracy", "accuracy"),
           "valid_loss": ("accuracy", "accuracy")}


def closing_lines(report: WrittenReport | None, failures: list[str], logs: Path | None,
                  sweep_metric: str = "valid_macro_f1",
                  storage_uri: str | None = None) -> list[str]:
    """The closing summary's lines (without a prefix); `storage_uri`: where the results are
    when that is a remote storage, not the report's results folder (the staging folder)."""
    lines = []
    if report is not None:
        try:
            lines += _outcome(report, sweep_metric, storage_uri)
        except (BoatrayError, OSError) as exc:
            lines.append(f"no winner to name: {exc}")
        lines += ([f"report: {report.html.resolve().as_uri()}"] if storage_uri is None
                  else fetch.remote_lines(storage_uri, report.html))
    for failure in failures:
        lines.append(f"FAILED {failure}" + (f" (Ray's worker logs: {logs})" if logs else ""))
    return lines


def _outcome(report: WrittenReport, sweep_metric: str, storage_uri: str | None) -> list[str]:
    column, name = METRICS.get(sweep_metric, METRICS["valid_macro_f1"])
    headline = report.headline
    contenders = {c.label: c for c in tables.contenders(report.study)}
    ranked = headline[headline["configuration"].isin(contenders)].sort_values(
        column, ascending=False, kind="stable")
    if ranked.empty:
        return []
    best = ranked.iloc[0]
    lines = [f"winner: {best['configuration']}, test {name} {_ci(best, column)}"]
    if len(ranked) > 1:
        second = ranked.iloc[1]
        lines.append(f"margin: {best[column] - second[column]:+.3f} over "
                     f"{second['configuration']} ({_ci(second, column)})"
                     + _mcnemar(report.significance, best["configuration"],
                                second["configuration"]))
    timed = headline.dropna(subset=["train_seconds"])
    if len(timed):
        fast = timed.loc[timed["train_seconds"].idxmin()]
        lines.append(f"fastest: {fast['configuration']}, {fast['train_seconds']:.1f} s counting "
                     "everything it needed (feature extraction, frozen-prefix cache)")
    winner = contenders[best["configuration"]]
    folder = report.study.layout.models / winner.runs[0].folder.name
    if (folder / export.SPEC).is_file():
        images = os.path.commonpath([str(Path(p).parent) for p in winner.tests[0]["path"]])
        model = str(folder)
        if storage_uri is not None:  # from any machine: the model read from the storage, and
            # DIR for images that exist only in this machine's staging folder (generated ones)
            model = storage.join(storage_uri, folder.parent.name, folder.name)
            images = "DIR" if Path(images).is_relative_to(report.study.results_dir) else images
        lines.append("predict with it: " + shlex.join([
            "python", "-m", "boatray.predict", "--model", model, "--images", images,
            "--out", "predictions.csv"]))
    return lines


def _ci(row: pd.Series, column: str) -> str:
    return f"{row[column]:.3f} (95% CI {row[column + '_lo']:.3f} to {row[column + '_hi']:.3f})"


def _mcnemar(significance: pd.DataFrame, a: str, b: str) -> str:
    match = significance[((significance["a"] == a) & (significance["b"] == b))
                         | ((significance["a"] == b) & (significance["b"] == a))]
    if match.empty or pd.isna(match.iloc[0].get("p_value")):
        return ""
    return f"; McNemar p = {match.iloc[0]['p_value']:.3g}"
