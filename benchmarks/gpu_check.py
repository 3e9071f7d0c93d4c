"""The GPU check: does boatray's GPU path run, and how fast, in one call of at most 8 minutes.

    bash benchmarks/gpu_check.sh [--budget 400] [--sample DIR] [--device cpu --tiny]
    python benchmarks/gpu_check.py --make-sample     # the real sample that travels with it

It runs on the GPU machine as that machine is: Python with torch, torchvision, numpy, pandas,
pyarrow, scikit-learn and pillow; boatray from this checkout (`PYTHONPATH`); Ray and PyYAML
only if they import. Each step runs in a process group of its own with its own time limit
(the group is killed when over it), so a failing step costs its own rows and no more
(gpu_steps.py holds the measurements):

1. `environment`: versions, the device, whether Ray and PyYAML import, the image tree of
   real JPEGs the steps read, the matmul peak of the device (bf16 8192^3 on a GPU);
2. `extraction`: ResNet50 features at 240x800, boatray's extraction core (`TrunkRunner`)
   against the usual PyTorch loop, on pre-decoded pixels and with decoding included
   (boatray: nvJPEG on the GPU; plain: PIL in DataLoader processes);
3. `finetune_all`, `finetune_last1`: boatray's training loop (`LocalSession`, its
   decoded-image cache) against the usual loop, pre-decoded and with decoding included;
4. `batch_sweep`: boatray's extraction and training step at batch 32, 64, 128 and 256 with
   the GPU's peak memory, and what `train.batch_size: auto` picks;
5. `smoke` (the smoke main job on the device) and `ray_extract` (`pipeline.extract` on Ray
   Data): only where Ray (for `smoke`, PyYAML too) imports.

It prints one table: per row images/s, the ratio to the plain PyTorch row of the same pair,
the % of the matmul peak it reaches (FLOPs per image counted by FlopCounterMode) and torch's
peak GPU memory; the same as JSON in $OUT/gpu_check.json where OUT is set (and --json), with
every step's log in $OUT/gpu_check.log. Exit code 0 when every step that ran succeeded.
`--device cpu --tiny` runs the same steps on a CPU at toy sizes (the CI test does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TRAVELLING_SAMPLE = BENCHMARKS / "gpu_sample"
"""The real sample that travels to the GPU machine (ignored by git: `--make-sample`)."""
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "mardct-sample"
LIMITS = {"environment": 60, "extraction": 100, "finetune_all": 100, "finetune_last1": 80,
          "batch_sweep": 90, "smoke": 150, "ray_extract": 90}
"""Each step's own time limit in seconds on a GPU (all of them together are held to --budget
too); `--tiny` runs on a CPU, where imports and toy steps on a few shared cores take longer,
with TINY_LIMITS times these."""
TINY_LIMITS = 3
NEEDS = {"smoke": ("ray", "yaml"), "ray_extract": ("ray",)}
"""The optional modules a step needs; it is skipped where one does not import."""
SIZES = {
    "full": {"size": [240, 800], "model": "resnet50", "images": 1024, "valid": 64,
             "pool": 512, "extract_batch": 128, "train_batch": 64,
             "sweep_batches": [32, 64, 128, 256], "matmul_size": 8192},
    "tiny": {"size": [32, 96], "model": "resnet18", "images": 8, "valid": 2, "pool": 4,
             "extract_batch": 4, "train_batch": 4, "sweep_batches": [2, 4],
             "matmul_size": 1024},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: the GPU where torch sees one, else the CPU")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes (32x96, a few images): proves the steps run, no figures")
    parser.add_argument("--budget", type=float, default=400.0,
                        help="seconds for all steps together (400; gpu_check.sh stops all at 480)")
    parser.add_argument("--sample", type=Path, default=None,
                        help="the MarDCT sample, raw layout (default: benchmarks/gpu_sample, "
                             "else ../shared/data/mardct-sample, else generated JPEGs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--make-sample", action="store_true",
                        help="copy the sample's training JPEGs to benchmarks/gpu_sample "
                             "(about 29 MB; ignored by git; carried to the GPU machine)")
    return parser


def make_sample(source: Path = SHARED_SAMPLE, target: Path = TRAVELLING_SAMPLE) -> Path:
    """Copy the real sample's training JPEGs (sc5/<class>/*.jpg) and README to `target`."""
    jpegs = sorted(source.glob("sc5/*/*.jpg"))
    if not jpegs:
        sys.exit(f"error: no JPEGs under {source}/sc5 (the real MarDCT sample)")
    shutil.rmtree(target, ignore_errors=True)
    for jpeg in jpegs:
        copy = target / jpeg.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(jpeg, copy)
    shutil.copyfile(source / "README.md", target / "README.md")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"{len(jpegs)} JPEGs, {size / 2**20:.1f} MiB -> {target}")
    return target


