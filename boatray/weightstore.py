"""Weights stored once: within a results folder, a tensor that did not train is kept once, in
the folder's weight store (results/<experiment>/tensors/), content-addressed by its sha256.

A weights file (a checkpoint's model.pt, an exported model's weights.pt, the features'
trunk.pt) is a state dict of what trained, loaded with `torch.load(weights_only=True)`; where
some of its tensors are in the store, the sidecar `<file stem>.refs.json` names them:
`{"format", "store": where the store was when written, "tensors": {name: {"sha256", "dtype",
"shape"}}}`. A stored tensor is its raw bytes, `tensors/<sha256>`: no pickle, and its sha256 is
checked when it is read. The frozen trunk shared by the head trials, the features, the SVM and
probe models and the exported fine-tunes is therefore stored once per results folder.

The store is looked for first in the results folder that holds the file (the `tensors/` of
one of its parent folders), so a results folder that was copied, synced or fetched from the
storage is self-contained, then where it was when the file was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from boatray import storage
from boatray.errors import BoatrayError
from boatray.results import atomic_write, atomic_write_text

STORE_DIR = storage.WEIGHT_STORE
"""The weight store's folder in results/<experiment>/."""
FORMAT = "boatray-refs/1"
MIN_STORED_BYTES = 1 << 16
"""Smaller tensors (biases, BatchNorm statistics) stay in the weights file: a few KB each."""
SEARCH_DEPTH = 4
"""Parent folders searched for the store: runs/<run>/<trial>/checkpoint_x/ is the deepest."""
IO_THREADS = 8

_present: set[str] = set()
"""Stored tensors this process has written or seen (no second look on the storage)."""


def location(results: str | Path) -> str:
    """The weight store of a results folder (a local path or a storage URI)."""
    return storage.join(results, STORE_DIR)


def refs_path(file: str | Path) -> Path:
    """The sidecar that names a weights file's stored tensors: model.pt -> model.refs.json."""
    file = Path(file)
    return file.with_name(f"{file.stem}.refs.json")


def untrained(module: nn.Module) -> set[str]:
    """The state-dict names of what did not train: frozen parameters, and the buffers of
    modules whose own parameters are all frozen (BatchNorm statistics of frozen stages, which
    stay in eval mode)."""
    names = set()
    for prefix, child in module.named_modules():
        own = list(child.named_parameters(recurse=False))
        frozen = [n for n, p in own if not p.requires_grad]
        names |= {f"{prefix}.{n}".lstrip(".") for n in frozen}
        if own and len(frozen) == len(own):
            names |= {f"{prefix}.{n}".lstrip(".") for n, _ in child.named_buffers(recurse=False)}
    return names


def save(state: dict[str, torch.Tensor], file: str | Path, store: str | None,
         frozen: Iterable[str] = ()) -> Path:
    """Write `state` to `file`: the tensors named in `frozen` (of at least MIN_STORED_BYTES) go
    into `store` (a weight store's location; None keeps everything in the file), once each; the
    file holds the rest, and its refs sidecar names the stored ones."""
    file = Path(file)
    frozen = set(frozen) if store is not None else set()
    stored = {name: tensor.detach().cpu() for name, tensor in state.items()
              if name in frozen and tensor.numel() * tensor.element_size() >= MIN_STORED_BYTES}
    digests = _parallel(lambda tensor: _put(store, tensor), stored.values())
    refs = {name: {"sha256": digest, "dtype": str(tensor.dtype).removeprefix("torch."),
                   "shape": list(tensor.shape)}
            for (name, tensor), digest in zip(stored.items(), digests)}
    kept = {name: tensor for name, tensor in state.items() if name not in stored}
    atomic_write(file, lambda tmp: torch.save(kept, tmp))
    if refs:
        atomic_write_text(refs_path(file), json.dumps(
            {"format": FORMAT, "store": store, "tensors": refs}, indent=1) + "\n")
    else:
        refs_path(file).unlink(missing_ok=True)
    return file


def load(file: str | Path) -> dict[str, torch.Tensor]:
    """The whole state dict of a weights file, its stored tensors read back from the store."""
    file = Path(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    sidecar = refs_path(file)
    if not sidecar.is_file():
        return state
    record = json.loads(sidecar.read_text())
    refs = record["tensors"]
    store = _find_store(str(file.parent.resolve()), record.get("store"),
                        next(iter(refs.values()))["sha256"], file)
    blobs = _parallel(lambda ref: _get(store, ref["sha256"], file), refs.values())
    for (name, ref), blob in zip(refs.items(), blobs):
        state[name] = torch.frombuffer(blob, dtype=getattr(torch, ref["dtype"])).reshape(
            ref["shape"]).clone()
    return state


def downloaded(folder: Path, origin: str) -> None:
    """Point the refs of the weights files of `folder`, downloaded from `origin` (a storage
    URI), at the weight store found from there: its results folder's, else the recorded one."""
    for sidecar in folder.glob("*.refs.json"):
        record = json.loads(sidecar.read_text())
        first = next(iter(record["tensors"].values()))["sha256"]
        record["store"] = _find_store(origin, record.get("store"), first, sidecar)
        atomic_write_text(sidecar, json.dumps(record, indent=1) + "\n")


def copy(source: str | Path, target: str | Path) -> Path:
    """Copy a weights file and its refs sidecar (the stored tensors stay where they are)."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    if refs_path(source).is_file():
        atomic_write(refs_path(target), lambda tmp: shutil.copyfile(refs_path(source), tmp))
    else:
        refs_path(target).unlink(missing_ok=True)
    return Path(target)


def _put(store: str, tensor: torch.Tensor) -> str:
    """Store a tensor's bytes under their sha256 unless they are there already; return it."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    where = storage.join(store, digest)
    if where not in _present and not storage.is_file(where):
        storage.write_bytes(where, data)
    _present.add(where)
    return digest


def _get(store: str, digest: str, file: Path) -> bytearray:
    try:
        data = bytearray(storage.read_bytes(storage.join(store, digest)))
    except OSError:
        raise BoatrayError(f"stored tensor {digest} of {file} is missing from {store}: copy or "
                           "fetch the whole results folder") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise BoatrayError(f"stored tensor {digest} of {file} is damaged (its sha256 differs) "
                           f"in {store}")
    return data


def _find_store(origin: str, recorded: str | None, digest: str, file: Path) -> str:
    """The first weight store that holds `digest`: in a parent folder of `origin`, else the
    one recorded when the file was written."""
    candidates, folder = [], origin
    for _ in range(SEARCH_DEPTH):
        candidates.append(location(folder))
        folder = storage.parent(folder)
    candidates += [recorded] if recorded else []
    for store in candidates:
        try:
            if storage.is_file(storage.join(store, digest)):
                return store
        except (OSError, ValueError):
            continue
    raise BoatrayError(f"{file} refers to frozen tensors kept in its results folder's weight "
                       f"store ({STORE_DIR}/), which is not there (looked in "
                       f"{', '.join(dict.fromkeys(candidates))}): copy or fetch the whole "
                       "results folder")


def _parallel(work, items: Iterable) -> list:
    """`work` over `items` on a few threads (storage round trips and hashing overlap)."""
    items = list(items)
    if len(items) < 2:
        return [work(item) for item in items]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(work, items))
