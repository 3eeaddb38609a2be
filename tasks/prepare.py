"""Stage `prepare`: make (synthetic) or check (voc / coco) the dataset and record it for every later stage.

``dataset.kind: synthetic`` generates the embedded co-occurrence dataset (:mod:`dataio.synthetic`)
into ``data/prepared/synthetic/``; ``voc`` / ``coco`` open the dataset ``dataset.root`` names and
generate nothing. Either way the train and val splits are validated (a bad file stops the stage
with its name) and the stage writes, all at once (a killed run leaves no ``data/prepared``):

* ``data/prepared/dataset.json`` - the manifest later stages open with ``dataio.manifest.open_dataset``;
* ``data/prepared/preview.png`` - image | ground-truth mask | context map, ``prepare.preview_count`` rows;
* ``data/metrics/prepare.json`` - per split: images, per-class image and pixel counts and, where the
  dataset has context maps, the measured co-occurrence (objects standing on their own context).

Run from the repository root: ``python -m tasks.prepare [--params params.yaml]``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from PIL import Image

from core.atomic import atomic_path
from core.config import ConfigError, DatasetConfig, Params, PrepareConfig
from core.paths import PREPARE_METRICS, PREPARED_DIR
from core.sizing import auto_values
from core.stage_cli import stage_main
from dataio import synthetic
from dataio.dataset import SegDataset
from dataio.files import IGNORE_INDEX
from dataio.label_png import voc_palette
from dataio.manifest import from_config, write_manifest

SPLITS = ("train", "val")
PREVIEW_TILE = 256          # preview tile side in pixels (128-px images shown at 2x)
_BG_TILE = (48, 48, 52)


# --------------------------------------------------------------------------- checks


def check_synthetic_config(dataset: DatasetConfig, prepare: PrepareConfig) -> None:
    """``dataset.*`` keys that cannot apply to the generated dataset fail before any work."""
    names = synthetic.class_names(prepare.num_classes)
    if dataset.class_names and list(dataset.class_names) != names:
        raise ConfigError(f"params key 'dataset.class_names' = {list(dataset.class_names)} does not match the "
                          f"synthetic dataset's classes {names} (prepare.num_classes = {prepare.num_classes}); "
                          "leave it empty ([]) for dataset.kind synthetic")
    for key, want in (("train_split", "train"), ("val_split", "val"), ("mask_dir", "SegmentationClass")):
        value = getattr(dataset, key)
        if value != want:
            raise ConfigError(f"params key 'dataset.{key}' = {value!r} must be {want!r} for dataset.kind "
                              "synthetic (the generated dataset has exactly that layout)")


# --------------------------------------------------------------------------- statistics


def _image_stats(ds: SegDataset, image_id: str, with_mask: bool) -> dict:
    out: dict[str, Any] = {"labels": ds.labels(image_id)}
    if not with_mask:
        return out
    mask = ds.load_mask(image_id)
    if mask is None:
        return out
    out["pixels"] = np.bincount(mask.ravel(), minlength=256)
    ctx = ds.load_context(image_id) if ds.context_names else None
    if ctx is not None:
        out["objects"] = synthetic.measure_objects(mask, ctx, ds.context_class)
        out["context_pixels"] = np.bincount(ctx.ravel(), minlength=len(ds.context_names) + 1)
    return out


def split_statistics(ds: SegDataset, split: str, *, workers: int = 2, progress: bool = True) -> dict:
    """Class counts of one split and, with context maps, the measured co-occurrence."""
    ids = ds.ids(split)
    c = ds.num_classes
    with_mask = ds.has_masks(split)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: Iterable[dict] = pool.map(lambda i: _image_stats(ds, i, with_mask), ids)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(ids), desc=f"measuring {split}", unit="img", mininterval=0.5,
                           leave=False)
        stats = list(results)

    label_counts = np.zeros(c, np.int64)
    for s in stats:
        label_counts += s["labels"].astype(bool)
    out: dict[str, Any] = {"images": len(ids),
                           "mean_classes_per_image": round(float(label_counts.sum()) / max(len(ids), 1), 4)}
    pixels = None
    if any("pixels" in s for s in stats):
        pixels = np.sum([s["pixels"] for s in stats if "pixels" in s], axis=0)
    counts = {}
    for k, name in enumerate(ds.class_names):
        entry = {"images": int(label_counts[k])}
        if pixels is not None:
            entry["pixels"] = int(pixels[k + 1])
        counts[name] = entry
    out["class_counts"] = counts
    if pixels is not None:
        out["background_pixels"] = int(pixels[0])
        out["ignore_pixels"] = int(pixels[IGNORE_INDEX])
    measured = [s for s in stats if "objects" in s]
    if measured:
        out["co_occurrence"] = _co_occurrence(ds, measured, pixels)
    return out


def _co_occurrence(ds: SegDataset, stats: list[dict], pixels: np.ndarray | None) -> dict:
    """How strongly contexts go with their classes, measured from the masks and context maps."""
    objects = [o for s in stats for o in s["objects"]]
    on = sum(o.on_own_context for o in objects)
    with_pair = sum(any(o.on_own_context for o in s["objects"]) for s in stats)
    lone = 0
    ctx_with_cls = cls_total = ctx_without_cls = no_cls_total = 0
    ctx_pixels = 0
    for s in stats:
        present_ctx = {k for k in range(1, len(ds.context_names) + 1) if s["context_pixels"][k] > 0}
        ctx_pixels += int(s["context_pixels"][1:].sum())
        classes = set(np.flatnonzero(s["labels"]).tolist())
        if any(ds.context_class[k] not in classes for k in present_ctx):
            lone += 1
        for k, cls in ds.context_class.items():
            if cls in classes:
                cls_total += 1
                ctx_with_cls += k in present_ctx
            else:
                no_cls_total += 1
                ctx_without_cls += k in present_ctx
    n = len(stats)
    object_pixels = int(pixels[1:ds.num_classes + 1].sum()) if pixels is not None else 0
    return {
        "objects": len(objects),
        "objects_on_own_context": int(on),
        "rate": round(on / len(objects), 4) if objects else 0.0,
        "images_with_co_occurring_pair": round(with_pair / n, 4),
        "images_with_lone_context": round(lone / n, 4),
        "p_context_given_class": round(ctx_with_cls / cls_total, 4) if cls_total else 0.0,
        "p_context_given_no_class": round(ctx_without_cls / no_cls_total, 4) if no_cls_total else 0.0,
        "context_pixel_fraction": round(ctx_pixels / float(pixels.sum()), 4) if pixels is not None else 0.0,
        "context_to_object_pixels": round(ctx_pixels / object_pixels, 4) if object_pixels else 0.0,
        "min_coverage": synthetic.ON_CONTEXT_MIN_COVERAGE,
    }


def _generation_summary(records: list[dict], split: str) -> dict:
    rows = [r for r in records if r["split"] == split]
    n_obj = sum(len(r["objects"]) for r in rows)
    return {
        "mean_objects_per_image": round(n_obj / max(len(rows), 1), 4),
        "objects": n_obj,
        "objects_drawn_on_own_context": round(sum(sum(r["on_context"]) for r in rows) / max(n_obj, 1), 4),
        "images_with_lone_context": round(sum(bool(r["lone_context"]) for r in rows) / max(len(rows), 1), 4),
    }


# --------------------------------------------------------------------------- preview


def _fit(arr: np.ndarray, tile: int, nearest: bool) -> np.ndarray:
    """Scale an image or colour mask into a ``tile`` square (integer upscale, area downscale), centred."""
    h, w = arr.shape[:2]
    side = max(h, w)
    if side <= tile:
        f = max(1, tile // side)
        out = cv2.resize(arr, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
    else:
        f = tile / side
        size = (max(1, round(w * f)), max(1, round(h * f)))
        out = cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    canvas = np.full((tile, tile, 3), _BG_TILE, np.uint8)
    y, x = (tile - out.shape[0]) // 2, (tile - out.shape[1]) // 2
    canvas[y:y + out.shape[0], x:x + out.shape[1]] = out
    return canvas


def _legend(ds: SegDataset, width: int, cmap: np.ndarray) -> np.ndarray:
    entries = [(cmap[c + 1], f"{c + 1} {n}") for c, n in enumerate(ds.class_names)]
    entries += [(cmap[k], f"ctx {k} {n} ({ds.class_names[ds.context_class[k]]})")
                for k, n in enumerate(ds.context_names, start=1)]
    entries.append((cmap[IGNORE_INDEX], "255 ignore"))
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    cell_w = 14 + max(cv2.getTextSize(t, font, scale, 1)[0][0] for _, t in entries) + 16
    per_row = max(1, width // cell_w)
    rows = -(-len(entries) // per_row)
    strip = np.full((rows * 22 + 6, width, 3), 255, np.uint8)
    for i, (colour, text) in enumerate(entries):
        x, y = 6 + (i % per_row) * cell_w, 6 + (i // per_row) * 22
        cv2.rectangle(strip, (x, y), (x + 12, y + 12), tuple(int(v) for v in colour), -1)
        cv2.rectangle(strip, (x, y), (x + 12, y + 12), (0, 0, 0), 1)
        cv2.putText(strip, text, (x + 18, y + 11), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def write_preview(ds: SegDataset, ids: list[str], path: Path, tile: int = PREVIEW_TILE) -> None:
    """A grid of ``image | mask | context map`` tiles (VOC palette; context k shares class k-1's colour)."""
    cmap = voc_palette()
    with_ctx = bool(ds.context_names)
    blank = np.full((tile, tile, 3), _BG_TILE, np.uint8)
    rows = []
    for image_id in ids:
        image = ds.load_image(image_id)
        mask = ds.load_mask(image_id)
        cells = [_fit(image, tile, nearest=False), blank if mask is None else _fit(cmap[mask], tile, nearest=True)]
        if with_ctx:
            ctx = ds.load_context(image_id)
            cells.append(blank if ctx is None else _fit(cmap[ctx], tile, nearest=True))
        row = np.concatenate([np.pad(c_, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c_ in cells], axis=1)
        rows.append(row)
    per_line = 2 if len(rows) > 6 else 1
    lines = []
    for i in range(0, len(rows), per_line):
        group = rows[i:i + per_line]
        while len(group) < per_line:
            group.append(np.full_like(rows[0], 255))
        gap = np.full((rows[0].shape[0], 12, 3), 255, np.uint8)
        lines.append(np.concatenate([x for g in group for x in (g, gap)][:-1], axis=1))
    grid = np.concatenate(lines, axis=0)
    grid = np.concatenate([grid, _legend(ds, grid.shape[1], cmap)], axis=0)
    Image.fromarray(grid).save(path, format="PNG")


def _preview_ids(ds: SegDataset, count: int) -> list[str]:
    if count <= 0:
        return []
    for split in SPLITS:
        if ds.has_masks(split):
            return ds.ids(split)[:count]
    return ds.ids(SPLITS[0])[:count]


# --------------------------------------------------------------------------- the stage


def _record(ds: SegDataset, tmp: Path, params: Params, project_dir: Path, metrics_path: Path,
            records: list[dict] | None, workers: int, progress: bool) -> dict:
    """Manifest, preview and metrics of a validated dataset, written into ``tmp``."""
    sizes = {split: ds.size_statistics(split) for split in SPLITS}   # recorded in the manifest too
    write_manifest(ds, tmp / "dataset.json", project_dir=project_dir)
    metrics: dict[str, Any] = {"dataset": params.dataset.kind, "num_classes": ds.num_classes,
                               "class_names": ds.class_names, "splits": {},
                               "auto_sizes": {"median_long_side": ds.median_long_side("train"),
                                              **auto_values(ds.median_long_side("train"),
                                                           params.saliency.backend)}}
    if records is not None:
        metrics["co_occurrence_rate_param"] = params.prepare.co_occurrence_rate
    for split in SPLITS:
        entry = {**split_statistics(ds, split, workers=workers, progress=progress), "image_size": sizes[split]}
        if records is not None:
            entry["generated"] = _generation_summary(records, split)
        metrics["splits"][split] = entry
    ids = _preview_ids(ds, params.prepare.preview_count)
    if ids:
        write_preview(ds, ids, tmp / "preview.png")
    with atomic_path(metrics_path) as m:
        m.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete what a killed earlier run left half-written next to ``out_dir`` (``core.atomic`` temporaries)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def run(params: Params, out_dir: str | Path = PREPARED_DIR,
        metrics_path: str | Path = PREPARE_METRICS, *, project_dir: str | Path = ".",
        workers: int | None = None, progress: bool = True) -> dict:
    """The stage; returns the metrics written to ``metrics_path``.

    ``out_dir`` appears only when everything in it is written (``core.atomic``); an exception
    or a kill leaves the previous ``out_dir`` (or none) in place.
    """
    out_dir, metrics_path, project_dir = Path(out_dir), Path(metrics_path), Path(project_dir)
    workers = workers or params.prepare.workers
    _remove_stale_temporaries(out_dir)
    if params.dataset.kind == "synthetic":
        check_synthetic_config(params.dataset, params.prepare)
        with atomic_path(out_dir, is_dir=True) as tmp:
            records = synthetic.write_dataset(params.prepare, tmp / "synthetic", workers=workers, progress=progress)
            ds = from_config(params.dataset, base_dir=project_dir, synthetic_root=tmp / "synthetic")
            ds.validate(SPLITS, workers=workers, progress=progress)
            return _record(ds, tmp, params, project_dir, metrics_path, records, workers, progress)
    # voc / coco: check everything before writing anything
    ds = from_config(params.dataset, base_dir=project_dir)
    ds.validate(SPLITS, progress=progress)
    with atomic_path(out_dir, is_dir=True) as tmp:
        return _record(ds, tmp, params, project_dir, metrics_path, None, workers, progress)


def _summary(metrics: dict) -> str:
    parts = []
    for split, entry in metrics["splits"].items():
        text = f"{split} {entry['images']}"
        co = entry.get("co_occurrence")
        if co:
            text += f" (objects on own context {co['rate']:.3f})"
        parts.append(text)
    return f"{metrics['num_classes']} classes; " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    paths = {"--out": PREPARED_DIR, "--metrics": PREPARE_METRICS}

    def body(args, params) -> str:
        start = time.perf_counter()
        metrics = run(params, args.out, args.metrics)
        return f"{args.out} ready in {time.perf_counter() - start:.1f} s: {_summary(metrics)}"

    return stage_main("prepare", __doc__, argv, paths, body)


if __name__ == "__main__":
    sys.exit(main())