def choose_sample(given: Path | None, work: Path) -> tuple[Path, str]:
    """(the sample folder, what it is): the given one, the travelling copy, the shared one,
    or generated JPEGs laid out like it."""
    for candidate in ([given] if given else [TRAVELLING_SAMPLE, SHARED_SAMPLE]):
        if any(candidate.glob("sc5/*/*.jpg")):
            return candidate, f"real MarDCT JPEGs from {candidate}"
    return stand_in_sample(work / "sample"), "GENERATED JPEGs (no real sample found)"


def stand_in_sample(root: Path) -> Path:
    """Generated 240x800 JPEGs in the sample's raw layout (`sc5/<class>/*.jpg`)."""
    from boatray.config import SyntheticConfig
    from boatray.data import synthetic

    tree = synthetic.generate(root / "generated", SyntheticConfig(
        classes=4, train_per_class=32, test_per_class=1, image_size=(240, 800)), seed=0)
    (root / "sc5").symlink_to(tree / "train", target_is_directory=True)
    return root


def importable(module: str) -> bool:
    """Whether `import module` works in a fresh interpreter (a broken install counts as no)."""
    try:
        return subprocess.run([sys.executable, "-c", f"import {module}"], timeout=120,
                              capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class GpuMemoryPeak:
    """The largest `memory.used` nvidia-smi reports (MiB) over the check, sampled every second
    (every process's memory, torch's allocator cache included); None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            self.peak = max([self.peak or 0, *(int(v) for v in out.split() if v.isdigit())])

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_step(name: str, settings_file: Path, result_file: Path, log_file: Path, limit: float,
             env: dict[str, str]) -> tuple[str, float]:
    """One step in its own process group: (status, seconds). The group is killed when the
    step outlives `limit`, and whatever it left running is killed when it ends."""
    started = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / "gpu_steps.py"), name, str(settings_file),
             str(result_file)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 and result_file.is_file() else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({limit:.0f} s)"
            _kill_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(process.pid, signal.SIGKILL)
        process.wait()
    return status, time.perf_counter() - started


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def table_rows(steps: list[dict], peak: float | None) -> list[dict]:
    """The printed table: every step's rows, with the ratio to the plain PyTorch row of the
    same pair and the % of the matmul peak; a step without rows shows its status."""
    rows = []
    for step in steps:
        found = step.get("rows") or []
        plain = {r["pair"]: r["images_per_second"] for r in found
                 if r.get("kind") == "plain" and r.get("images_per_second")}
        for r in found:
            rate = r.get("images_per_second")
            vs = rate / plain[r["pair"]] if rate and r.get("pair") in plain else None
            share = (100 * rate * r["flops_per_image"] / peak
                     if rate and peak and r.get("flops_per_image") else None)
            rows.append({"step": step["step"], "row": r["row"], "batch": r.get("batch"),
                         "img/s": rate, "vs plain": vs, "% of peak": share,
                         "GPU MB": r.get("peak_gpu_mb"), "note": r.get("note") or ""})
        if step["status"] != "ok" or not found:
            rows.append({"step": step["step"], "row": f"({step['status']})", "note":
                         step.get("error", "")})
    return rows


def last_error(log_file: Path) -> str:
    """The last non-empty line of a step's log (its error, where it failed)."""
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def main() -> int:
    args = build_parser().parse_args()
    if args.make_sample:
        make_sample()
        return 0
    began = time.perf_counter()
    device = pick_device(args.device)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # nothing touches a GPU in a CPU run
    optional = {module: importable(module) for module in ("ray", "yaml")}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    with tempfile.TemporaryDirectory(prefix="boatray-gpu-check-") as temporary:
        work = Path(temporary)
        sample, sample_what = choose_sample(args.sample, work)
        settings = {**SIZES["tiny" if args.tiny else "full"], "device": device,
                    "tiny": args.tiny, "sample": str(sample), "work": str(work)}
        settings["manifest"] = str(work / "images" / "prepared" / "manifest.parquet")
        settings_file = work / "settings.json"
        settings_file.write_text(json.dumps(settings))
        print(f"== boatray GPU check: device {device}, sample: {sample_what}; "
              f"Ray {'imports' if optional['ray'] else 'absent'}, PyYAML "
              f"{'imports' if optional['yaml'] else 'absent'}; budget {args.budget:.0f} s",
              flush=True)
        steps, logs = [], []
        with GpuMemoryPeak() as memory:
            for name, limit in LIMITS.items():
                missing = [m for m in NEEDS.get(name, ()) if not optional[m]]
                left = args.budget - (time.perf_counter() - began)
                step: dict = {"step": name}
                if missing:
                    step["status"] = f"skipped: {' and '.join(missing)} not importable here"
                elif left < 20:
                    step["status"] = "skipped: no time left in the budget"
                else:
                    result, log = work / f"{name}.json", work / f"{name}.log"
                    limit *= TINY_LIMITS if args.tiny else 1
                    step["status"], step["seconds"] = run_step(
                        name, settings_file, result, log, min(limit, left), env)
                    if result.is_file():
                        step.update(json.loads(result.read_text()))
                    if step["status"] != "ok":
                        step["error"] = last_error(log)
                    logs.append(f"===== {name}: {step['status']}\n"
                                + log.read_text(errors="replace"))
                print(f"-- {name}: {step['status']}"
                      + (f" in {step['seconds']:.0f} s" if "seconds" in step else "")
                      + (f": {step['error']}" if step.get("error") else ""), flush=True)
                steps.append(step)
    from common import print_table  # here: the steps above run even where it cannot import

    info = next((s.get("info") for s in steps if s["step"] == "environment"), None) or {}
    peak = info.get("peak_flops")
    rows = table_rows(steps, peak)
    print()
    for key in ("gpu", "cpu", "cpu_bf16", "compute", "python", "torch", "torchvision", "cuda",
                "ray", "yaml", "peak_what"):
        if key in info:
            print(f"{key:11}: {info[key]}")
    if memory.peak is not None:
        print(f"{'nvidia-smi':11}: peak memory.used over the check {memory.peak} MiB")
    print_table(rows)
    ran = [s for s in steps if not s["status"].startswith("skipped")]
    ok = all(s["status"] == "ok" for s in ran)
    print(f"== {len(ran)} steps ran, {sum(s['status'] == 'ok' for s in ran)} ok, "
          f"{len(steps) - len(ran)} skipped; {time.perf_counter() - began:.0f} s", flush=True)
    report = {"command": " ".join(sys.argv), "device": device, "sample": sample_what,
              "settings": {k: v for k, v in settings.items() if k not in ("work", "manifest")},
              "environment": info, "nvidia_smi_peak_mib": memory.peak,
              "steps": [{k: v for k, v in s.items() if k not in ("rows", "info")} for s in steps],
              "rows": rows, "complete": ok}
    for target in [t for t in (out and out / "gpu_check.json", args.json) if t]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"json    : {target}")
    if out is not None:
        (out / "gpu_check.log").write_text("\n".join(logs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
