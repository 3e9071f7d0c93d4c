"""What the benchmarks share: the machine, peak memory, the matmul peak, real-JPEG image sets,
the lab's plain-PyTorch data loading and training loop, and the printed result table.

Every benchmark prints, in one run on one machine, boatray's path next to a baseline written
the way the lab wrote it (a Dataset with the lab's torchvision transform, DataLoader batch 8,
fp32, an eager loop), with the ratio and the peak memory of each. Each path runs in a fresh
process of its own (`isolated`). Memory is measured three ways, because boatray's work is
spread over processes: that process's peak RSS (VmHWM), the peak of the summed PSS of that
process and all its descendants (Ray's raylet, workers and actors included; sampled every
second: one sample reads every process's smaps_rollup, which sampled more often would slow
the Ray paths it measures), and the GPU's peak allocated memory where there is a GPU.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from boatray.data.images import reference_transform
from boatray.data.manifest import prepare

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mardct-sample"
"""The real MarDCT sample (raw layout) the image benchmarks read their JPEGs from."""

LAB_BATCH = 8
"""The lab's DataLoader batch size."""

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- the machine

def parse_size(text: str) -> tuple[int, int]:
    """`240x800` -> (240, 800): an image size as height x width."""
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def pick_device(name: str) -> torch.device:
    """`auto` (cuda when torch sees a GPU, else cpu), `cpu` or `cuda`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no GPU")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_total_gb() -> float | None:
    """Total RAM in GiB from /proc/meminfo."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return None


def gpu_name() -> str:
    """The first GPU's name and memory, or `none`."""
    if not torch.cuda.is_available():
        return "none"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB) x {torch.cuda.device_count()}"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages (other jobs on a shared machine skew timings)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def print_header(title: str) -> None:
    """The benchmark's title, its exact command, the machine (with its CPU's native bf16) and
    the load when it starts."""
    import sklearn

    from boatray.precision import cpu_bf16

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # the GPU check's steps run where Ray is not installed
        ray_version = "absent"

    memory = memory_total_gb()
    ram = f", RAM {memory:.0f} GiB" if memory else ""
    print(f"== {title}")
    print(f"command : python {' '.join(sys.argv)}")
    print(f"host    : {socket.gethostname()}, {platform.platform()}")
    print(f"cpu     : {cpu_model()}, {os.cpu_count()} logical CPUs "
          f"({len(os.sched_getaffinity(0))} usable), torch threads {torch.get_num_threads()}{ram}"
          f", native bf16: {cpu_bf16() or 'none'}")
    print(f"gpu     : {gpu_name()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, ray {ray_version}, "
          f"scikit-learn {sklearn.__version__}")
    print(f"load    : {load_average()} at start", flush=True)


def print_footer() -> None:
    """The load when the benchmark ends."""
    print(f"load    : {load_average()} at end", flush=True)


# ---------------------------------------------------------------- peak memory

def _descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_kb(pid: int) -> int:
    """A process's proportional set size (its RSS where smaps_rollup is unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KB
    return 0


def _own_peak_kb() -> int:
    """This process's peak RSS since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory while a block runs: `process_mb` (this process's RSS high-water mark, reset
    on entry), `tree_mb` (the largest sampled sum of PSS over this process and all its
    descendants: Ray's processes included) and `gpu_mb` (torch's peak allocated, or None).

    With `include_self=False` (the work runs in child processes) the tree leaves this process
    out and there is no `process_mb` column.
    """

    def __init__(self, device: torch.device | None = None, interval: float = 1.0,
                 include_self: bool = True) -> None:
        self.device, self.interval, self.include_self = device, interval, include_self
        self.process_mb = self.tree_mb = 0.0
        self.gpu_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._tree_kb = 0

    def _tree_now(self) -> int:
        pids = _descendants(os.getpid())
        return sum(_pss_kb(pid) for pid in (pids if self.include_self else pids[1:]))

    def _sample(self) -> None:
        while True:
            self._tree_kb = max(self._tree_kb, self._tree_now())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._tree_kb = max(self._tree_kb, self._tree_now())
        self.process_mb = _own_peak_kb() / 1024
        self.tree_mb = self._tree_kb / 1024
        if self.device is not None and self.device.type == "cuda":
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def columns(self) -> dict[str, float | None]:
        """The result table's memory columns."""
        row = {"peak RSS MB": self.process_mb} if self.include_self else {}
        row["peak tree PSS MB"] = self.tree_mb
        if self.gpu_mb is not None:
            row["peak GPU MB"] = self.gpu_mb
        return row


def _measured_call(fn: Callable, args: tuple, device_type: str | None) -> tuple[Any, dict]:
    device = torch.device(device_type) if device_type else None
    with PeakMemory(device) as memory:
        result = fn(*args)
    return result, memory.columns()


def _default_to_fork() -> None:
    multiprocessing.set_start_method("fork", force=True)


