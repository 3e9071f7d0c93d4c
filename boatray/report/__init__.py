"""The comparison report: `python -m boatray.report RESULTS_DIR [--out DIR]`.

Which approach, by how much, at what cost, and is the difference real: answered from the
results folder alone (results.Layout: every run folder's predictions and run record, the
sweep's trials, the experiment's config and backbone), knowing nothing of how a prediction was
made. Only test rows are scored. It writes report.md, a self-contained report.html,
figures/*.png and tables/*.csv to --out (default RESULTS_DIR/report), each atomically;
sections with no data are listed under "What is missing"; a folder with no run is an error.
RESULTS_DIR may be a storage URI (s3://...): the report is written from what is there, and to
its report/ unless --out says where.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from boatray import storage
from boatray.errors import BoatrayError, cli
from boatray.report import render, sections, tables
from boatray.report.study import LoadedResults, load_study
from boatray.results import Layout

DEFAULT_RESAMPLES = 1000
_LAYOUT = Layout(Path())
INPUTS = tuple(path.name for path in (_LAYOUT.runs, _LAYOUT.trials, _LAYOUT.experiment,
                                      _LAYOUT.backbone, _LAYOUT.state))
"""What the report reads of a results folder (study.load_study)."""


@dataclass
class WrittenReport:
    """A written report: report.html, and what the closing summary reads from it (the results
    it was made of, its headline and McNemar tables)."""

    html: Path
    study: LoadedResults
    headline: pd.DataFrame
    significance: pd.DataFrame


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 resamples: int | None = None, seed: int | None = None) -> WrittenReport:
    """Write the report of `results_dir`.

    `resamples` and `seed` default to the config's `report.bootstrap` and `seed`.
    """
    study = load_study(results_dir)
    config = study.config
    resamples = resamples or (config.get("report") or {}).get("bootstrap") or DEFAULT_RESAMPLES
    if resamples < DEFAULT_RESAMPLES:
        raise BoatrayError(f"bootstrap resamples must be >= {DEFAULT_RESAMPLES}, got {resamples}")
    seed = seed if seed is not None else int(config.get("seed") or 0)
    name = config.get("name") or study.results_dir.resolve().name
    out = Path(out_dir) if out_dir is not None else study.results_dir / "report"
    headline = tables.headline(study, int(resamples), seed)
    significance = tables.significance(study)
    html = render.write(out, f"boatray report: {name}",
                        sections.build(study, headline, significance, int(resamples), seed))
    return WrittenReport(html, study, headline, significance)


def write_from_storage(uri: str, out_dir: str | Path | None = None, resamples: int | None = None,
                       seed: int | None = None) -> Path | str:
    """The report of results at a storage URI: its inputs downloaded, the report written to
    `out_dir`, or by default uploaded to the URI's report/; returns where report.html is."""
    with tempfile.TemporaryDirectory(prefix="boatray-report-") as temporary:
        local = Path(temporary) / storage.name(uri)
        storage.fetch(uri, local, INPUTS)
        html = write_report(local, out_dir, resamples, seed).html
        if out_dir is not None:
            return html
        storage.replace_folder(html.parent, storage.join(uri, html.parent.name))
        return storage.join(uri, html.parent.name, html.name)


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.report`."""
    p = argparse.ArgumentParser(
        prog="python -m boatray.report",
        description="Write the comparison report (report.md, report.html, figures, CSV tables) "
                    "of a results folder.")
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="results/<experiment>/ folder, or its storage URI (s3://...)")
    p.add_argument("--out", metavar="DIR", help="where to write (default RESULTS_DIR/report)")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="bootstrap resamples, >= 1000 (default: the config's report.bootstrap)")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: the config's seed)")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    """Write the report and print where it is."""
    args = parser().parse_args(argv)
    if storage.is_remote(args.results_dir):
        html = write_from_storage(args.results_dir, args.out, args.bootstrap, args.seed)
    else:
        html = write_report(args.results_dir, args.out, args.bootstrap, args.seed).html
    print(f"report: {html} (and report.md, figures/, tables/ beside it)")
    return 0
