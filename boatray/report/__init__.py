"""The comparison report: `python -m boatray.report RESULTS_DIR [--out DIR]`.

It answers "which approach, by how much, at what cost, and is the difference real?" from files
alone, knowing nothing about how a prediction was made. It reads, under RESULTS_DIR
(results/<experiment>/):

- every run folder (boatray.results: predictions.parquet + run.json), at any depth. Only the
  test rows of predictions.parquet are scored (valid rows only pick the best fine-tune when no
  run is marked). run.json fields read, all but `approach`/`name` optional:
  - `approach` (finetune | svm | probe | baseline), `name`, `classes`, `config`;
  - fine-tune runs: `freeze`, `lr`, `scheduler`, `selected` ("best" | "best_per_freeze");
  - repeats of one configuration: the same `config_id`, each with its `seed` (runs without a
    `config_id` are configurations of their own);
  - timing: `wall_seconds` (the train time shown), `device_seconds`, `images_per_second`,
    and for the SVM and probe `extraction_seconds`, `fit_seconds`;
  - `history`: a list of per-epoch dicts (`epoch`, `train_loss`, `valid_loss`,
    `train_accuracy`, `valid_accuracy`, ...) for the learning curves;
  - `host` (boatray.results.host_info: hostname, platform, python, torch, ray, gpus, gpu_name),
    optionally with `nodes` and `cluster_gpus` for the Ray cluster (else distinct host names
    are counted as nodes).
- trials.parquet, if present: the Tune sweep, one row per trial per epoch with `trial_id`,
  `epoch`, the trial's config (`freeze`, `lr`, `scheduler`, `seed`/`repeat`, either plain or as
  Tune's `config/<key>`; a plain `lr` is taken at the trial's first epoch) and its metrics
  (`valid_macro_f1`, `valid_accuracy`, `valid_loss`, `epoch_seconds`, `images_per_second`...).
  A trial's score is its metric at its last reported epoch; the metric is the config's
  `sweep.metric`.
- experiment.json, if present: the full config (else the first run.json's `config`).
- backbone.json, if present: the backbone, its weights' source (file, sha256) and what each
  freeze spec trains (`boatray.models.describe`).

It writes, to --out (default RESULTS_DIR/report): report.md, a self-contained report.html,
figures/*.png and tables/*.csv (a CSV copy of every table), each file atomically. Sections with
no data are left out and listed under "What is missing"; a folder with no run is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from boatray.errors import BoatrayError, cli
from boatray.report import render, sections
from boatray.report.study import load_study

DEFAULT_RESAMPLES = 1000


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 resamples: int | None = None, seed: int | None = None) -> Path:
    """Write the report of `results_dir`; returns the path of report.html.

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
    return render.write(out, f"boatray report: {name}",
                        sections.build(study, int(resamples), seed))


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.report`."""
    p = argparse.ArgumentParser(
        prog="python -m boatray.report",
        description="Write the comparison report (report.md, report.html, figures, CSV tables) "
                    "of a results folder.")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="results/<experiment>/ folder")
    p.add_argument("--out", metavar="DIR", help="where to write (default RESULTS_DIR/report)")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="bootstrap resamples, >= 1000 (default: the config's report.bootstrap)")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: the config's seed)")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    """Write the report and print where it is."""
    args = parser().parse_args(argv)
    html = write_report(args.results_dir, args.out, args.bootstrap, args.seed)
    print(f"report: {html} (and report.md, figures/, tables/ beside it)")
    return 0
