"""Markdown summary of a pipeline run: one row per stage, then the headline metrics.

Published by the flow as a Prefect artifact; plain text in, plain text out. A project with a
``headline.json`` (the EPS pipeline's ``tasks.headline``) gets its few values, each with the stage that
produced it and whether that stage ran in this run (a value from an earlier run says so); other
projects get every metrics file, flattened.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from core.paths import EVAL_DIR, EVAL_REFINED_DIR, EVAL_SEG_DIR
from flows.dvc_stages import StageResult

MAX_CELL = 120
# the report images the evaluation stages draw: (path, the stage, what it shows)
REPORT_IMAGES = ((f"{EVAL_DIR}/report.png", "evaluate", "pseudo-masks"),
                 (f"{EVAL_REFINED_DIR}/report.png", "evaluate_refined", "AffinityNet-refined masks"),
                 (f"{EVAL_SEG_DIR}/report.png", "evaluate_seg", "segmenter predictions"))
THUMBNAIL_SIDE = 640   # px; embedded in the artifact as JPEG (the UI shows no files of the project)
HEADLINE = "headline.json"
# headline section -> the stage that produces its values (dvc.yaml)
PRODUCERS = {"classifier": "train_cls", "pseudo_masks": "evaluate", "refined_masks": "evaluate_refined",
             "segmenter": "evaluate_seg"}


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts to ``(dotted.key, leaf)`` rows; lists stay whole (one cell)."""
    if isinstance(value, dict) and value:
        rows: list[tuple[str, object]] = []
        for k, v in value.items():
            rows.extend(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix or "(value)", value)]


def summary_markdown(title: str, results: list[StageResult], not_run: list[str],
                     failed: str | None, metrics: dict[str, object]) -> str:
    """The artifact body: stage table (ran / skipped / failed / not run, wall time) and metrics."""
    lines = [f"# {title}", "", "| stage | outcome | detail | wall time (s) |", "|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {_cell(r.stage)} | {r.status} | {_cell(r.reason)} | {r.seconds:.1f} |")
    if failed:
        lines.append(f"| {_cell(failed)} | **failed** | see the task's logs | |")
    for name in not_run:
        lines.append(f"| {_cell(name)} | not run | {'an upstream stage failed' if failed else ''} | |")
    ran = sum(r.ran for r in results)
    lines += ["", f"{ran} ran, {len(results) - ran} skipped as cached"
              + (f", 1 failed, {len(not_run)} not run" if failed else "") + "."]
    if isinstance(metrics.get(HEADLINE), dict):
        lines += _headline(metrics, {r.stage for r in results if r.ran})
    elif metrics:
        lines += ["", "## Metrics (`data/metrics/*.json`)", "", "| file | key | value |", "|---|---|---|"]
        for fname, content in metrics.items():
            for key, value in flatten(content):
                lines.append(f"| {_cell(fname)} | {_cell(key)} | {_cell(value)} |")
    return "\n".join(lines) + "\n"


def _headline(metrics: dict[str, object], ran: set[str]) -> list[str]:
    lines = ["", "## Headline (`data/metrics/headline.json`)", "",
             "| metric | value | produced by | in this run |", "|---|---|---|---|"]
    for key, value in flatten(metrics[HEADLINE]):
        stage = PRODUCERS.get(key.split(".")[0], "")
        now = "yes" if stage in ran else "no: from an earlier run"
        shown = f"{value:.4f}" if isinstance(value, float) else _cell(value)
        lines.append(f"| {_cell(key)} | {shown} | {stage or '-'} | {now if stage else '-'} |")
    others = sorted(name for name in metrics if name != HEADLINE)
    if others:
        lines += ["", "Details: " + ", ".join(f"`data/metrics/{name}`" for name in others) + "."]
    return lines


def report_images(root: Path, ran: set[str]) -> list[str]:
    """Markdown with the evaluation stages' report images, each a thumbnail embedded as a data URI (the
    Prefect UI renders it; it cannot open the project's files), with its stage and whether it ran now."""
    from PIL import Image, UnidentifiedImageError

    lines: list[str] = []
    for rel, stage, what in REPORT_IMAGES:
        path = Path(root) / rel
        try:
            with Image.open(path) as im:
                im.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "JPEG", quality=80)
        except (OSError, UnidentifiedImageError):
            continue   # not made yet (or not this project's): nothing to show
        now = "this run" if stage in ran else "an earlier run"
        lines += ["", f"### {what} (`{rel}`, stage {stage}, {now})", "",
                  f"![{what}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"]
    return (["", "## Report images"] + lines) if lines else []
