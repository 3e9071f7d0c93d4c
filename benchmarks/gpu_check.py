"""The GPU check: the figures that say whether boatray's GPU path works, in one run.

    bash benchmarks/gpu_check.sh [--sample DIR] [--budget 450]

On a machine with one NVIDIA GPU and the README's install. In order, each step in its own
process with its own time limit (together under 8 minutes):

1. `nvidia-smi`;
2. the smoke main job on the GPU: `python -m boatray.sweep` (the built-in smoke experiment)
   with `train.use_gpu` and `features.use_gpu`, on a fresh local Ray instance: exit code and
   wall time;
3. ResNet50 extraction at 240x800 (`extraction.py --device cuda`): the in-process core and
   Ray Data (`features.extract`), both bf16 autocast and channels_last, in img/s;
4. fine-tuning img/s for the freeze specs `all` and `last1` (`finetune_epoch.py --device
   cuda`);
5. the peak GPU memory nvidia-smi saw over the whole check (each table also has torch's own
   `peak GPU MB` per path), and a summary line per step.

Without the real MarDCT sample (`--sample`, default ../shared/data/mardct-sample) the image
steps read generated JPEGs at 240x800 laid out like it (`stand_in_sample`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SAMPLE = REPO.parent / "shared" / "data" / "mardct-sample"
SIZE = (240, 800)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE,
                        help="the MarDCT sample (raw layout); generated JPEGs when absent")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all steps together (450: under 8 minutes overall)")
    return parser


def steps(sample: Path, storage: Path) -> list[tuple[str, list[str], float]]:
    """(title, command, share of the budget) of every measured step."""
    python = sys.executable
    return [
        ("smoke main job on the GPU",
         [python, "-m", "boatray.sweep", "--set", f"storage_path={storage}",
          "--set", "train.use_gpu=true", "--set", "features.use_gpu=true"], 0.4),
        ("ResNet50 extraction 240x800, bf16 + channels_last (core and Ray Data)",
         [python, str(BENCHMARKS / "extraction.py"), "--device", "cuda", "--images", "512",
          "--batch-size", "64", "--sample", str(sample)], 0.25),
        ("fine-tuning img/s, freeze all and last1",
         [python, str(BENCHMARKS / "finetune_epoch.py"), "--device", "cuda", "--freeze", "all",
          "last1", "--images", "512", "--valid", "64", "--epochs", "2", "--sample",
          str(sample)], 0.35),
    ]


def stand_in_sample(root: Path) -> Path:
    """Generated JPEGs at 240x800 in the sample's raw layout (`sc5/<class>/*.jpg`)."""
    from boatray.config import SyntheticConfig
    from boatray.data import synthetic

    tree = synthetic.generate(root / "generated", SyntheticConfig(
        classes=4, train_per_class=32, test_per_class=1, image_size=SIZE), seed=0)
    (root / "sc5").symlink_to(tree / "train", target_is_directory=True)
    return root


class GpuMemoryPeak:
    """The largest `memory.used` nvidia-smi reports (MiB), sampled every second in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=10).stdout
                self.peak = max([self.peak, *(int(v) for v in out.split() if v.isdigit())])
            except (OSError, subprocess.SubprocessError):
                continue

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_step(title: str, command: list[str], limit: float) -> tuple[int | str, float]:
    """Run one step with its output shown as it comes: (exit code or 'timeout', seconds)."""
    print(f"\n=== {title} (limit {limit:.0f} s)\n$ {' '.join(command)}", flush=True)
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    try:
        code: int | str = subprocess.run(command, cwd=REPO, env=env, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    return code, time.perf_counter() - started


def main() -> int:
    args = build_parser().parse_args()
    print("=== nvidia-smi", flush=True)
    subprocess.run(["nvidia-smi"], check=False)
    with tempfile.TemporaryDirectory(prefix="boatray-gpu-check-") as work:
        work = Path(work)
        sample = args.sample
        if not (sample / "sc5").is_dir():
            print(f"(no MarDCT sample at {sample}: generated 240x800 JPEGs stand in)")
            sample = stand_in_sample(work / "sample")
        summary = []
        with GpuMemoryPeak() as memory:
            for title, command, share in steps(sample, work / "smoke"):
                code, seconds = run_step(title, command, args.budget * share)
                summary.append(f"{title}: exit code {code}, wall {seconds:.1f} s")
    print("\n=== summary", flush=True)
    for line in summary:
        print(line)
    print(f"peak GPU memory (nvidia-smi, whole check): {memory.peak} MiB")
    subprocess.run(["nvidia-smi"], check=False)
    return 0 if all(", exit code 0," in line for line in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
