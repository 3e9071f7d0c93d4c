"""Any timm CNN by name: `timm/<architecture>` or `timm/<architecture>.<pretrained tag>`.

The network is timm's `create_model` with a new head and global pooling; its stages come from
the network itself (timm_layout). Its named weights are `pretrained`: timm's pretrained weights
of that tag (the architecture's default tag without one), read from a file on this machine
(where `fetch` downloads it once, or where the user places it) and loaded by timm, which adapts
them (its filter functions, a new classifier).
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from boatray.backbones import timm_layout, weightfiles
from boatray.backbones.entry import STRIDE_CUTS, Entry, NamedWeights
from boatray.errors import BoatrayError

PREFIX = "timm/"
INSTALL = 'pip install -e ".[timm]"'
PRETRAINED = "pretrained"


def timm():
    """The timm package, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise BoatrayError(f"timm models need the timm package: {INSTALL}") from None
    return timm


def entry(name: str) -> Entry:
    """The registry entry of `timm/<architecture>[.<tag>]` (a one-line error for a name timm
    does not know)."""
    variant = name.removeprefix(PREFIX)
    architecture, _, tag = variant.partition(".")
    if architecture not in timm().list_models():
        raise BoatrayError(f"unknown timm model {variant!r} (not in timm.list_models()); e.g. "
                           "timm/convnext_tiny, timm/efficientnet_b0, timm/regnety_016")
    try:
        cfg = timm().models.get_pretrained_cfg(variant)
    except RuntimeError:
        tags = ", ".join(timm().list_pretrained(f"{architecture}.*")) or "none"
        raise BoatrayError(f"unknown pretrained tag {tag!r} of timm model {architecture}; "
                           f"its tags: {tags}") from None
    size = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    return Entry(make=functools.partial(_make, variant), cuts=STRIDE_CUTS,
                 layout=lambda model: timm_layout.layout(model, name, size),
                 weights=NamedWeights(functools.partial(_resolve, name, cfg),
                                      functools.partial(_fetch, name), _source),
                 input_size=size)


def _make(variant: str, num_classes: int, pooling: str, cfg: object) -> nn.Module:
    """timm's network, randomly initialised or (`cfg`: a resolved `pretrained`) with timm's
    pretrained weights of that tag, read from this machine's file."""
    overlay = None
    if cfg is not None:
        overlay = {"state_dict": weightfiles.read_state_dict(_ensure_file(cfg))}
    try:
        return timm().create_model(variant, pretrained=cfg is not None, num_classes=num_classes,
                                   global_pool=pooling, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - timm's constructors assert, raise TypeError...
        what = " and its pretrained weights" if cfg is not None else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(f"timm cannot build {variant} with global_pool={pooling!r}{what} "
                           f"({reason})") from None


def _resolve(name: str, cfg: object, weights: str) -> object:
    if weights != PRETRAINED:
        raise BoatrayError(f"unknown weights {weights!r} for {name}; valid: none, "
                           f"{PRETRAINED} (timm's), or a weights file (.safetensors, .pth)")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise BoatrayError(f"timm has no pretrained weights for {name}; valid: none, or a "
                           "weights file (.safetensors, .pth)")
    return cfg


def _remote(cfg: object) -> tuple[str, str]:
    """(where the weights download from, the page that names them)."""
    if cfg.hf_hub_id:
        page = f"https://huggingface.co/{cfg.hf_hub_id}"
        return f"{page}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}", page
    return cfg.url, cfg.url


def _placed(cfg: object) -> Path:
    """Where boatray keeps (and the user may place) the weights file of `cfg`."""
    url, _ = _remote(cfg)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if cfg.hf_hub_id:
        return checkpoints / "timm" / f"{cfg.hf_hub_id.split('/')[-1]}{Path(url).suffix}"
    return checkpoints / Path(urlparse(url).path).name


def _local(cfg: object) -> Path | None:
    """The weights file on this machine: where boatray keeps it, else Hugging Face's cache."""
    if _placed(cfg).is_file():
        return _placed(cfg)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")
        if isinstance(found, str):
            return Path(found)
    return None


def _fetch(name: str, cfg: object) -> None:
    """Download the weights file once (without internet, one line names the file to place,
    where, and the ways out)."""
    if _local(cfg) is not None:
        return
    url, page = _remote(cfg)
    target = _placed(cfg)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(
            f"cannot download the pretrained weights of {name} ({reason}): put "
            f"{Path(urlparse(url).path).name} from {page} at {target}, or --set "
            f"model.weights=/path/to/weights.safetensors, or --set model.weights=none "
            f"(random init)") from None


def _ensure_file(cfg: object) -> Path:
    found = _local(cfg)
    if found is None:
        _fetch(f"{PREFIX}{cfg.architecture}", cfg)
        found = _local(cfg)
    return found


def _source(cfg: object) -> dict[str, str]:
    _, page = _remote(cfg)
    source = {"description": f"timm pretrained weights {cfg.architecture}.{cfg.tag} ({page})"}
    found = _local(cfg)
    if found is not None:
        source |= {"file": found.name, "sha256": weightfiles.file_sha256(found)}
    return source
