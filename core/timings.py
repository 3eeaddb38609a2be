"""Run-dependent figures (seconds, images/s, peak memory, threads) of a stage, kept out of DVC's outputs.

A cached output or a DVC metrics file must depend only on its inputs, or two identical runs would
write different ``dvc.lock`` files and every downstream stage would rerun. Timings therefore go to
``data/timings/<stage>.json``: git-ignored, declared nowhere in ``dvc.yaml``, read by the bench scripts
and the Prefect summary; a restored (cached) stage leaves the previous run's file, or none.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import write_text_atomic
from core.paths import TIMINGS_DIR

TIMINGS_DIR = Path(TIMINGS_DIR)


def timings_path(stage: str, root: str | Path = TIMINGS_DIR) -> Path:
    return Path(root) / f"{stage}.json"


def write_timings(path: str | Path | None, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` (atomically); ``None`` writes nothing (tests, benches)."""
    if path is not None:
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def read_timings(path: str | Path) -> dict:
    """The record at ``path``, or ``{}`` when the stage has not run here."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
