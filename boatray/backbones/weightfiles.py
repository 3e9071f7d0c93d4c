"""Weights files: read safely (safetensors, or `torch.load(weights_only=True)`), checked against
the model they are loaded into, and fingerprinted (SHA-256)."""

from __future__ import annotations

import functools
import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from boatray import weightstore
from boatray.errors import BoatrayError

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""File names that mark `model.weights` as a file rather than a weights name."""


def looks_like_file(weights: str) -> bool:
    """Whether `weights` names a file (a path, or a weights file's suffix) rather than `none`
    or a weights name."""
    return "/" in weights or weights.startswith("~") or weights.endswith(SUFFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a `.safetensors` file or a PyTorch file (`torch.load` with
    `weights_only=True`: tensors only, no code), on the CPU.

    A PyTorch file may hold it under a `model`/`state_dict` key (a checkpoint); the `module.`
    prefix of DDP and `_orig_mod.` of torch.compile are removed. Anything else is a one-line
    BoatrayError naming the file.
    """
    path = Path(path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pytorch(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise BoatrayError(f"weights file {path} is not a PyTorch state dict "
                           "(expected a mapping of parameter names to tensors)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise BoatrayError(f"weights file {path} is not a safetensors file "
                           f"({_first_line(exc)})") from None


def _read_pytorch(path: Path) -> object:
    try:
        return weightstore.load(path)  # a boatray weights file's frozen tensors included
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise BoatrayError(f"weights file {path} is not a PyTorch state dict "
                           f"({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: str,
                path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """`state` without the head when the head's shape differs (an ImageNet file's 1,000-class
    head), once it fits `own` (a model's state dict, or its shapes on the meta device) exactly
    otherwise: a one-line BoatrayError naming the file where keys are missing or extra or a
    shape differs. The head may be absent."""
    head += "."
    state = {k: v for k, v in state.items()
             if not (k.startswith(head) and k in own and v.shape != own[k].shape)}
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith(head)
                     and not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        problem = (f"{len(missing)} of its keys are missing (e.g. {missing[0]})" if missing else
                   f"{len(unexpected)} keys are not in it (e.g. {unexpected[0]})" if unexpected
                   else f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, "
                        f"expected {list(own[wrong[0]].shape)}")
        raise BoatrayError(f"weights file {path} does not fit {name}: {problem}")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], head: str, path: str | Path,
               name: str = "the model") -> None:
    """Load `state` (read from `path`, named in errors) into `model` as `check_state` allows:
    strictly, the head `head` only where its shape fits."""
    model.load_state_dict(check_state(model.state_dict(), state, head, path, name), strict=False)


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 (hex), read once per process for each size and modification time."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
