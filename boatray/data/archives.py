"""Zip archives read in place: each is extracted once into a cache folder and reused."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from boatray.errors import BoatrayError

STAMP = ".boatray-extracted.json"


def unpacked(archive: Path, cache_dir: Path) -> Path:
    """The folder holding `archive`'s contents (`cache_dir/<archive stem>`), extracting it once.

    A later call with the same archive (same size and modification time) reuses the folder; an
    interrupted extraction has no stamp and is redone from scratch.
    """
    target = Path(cache_dir) / archive.stem
    info = archive.stat()
    stamp = {"archive": str(archive.resolve()), "size": info.st_size, "mtime": info.st_mtime}
    stamp_path = target / STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return target
    shutil.rmtree(target, ignore_errors=True)
    print(f"extracting {archive} into {target} (once)")
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise BoatrayError(f"cannot read zip archive {archive}: {exc}") from None
    stamp_path.write_text(json.dumps(stamp))
    return target
