"""The prepared-data cache: one folder per content hash, built in a temporary folder and renamed into place."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from multitune.atomic import atomic_dir
from multitune.recipes.errors import InputError


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    manifest: dict
    cache_hit: bool

    def split(self, name: str) -> Path:
        return self.folder / name

    @property
    def labels(self) -> dict | None:
        """The task's label sets the shards were built with (declared, the generator's, or collected from the
        training split); None for tasks without closed label sets."""
        return self.manifest.get("labels")


def build_cached(cache_dir: Path, key: str, build) -> PreparedData:
    """The folder for content hash `key`: reused when complete, else `build(tmp)` writes the splits and returns the
    manifest, and the folder is renamed into place (a crash never leaves a folder that looks complete)."""
    folder = cache_dir / key[:20]
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return PreparedData(folder, json.loads(manifest_path.read_text()), cache_hit=True)
    # Another process (a rank, a sweep trial) may finish the same key first: theirs is identical and is kept.
    with atomic_dir(folder, keep_existing=lambda done: (done / "manifest.json").is_file()) as tmp:
        manifest = {"hash": key, **build(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PreparedData(folder, json.loads(manifest_path.read_text()), cache_hit=False)


def file_sha256(path: str | None) -> str:
    """Hex sha256 of a data file's bytes (part of a cache key). Raises InputError when the file is missing."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data file not found: {file}")
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

