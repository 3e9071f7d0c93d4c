"""`python -m boatray.svm`: fit the RBF SVM and the linear probe on a features file."""

from __future__ import annotations

import argparse

from boatray import config as config_module
from boatray.errors import cli
from boatray.svm.heads import fit_experiment


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.svm`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.svm",
        description="Fit the RBF SVM and the linear probe on extracted features; write "
                    "OUT/svm and OUT/probe run folders (predictions and run record).")
    parser.add_argument("--features", required=True,
                        help="a features file from python -m boatray.features")
    parser.add_argument("--out", required=True, help="folder for the svm/ and probe/ run folders")
    config_module.add_arguments(parser)
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """`python -m boatray.svm --features PATH --out DIR [--config FILE] [--set k=v ...]`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    for path in fit_experiment(exp, args.features, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