def isolated(fn: Callable, *args: Any, device: torch.device | None = None) -> tuple[Any, dict]:
    """`fn(*args)` in a fresh (spawned) process: (its result, its peak-memory columns).

    Each measured path runs alone in its own process, so its peak memory is its own (not the
    allocator's leftovers of an earlier path) and it pays its own warm-up. `fn` must be a
    module-level function; its arguments and result cross the process boundary by pickle.

    Inside, the default start method is set back to `fork`, Linux's and a Ray worker's default:
    a spawned process would otherwise hand `spawn` down to its DataLoader workers, each then
    re-importing torch and boatray (about 10 s each here), a cost no real run pays.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_default_to_fork) as pool:
        return pool.submit(_measured_call, fn, args, device.type if device else None).result()


def start_ray(tries: int = 3, **kwargs: Any) -> float:
    """`ray.init(**kwargs)`, tried again when the raylet misses Ray's fixed 30 s to register
    (it does on a loaded 2-core machine); returns the seconds the successful start took."""
    import ray

    attempt = 1
    while True:
        started = time.perf_counter()
        try:
            ray.init(**kwargs)
            return time.perf_counter() - started
        except Exception as exc:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt >= tries:
                raise
        print(f"ray     : start timed out (try {attempt} of {tries}); trying again", flush=True)
        attempt += 1


def quiet_ray_data() -> None:
    """No Ray Data progress lines in the benchmark's output (the tables are the output)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# ---------------------------------------------------------------- compute

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on a GPU need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                seconds: float = 2.0) -> float:
    """The best GFLOP/s of a large square matmul, the practical peak of the device for `dtype`
    (float32 on a CPU; bf16 on a GPU, which is what the project's path uses there)."""
    if device.type == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            return 2 * size**3 / best / 1e9


def ratio(value: float, baseline: float) -> float:
    """value / baseline (inf for a zero baseline)."""
    return value / baseline if baseline else float("inf")


# ---------------------------------------------------------------- images

def sample_images(count: int, sample: Path = SAMPLE) -> list[tuple[Path, str]]:
    """`count` (path, class) pairs of real training JPEGs from the MarDCT sample, spread over
    its classes in a fixed order, repeated when `count` exceeds the sample."""
    folders = sorted(f for f in sample.glob("sc5/*") if f.is_dir())
    by_class = [sorted(folder.glob("*.jpg")) for folder in folders]
    spread = [f for row in itertools.zip_longest(*by_class) for f in row if f is not None]
    if not spread:
        sys.exit(f"error: no JPEGs under {sample}/sc5 (the real MarDCT sample; pass --sample)")
    return [(spread[i % len(spread)], spread[i % len(spread)].parent.name)
            for i in range(count)]


def image_tree(root: Path, counts: dict[str, int], sample: Path = SAMPLE) -> Path:
    """An ImageFolder tree `root/{train,valid,test}/<class>/` of symlinks to real JPEGs
    (`counts` images per split, test at least 1: `prepare` refuses data without a test image;
    valid and test reuse the first training images, so their classes are training classes)
    and its manifest, made by boatray's `prepare`; returns the manifest's path."""
    items = sample_images(counts.get("train", 0), sample)
    wanted = {**counts, "test": max(1, counts.get("test", 0))}
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        chosen = items if split == "train" else items[:wanted.get(split, 0)]
        for number, (path, label) in enumerate(chosen):
            link = root / split / label / f"{number:05d}_{path.name}"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(path)
    with contextlib.redirect_stdout(io.StringIO()):  # prepare prints a per-class table
        return prepare(root, root / "prepared", valid_fraction=0.0)


class LabImages(Dataset):
    """The lab's data set: PIL open + RGB + the lab's torchvision transform, with a label."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: tuple[int, int]):
        self.paths, self.labels = list(paths), [int(v) for v in labels]
        self.transform = reference_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def lab_loader(paths: Sequence[str], labels: Sequence[int], size: tuple[int, int],
               shuffle: bool, batch_size: int = LAB_BATCH) -> DataLoader:
    """The lab's DataLoader (batch 8, decoding in the main process)."""
    return DataLoader(LabImages(paths, labels, size), batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------- the lab's training

LAB_TRAINABLE = {"head": ("fc",), "last1": ("layer4", "fc"), "all": ()}
"""The freeze specs the benchmarks use: the top-level modules that train (empty: all)."""


def lab_resnet(arch: str, num_classes: int, freeze: str = "all") -> nn.Module:
    """The lab's model: a torchvision ResNet (random weights: timings do not depend on them)
    with adaptive average pooling and a new head, every parameter frozen except those of the
    modules the freeze spec trains (`LAB_TRAINABLE`), as the lab set `requires_grad`."""
    model = getattr(torchvision.models, arch)(weights=None)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    trainable = LAB_TRAINABLE[freeze]
    if trainable:
        for name, param in model.named_parameters():
            param.requires_grad = name.split(".")[0] in trainable
    return model


def lab_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The lab's optimizer: Adam over the parameters that require gradients."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def lab_train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> tuple[int, float]:
    """One epoch of the lab's loop (cross-entropy, fp32, eager, `model.train()`, the model
    already on `device`); returns (images, seconds)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    images = 0
    start = time.perf_counter()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        images += len(labels)
    synchronize(device)
    return images, time.perf_counter() - start


def lab_predict(model: nn.Module, loader: DataLoader,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The lab's evaluation pass (eval mode, no_grad): (logits, labels) on the CPU."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for inputs, target in loader:
            logits.append(model(inputs.to(device)).cpu())
            labels.append(target)
    return torch.cat(logits), torch.cat(labels)


# ---------------------------------------------------------------- output

def print_table(rows: list[dict]) -> None:
    """Rows of results as an aligned text table (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for cells in table:
        print("  ".join(v.ljust(w) for v, w in zip(cells, widths)))
    sys.stdout.flush()
