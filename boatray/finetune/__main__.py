"""`python -m boatray.finetune`: one training run from a config (or the BetterCNN baseline with
`--baseline`), then its predictions, run record and exported model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from boatray import approaches, console, preflight
from boatray import config as config_module
from boatray.cluster import start_ray
from boatray.data.manifest import ensure_manifest
from boatray.errors import cli
from boatray.results import read_run


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.finetune`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.finetune",
        description="Train one model on Ray Train from an experiment config, then write its "
                    "valid/test predictions and run record under results/<experiment>/runs/.")
    config_module.add_arguments(parser)
    parser.add_argument("--baseline", action="store_true",
                        help="train the BetterCNN baseline (the config's baseline section)")
    parser.add_argument("--name", help="run name (default: the sweep's, e.g. "
                                       "finetune-last1-lr1e-03-none-r0 or baseline-bettercnn-r0);"
                                       " an existing run of that name is resumed from its last "
                                       "checkpoint")
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m boatray.finetune`."""
    args = build_parser().parse_args(argv)
    exp = config_module.from_arguments(args)
    approach = approaches.get("baseline" if args.baseline else "finetune")
    start_ray()
    trained, _ = preflight.check(approach.training(exp))
    manifest = ensure_manifest(exp)
    run_dir = exp.layout.run(args.name or approach.run_name(trained))
    print(f"results: {run_dir}", flush=True)
    print(f"{approach.name}: training {trained.model.name}", flush=True)
    approach.train(trained, manifest, run_dir)
    _, record = read_run(run_dir)
    unit = f"{'cached activations' if record['trained_on'] != 'images' else 'images'}/s"
    for epoch in record["history"]:
        print(f"{approach.name}: {console.epoch_text(epoch, trained.train.epochs, unit)}, "
              f"{epoch.get('epoch_seconds', 0):.1f} s", flush=True)
    print(f"{approach.name}: wrote {run_dir}; model: "
          f"{trained.layout.models / run_dir.name}", flush=True)
    print(f"results: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
