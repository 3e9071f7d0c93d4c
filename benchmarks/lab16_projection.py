"""A finished run of a preset on a sample, projected stage by stage to the full lab16 split.

    python -m boatray.sweep --config ray_jobs/lab6-lite0.yaml \
        --data /work/shared/data/mardct-sample --set storage_path=/tmp/lite0
    python benchmarks/lab16_projection.py --results /tmp/lite0/lab6-lite0

Method: each stage's measured wall time on the sample (the run's timing.json) keeps its fixed
part (process starts, Tune, the report) and gets the per-image part that the extra images add,
from boatray's own estimate (boatray/estimate.py: a calibration of a few seconds on this node,
scaled by each stage's images, epochs and concurrency) for lab16's counts minus its estimate
for the sample's: projected = measured + estimate(lab16) - estimate(sample). lab16 keeps the
sample's share of validation images. The sweep is a range where ASHA may stop trials early.
The last line, `projected lab16 minutes: X to Y`, is the projection's total; `estimate /
actual on the sample` says how far the estimate itself was from the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from boatray import config, estimate
from boatray.data.manifest import read_manifest
from boatray.results import Layout
from common import print_footer, print_header, print_table

LAB16_TRAIN_VALID, LAB16_TEST = 3869, 1324


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results/lab6-lite0"),
                        help="a finished run's results folder (with timing.json)")
    parser.add_argument("--train-valid", type=int, default=LAB16_TRAIN_VALID)
    parser.add_argument("--test", type=int, default=LAB16_TEST)
    return parser


def scaled(frame: pd.DataFrame, train_valid: int, test: int) -> pd.DataFrame:
    """A manifest of `train_valid` + `test` rows with `frame`'s share of validation images."""
    counts = frame.split.value_counts()
    valid = round(train_valid * counts.get("valid", 0)
                  / max(1, counts.get("train", 0) + counts.get("valid", 0)))
    splits = ["train"] * (train_valid - valid) + ["valid"] * valid + ["test"] * test
    return pd.DataFrame({"split": splits, "label_idx": 0, "path": ""})


def main() -> None:
    args = build_parser().parse_args()
    print_header(f"{args.results.name} on the sample, projected to lab16's "
                 f"{args.train_valid} train+valid and {args.test} test images")
    layout = Layout(args.results)
    exp = config.from_dict(json.loads(layout.experiment.read_text()))
    exp = config.from_dict({**exp.to_dict(), "train": {**exp.to_dict()["train"],
                                                       "use_gpu": False},
                            "features": {**exp.to_dict()["features"], "use_gpu": False}})
    frame, _ = read_manifest(layout.data / "manifest.parquet")
    actual = json.loads((args.results / estimate.TIMING_FILE).read_text())["actual"]
    cal = estimate.calibrate(exp, frame)
    sample = estimate.estimate(exp, frame, 1, cal).stages
    lab16 = estimate.estimate(exp, scaled(frame, args.train_valid, args.test), 1, cal).stages
    rows, low, high = [], 0.0, 0.0
    for stage, seconds in actual.items():
        if stage not in sample:
            continue
        span = [seconds + lab16[stage][i] - sample[stage][i] for i in (0, 1)]
        low, high = low + span[0], high + span[1]
        rows.append({"stage": stage, "sample actual s": seconds,
                     "sample estimate s": sum(sample[stage]) / 2,
                     "estimate / actual": sum(sample[stage]) / 2 / seconds if seconds else None,
                     "lab16 projected s": (f"{span[0]:.0f}" if round(span[0]) == round(span[1])
                                           else f"{span[0]:.0f} to {span[1]:.0f}")})
    rows.append({"stage": "TOTAL", "sample actual s": sum(actual.values()),
                 "sample estimate s": sum(sum(s) / 2 for s in sample.values()),
                 "lab16 projected s": f"{low:.0f} to {high:.0f}"})
    print(f"calibration: {cal.seconds:.1f} s on this node ({cal.node}; {cal.trunk_rate})")
    print_table(rows)
    print_footer()
    print(f"projected lab16 minutes: {low / 60:.1f} to {high / 60:.1f}", flush=True)


if __name__ == "__main__":
    main()
