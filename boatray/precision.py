"""The arithmetic a device computes in: bf16 autocast where the device runs bf16 natively,
fp32 elsewhere.

`amp` (`train.amp`, `features.amp`; predict takes the run's):

- `auto` (the default): bf16 autocast on GPUs (as boatray always did there; set `false` on
  GPUs older than Ampere, which emulate bf16), and on a CPU with AMX or AVX512-BF16
  instructions, where oneDNN runs bf16 convolutions and matmuls natively: ResNet50 at 240x800,
  inference with channels_last, ran 2.1x fp32's images/s on an AVX512-BF16 EPYC without AMX
  (3.8x on a CPU with AMX, issue 25); fp32 on other CPUs, where bf16 would be emulated and
  slower than fp32;
- `true`: bf16 autocast on every device (emulated where the hardware has no bf16);
- `false`: fp32 everywhere.

Whoever computes asks `uses_bf16` for its own device, so each node decides for its own CPU;
where a computation is named in advance (the frozen-prefix cache's key), the driver's CPU
stands for the cluster's.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

AMP_CHOICES = (False, True, "auto")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions: `AMX`, `AVX512-BF16`, or None (none: fp32 is faster).

    torch's own checks where it has them (they also ask the OS whether AMX tiles may be used),
    else /proc/cpuinfo's flags."""
    cpu = torch.cpu
    if hasattr(cpu, "_is_amx_tile_supported") and hasattr(cpu, "_is_avx512_bf16_supported"):
        amx, avx512 = cpu._is_amx_tile_supported(), cpu._is_avx512_bf16_supported()
    else:
        flags = _cpu_flags()
        amx, avx512 = "amx_bf16" in flags, "avx512_bf16" in flags
    return "AMX" if amx else "AVX512-BF16" if avx512 else None


def uses_bf16(amp: bool | str, device: torch.device | str) -> bool:
    """Whether computing on `device` with this `amp` setting runs under bf16 autocast."""
    if amp != "auto":
        return bool(amp)
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_bf16() is not None)


def compute_dtype(amp: bool | str, device: torch.device | str) -> str:
    """`bfloat16` or `float32`: what `uses_bf16` decides, as a name (cache keys, records)."""
    return "bfloat16" if uses_bf16(amp, device) else "float32"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on `device` (a no-op context when not `enabled`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def describe(amp: bool | str, use_gpu: bool, channels_last: bool = True) -> str:
    """What `amp` means on the device kind a stage runs on, for the line printed at start (on
    CPUs this node's CPU decides; every node decides for its own)."""
    layout = " + channels_last" if channels_last else ""
    if use_gpu:
        return f"bf16 autocast{layout} on GPUs" if amp else "fp32 on GPUs"
    found = cpu_bf16()
    has = f"this node's CPU has {found}" if found else "this node's CPU has no AMX or AVX512-BF16"
    if uses_bf16(amp, "cpu"):
        return f"bf16 autocast{layout} on CPUs ({has})"
    slower = ": bf16 would be emulated, slower" if amp == "auto" else ""
    return f"fp32 on CPUs ({has}{slower})"
