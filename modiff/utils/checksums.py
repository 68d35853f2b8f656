"""SHA-256 checksums of a model folder's safetensors shards, kept in its ``manifest.json``.

`add_checksums(folder, names)` records ``{"checksums": {name: {"sha256", "bytes"}}}`` in the folder's
manifest; `load_checked(folder, name)` verifies a shard against it (when listed) before reading it, so a
truncated shard and a damaged one of the right size are both named, with what to do. Hashing a shard costs
little next to reading it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from modiff.utils.runs import write_json

__all__ = ["sha256_file", "add_checksums", "load_checked"]

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); copy the model folder again from its source") from None
    return manifest if isinstance(manifest, dict) else {}


def add_checksums(folder: Path, names: Sequence[str]) -> None:
    """Record the SHA-256 and size of the files ``names`` of ``folder`` in its manifest (kept otherwise)."""
    manifest = _manifest(folder)
    manifest["checksums"] = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                             for name in sorted(names)}
    write_json(manifest, folder / MANIFEST)


def load_checked(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``folder/name``, after checking it against the manifest's
    checksum (when it lists one); a missing, truncated or damaged file is named in the error."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"the shard {path} is missing; copy the model folder again from its source")
    expected = _manifest(folder).get("checksums", {}).get(name)
    if expected is not None:
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(f"the shard {path} is truncated or damaged: {size} bytes, the manifest says "
                             f"{expected['bytes']}; copy the model folder again from its source")
        if sha256_file(path) != expected["sha256"]:
            raise ValueError(f"the shard {path} is damaged: its SHA-256 differs from the one in {folder / MANIFEST}; "
                             f"copy the model folder again from its source")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"the shard {path} cannot be read ({err}): it is truncated or damaged; copy the model "
                         f"folder again from its source") from None
