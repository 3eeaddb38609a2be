"""Shards of a per-image stage: run on other workers (``--shard K/N``), merged by the stage's own run.

A per-image stage (saliency, infer_cam) keeps its finished per-image files in a resume folder
(``<partial>``) with a fingerprint of what decides them. Shard ``K`` of ``N`` computes the images
``ids[K::N]`` into its own folder beside it, ``<partial>.shard-K-of-N`` (same layout, same
fingerprint file), and stops; it never publishes, and no two shards share a folder, so shards on
several machines (a shared file system) cannot race. The stage's normal run (``dvc repro``) then
adopts every file of a shard whose fingerprint matches its own (a rename: the same bytes a serial
run writes, since each file depends only on its image and the fingerprinted config), computes what
is still missing, and publishes as usual; shard folders of other configs are deleted.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; a clear error otherwise."""
    m = SHARD_RE.match(text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N (shard K of N), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_arg(text: str) -> tuple[int, int]:
    """:func:`parse_shard` as an argparse ``type`` (its message shown as it is)."""
    import argparse

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shard_items(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """The items shard ``(K, N)`` computes: every N-th, starting at K (balanced to one item)."""
    k, n = shard
    return list(items[k::n])


def shard_dir(partial: Path, shard: tuple[int, int]) -> Path:
    """The folder shard ``(K, N)`` writes into, beside the stage's resume folder ``partial``."""
    return partial.with_name(f"{partial.name}.shard-{shard[0]}-of-{shard[1]}")


def shard_dirs(partial: Path) -> list[Path]:
    """Every shard folder left beside ``partial`` (of any ``N``), sorted."""
    return sorted(p for p in partial.parent.glob(f"{partial.name}.shard-*-of-*") if p.is_dir())


def adopt_shards(partial: Path, matches: Callable[[Path], bool], pattern: str) -> int:
    """Move the files ``pattern`` of every shard folder whose fingerprint ``matches`` into ``partial``
    (a file ``partial`` already has is kept), then delete every shard folder; returns files moved."""
    moved = 0
    for folder in shard_dirs(partial):
        if matches(folder):
            for path in sorted(folder.glob(pattern)):
                if path.name.startswith("."):        # a killed shard's temp file
                    continue
                target = partial / path.name
                if not target.exists():
                    os.replace(path, target)
                    moved += 1
        shutil.rmtree(folder, ignore_errors=True)
    return moved
