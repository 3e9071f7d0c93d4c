"""The features file: one parquet table of every image's trunk output, and its stats file.

Columns `path`, `label_idx`, `split` and `features` (a fixed-size list, float32 or float16, of
the flattened trunk output); the schema metadata holds the classes, the output shape, the cut
point and the backbone. The stats file beside it holds the extraction's timings and the images
that could not be decoded. The SVM reads it whole; nothing here needs Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from boatray.errors import BoatrayError

METADATA_KEY = b"boatray"


def write_features(batches, out_path: Path, meta: dict) -> tuple[int, list[dict]]:
    """Stream batches into one parquet file (atomically); return (rows written, failures)."""
    width = int(np.prod(meta["shape"]))
    value_type = pa.float16() if meta["dtype"] == "float16" else pa.float32()
    schema = pa.schema([("path", pa.string()), ("label_idx", pa.int64()), ("split", pa.string()),
                        ("features", pa.list_(value_type, width))],
                       metadata={METADATA_KEY: json.dumps(meta).encode()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    written, failed = 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                bad = batch["error"] != ""
                failed += [{"path": str(p), "error": str(e)}
                           for p, e in zip(batch["path"][bad], batch["error"][bad])]
                good = ~bad
                values = np.ascontiguousarray(batch["features"][good]).reshape(-1)
                writer.write_table(pa.table({
                    "path": pa.array(batch["path"][good].astype(str)),
                    "label_idx": pa.array(batch["label_idx"][good].astype(np.int64)),
                    "split": pa.array(batch["split"][good].astype(str)),
                    "features": pa.FixedSizeListArray.from_arrays(
                        pa.array(values, type=value_type), width)}, schema=schema))
                written += int(good.sum())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return written, failed


def stats_path(features_path: str | Path) -> Path:
    """The stats file (.json) beside a features file."""
    return Path(features_path).with_suffix(".json")


def feature_info(path: str | Path) -> dict:
    """A features file's metadata (classes, shape, stage, model) plus `extraction` stats."""
    path = Path(path)
    if not path.is_file():
        raise BoatrayError(f"features file not found: {path}")
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise BoatrayError(f"cannot read features file {path}: {exc}") from None
    if METADATA_KEY not in raw:
        raise BoatrayError(f"{path} is not a boatray features file (no metadata)")
    info = json.loads(raw[METADATA_KEY])
    stats = stats_path(path)
    info["extraction"] = json.loads(stats.read_text()) if stats.is_file() else {}
    return info


def read_columns(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """Some of a features file's row columns (path, label_idx, split), without the features."""
    return pq.read_table(path, columns=columns).to_pandas()


def read_features(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(X of shape (n, *shape), frame with path, label_idx, split) of a features file."""
    path = Path(path)
    info = feature_info(path)
    table = pq.read_table(path)
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(table.num_rows, *info["shape"])
    return x, table.drop_columns(["features"]).to_pandas()
