"""`python -m boatray.data prepare|synthetic`: make a manifest, or generate a synthetic set.

    python -m boatray.data prepare --source PATH --protocol lab16|full --out DIR
    python -m boatray.data synthetic --out DIR [--classes N] [--train-per-class N] ...
"""

from __future__ import annotations

import argparse
import sys

from boatray.config import SyntheticConfig, from_dict
from boatray.data import manifest, mardct, synthetic
from boatray.data.imagefiles import MAX_PIXELS
from boatray.errors import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.data`."""
    parser = argparse.ArgumentParser(prog="python -m boatray.data",
                                     description="Prepare boatray's data.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    prepare = verbs.add_parser(
        "prepare", description="Write manifest.parquet from raw MarDCT (folders or zips) or an "
                               "ImageFolder tree, and print the per-class counts.",
        help="write manifest.parquet from raw MarDCT (folders or zips) or an "
                        "ImageFolder tree, and print the per-class counts")
    prepare.add_argument("--source", required=True,
                         help="raw MarDCT folder (sc5/ + test folder, or their zips), an "
                              "ImageFolder tree (train/, [valid/], test/) or a zip of one")
    prepare.add_argument("--protocol", default="lab16",
                         help=f"raw MarDCT protocol: {' or '.join(mardct.PROTOCOLS)} "
                              "(default lab16)")
    prepare.add_argument("--out", required=True, help="output folder for manifest.parquet")
    prepare.add_argument("--valid-fraction", type=float, default=0.15,
                         help="share of each training class held out for validation when "
                              "there is no valid/ folder (default 0.15)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    prepare.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                         help="images of more pixels are left out, counted like unreadable "
                              "ones (default: %(default)s)")
    generated = verbs.add_parser(
        "synthetic", description="Write a generated ImageFolder tree (boat-like shapes on "
                                 "water, learnable classes) for tests and smoke runs.",
        help="write a generated ImageFolder tree (boat-like shapes on water)")
    generated.add_argument("--out", required=True, help="output folder")
    defaults = SyntheticConfig()
    generated.add_argument("--classes", type=int, default=defaults.classes,
                           help=f"number of classes (default {defaults.classes})")
    generated.add_argument("--train-per-class", type=int, default=defaults.train_per_class,
                           help="training images of the largest class (default "
                                f"{defaults.train_per_class})")
    generated.add_argument("--test-per-class", type=int, default=defaults.test_per_class,
                           help="test images of the largest class (default "
                                f"{defaults.test_per_class})")
    generated.add_argument("--size", type=int, nargs=2, default=list(defaults.image_size),
                           metavar=("HEIGHT", "WIDTH"),
                           help="image size in pixels (default "
                                f"{' '.join(map(str, defaults.image_size))})")
    generated.add_argument("--imbalance", type=float, default=defaults.imbalance,
                           help="largest class / smallest class (default "
                                f"{defaults.imbalance:g})")
    generated.add_argument("--seed", type=int, default=0,
                           help="seed of the generated images (default 0)")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    """Run one verb; a user-facing error is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    if args.verb == "prepare":
        manifest.prepare(args.source, args.out, args.protocol, args.valid_fraction, args.seed,
                         args.max_pixels)
    else:
        settings = {"classes": args.classes, "train_per_class": args.train_per_class,
                    "test_per_class": args.test_per_class, "image_size": args.size,
                    "imbalance": args.imbalance}
        cfg = from_dict({"data": {"synthetic": settings}}).data.synthetic
        root = synthetic.generate(args.out, cfg, args.seed)
        print(f"wrote a synthetic ImageFolder tree to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
