"""`python -m boatray.fetch URI [DIR]`: download an experiment's results from a storage URI.

What a person reads or predicts with comes down (the report, run folders, exported models and
the weight store they refer to, the trials table, the configs, Ray's logs), not Ray's state or
the caches. The folder it makes is a results folder like a local run's: the report opens from
it, and `python -m boatray.predict --model DIR/models/<run>` predicts from it.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from boatray import storage
from boatray.errors import cli
from boatray.results import Layout


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m boatray.fetch`."""
    parser = argparse.ArgumentParser(
        prog="python -m boatray.fetch",
        description="Download an experiment's results (report, runs, models, trials) from a "
                    "storage URI into a local folder.")
    parser.add_argument("uri", metavar="URI",
                        help="the experiment's results, e.g. s3://bucket/prefix/lab6")
    parser.add_argument("folder", metavar="DIR", nargs="?",
                        help="where to put them (default: ./<experiment>)")
    return parser


def command(uri: str) -> str:
    """The command that downloads the results at `uri` into ./<experiment>."""
    return shlex.join(["python", "-m", "boatray.fetch", uri, storage.name(uri)])


def remote_lines(uri: str, report_html: Path) -> list[str]:
    """Closing lines of a run whose results are at a storage URI: where the report is (there
    and on this machine), how to fetch the results, and the endpoint another machine needs
    when it came from the environment."""
    report = storage.join(uri, report_html.parent.name, report_html.name)
    lines = [f"report: {report} (on this machine: {report_html.resolve().as_uri()})",
             f"fetch the results: {command(uri)}"]
    endpoint = storage.endpoint(uri)
    if endpoint and endpoint not in uri:
        lines.append(f"storage endpoint: {endpoint} (from AWS_ENDPOINT_URL: set it wherever "
                     "you fetch or predict)")
    return lines


@cli
def main(argv: list[str] | None = None) -> int:
    """Download the results and say where they are."""
    args = build_parser().parse_args(argv)
    folder = Path(args.folder or storage.name(args.uri)).resolve()
    count = storage.fetch(args.uri, folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{count} files ({size / 1e6:.1f} MB) from {args.uri} in {folder}")
    report = Layout(folder).report / "report.html"
    if report.is_file():
        print(f"report: {report.as_uri()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
