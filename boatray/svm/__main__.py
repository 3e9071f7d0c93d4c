"""`python -m boatray.svm`: fit every enabled classical head (the approaches on features: the
RBF SVM, the linear probe, ...) on a features file; OUT/<head>/ is each run folder and
OUT/models/<head>/ its exported model."""

from __future__ import annotations

import argparse
from pathlib import Path

from boatray import approaches
from boatray import config as config_module
from boatray.errors import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.svm`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.svm",
        description="Fit the classical heads (RBF SVM, linear probe, ...) on extracted "
                    "features; write OUT/<head> run folders (predictions and run record) and "
                    "OUT/models/<head> exported models.")
    parser.add_argument("--features", required=True, type=config_module.absolute_path,
                        help="a features file from python -m boatray.features")
    parser.add_argument("--out", required=True, type=config_module.absolute_path,
                        help="folder for the run folders and models/")
    config_module.add_arguments(parser)
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """`python -m boatray.svm --features PATH --out DIR [--config FILE] [--set k=v ...]`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    out = Path(args.out)
    for head in approaches.enabled(exp.to_dict()):
        if head.uses_features:
            run_dir = head.fit_file(args.features, out / head.name, head.settings(exp),
                                    exp.seed, exp.to_dict(), out / "models" / head.name)
            print(f"wrote {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
