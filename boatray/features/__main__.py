"""`python -m boatray.features`: extract the backbone features of every manifest image."""

from __future__ import annotations

import argparse

from boatray import config as config_module
from boatray import preflight
from boatray.cluster import start_ray
from boatray.data.manifest import ensure_manifest
from boatray.errors import cli
from boatray.features.pipeline import extract_experiment


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.features`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.features",
        description="Extract backbone features of every manifest image with Ray Data.")
    config_module.add_arguments(parser)
    parser.add_argument("--manifest", type=config_module.absolute_path,
                        help="manifest.parquet (default: the experiment's, prepared when needed)")
    parser.add_argument("--out", type=config_module.absolute_path,
                        help="output features file (default: the experiment's, under "
                             "results/<experiment>/features/)")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """`python -m boatray.features [--config F] [--set k=v] [--data D] [--manifest P] [--out P]`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    out = args.out or exp.layout.features
    print(f"results: {out.parent}", flush=True)
    start_ray()
    exp, _ = preflight.check(exp)
    extract_experiment(exp, args.manifest or ensure_manifest(exp), out)
    print(f"results: {out.parent}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
