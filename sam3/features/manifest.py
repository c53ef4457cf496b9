"""A feature cache's manifest (layout: sam3.features.store), with no heavy imports.

Reading and writing manifest.json, finding the files a cache consists of, and `write_disabled` (the "off" manifest
the cache_features stage writes while `cache.enabled` is false) need only the standard library, so the stage's off
path and a SLURM submission's check of the cache folders start in about a second instead of loading torch and
transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sam3.errors import ConfigError
from sam3.io import write_json

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".safetensors"  # the shards and the text file


def our_files(folder: Path) -> list[Path]:
    """The files a cache consists of (shards, text, manifest): what a rebuild removes, nothing else."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name == MANIFEST or p.suffix == SHARD_SUFFIX)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (a reader never sees half a manifest)."""
    write_json(Path(folder) / MANIFEST, manifest, indent=1, allow_nan=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, or None when the folder holds no complete cache; ConfigError when it is not ours."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a feature-cache manifest ({err}); delete the folder and rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(f"{path}: feature-cache format {found!r}, this code reads {FORMAT}; rebuild the cache")
    return manifest


def write_disabled(folder: str | Path) -> Path:
    """The cache when `cache.enabled` is false: a manifest saying so, no features (the old ones removed). Returns
    the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in our_files(folder):
        path.unlink()
    write_manifest(folder, {"format": FORMAT, "enabled": False})
    logger.info("%s: feature cache off (cache.enabled false); wrote only its manifest", folder)
    return folder
