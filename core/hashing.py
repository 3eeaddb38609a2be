"""The project's one sha256 helpers: a file's digest, and the fingerprint of a set of files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (e.g. the code a run's weights depend on)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()
