"""Saliency maps on disk: one 8-bit grey PNG per image, ``<dir>/<id>.png``.

Layout written by the ``saliency`` stage (``data/saliency/``) and read by classifier training:
a map is a single-channel ``uint8`` PNG of the image's size, ``0`` = background, ``255`` =
salient, so ``value / 255`` is the saliency in [0, 1] (the EPS authors' PFAN maps use the same
convention). Nothing else lives in the folder. While the stage runs, maps go to a resume folder
holding the fingerprint of what decides them (:func:`prepare_partial`; shards: :mod:`core.shards`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.atomic import write_text_atomic

FINGERPRINT_FILE = ".fingerprint.json"   # in a resume folder: what decided its maps


class SaliencyMapError(ValueError):
    """A saliency map is missing, unreadable or of the wrong size; the message names the file."""


def saliency_path(saliency_dir: str | Path, image_id: str) -> Path:
    """``<dir>/<id>.png``."""
    return Path(saliency_dir) / f"{image_id}.png"


def read_map_u8(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A map file as HxW ``uint8``.

    Grey (``L``) PNGs are read as they are; palette, RGB(A) and grey+alpha maps are converted to
    grey, 16-bit grey maps are scaled to 8 bits, so maps made by other tools (PFAN, DSS, ...)
    read too.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode == "L":
                arr = np.asarray(im, dtype=np.uint8)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                raw = np.asarray(im).astype(np.int64)
                top = 65535 if im.mode.startswith("I;16") or raw.max(initial=0) > 255 else 255
                arr = np.round(np.clip(raw, 0, top) * (255.0 / top)).astype(np.uint8)
            elif im.mode == "F":
                raise SaliencyMapError(f"{path}: floating-point image; save maps as 8-bit grey PNGs (0..255)")
            else:
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise SaliencyMapError(f"{path}: saliency map not found; rerun the saliency stage "
                               "(`dvc repro saliency`) or add the map") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, SaliencyMapError):
            raise
        raise SaliencyMapError(f"{path}: saliency map is corrupt or not an image ({e}); "
                               "delete it and rerun the saliency stage") from None
    if expected_hw is not None and tuple(arr.shape) != tuple(expected_hw):
        raise SaliencyMapError(f"{path}: saliency map is {arr.shape[1]}x{arr.shape[0]} but its image is "
                               f"{expected_hw[1]}x{expected_hw[0]} (WxH); maps must have the image's size")
    return arr


def load_saliency(saliency_dir: str | Path, image_id: str,
                  expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The map of ``image_id`` as HxW ``float32`` in [0, 1] (clear error naming the file otherwise)."""
    return read_map_u8(saliency_path(saliency_dir, image_id), expected_hw).astype(np.float32) / 255.0


def write_map_atomic(path: str | Path, saliency_u8: np.ndarray) -> None:
    """Write an HxW ``uint8`` map as a grey PNG: temp file in the same folder, then rename."""
    path = Path(path)
    arr = np.asarray(saliency_u8)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"{path}: a saliency map must be HxW uint8, got {arr.dtype} {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # not *.png: never a map
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr, mode="L").save(f, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- quality against ground truth
#
# A map is scored against the ground-truth foreground: every pixel that is neither background (0)
# nor ignore (255). Ignore pixels are left out. Each image is reduced to two 256-bin histograms of
# its 8-bit map values (over foreground pixels, over all counted pixels), from which every score
# follows exactly; the scores are means over images (the salient-object-detection convention).

F_BETA2 = 0.3
IGNORE = 255


def map_histograms(saliency_u8: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(foreground_hist, counted_hist)``: 256-bin int64 counts of map values (ignore pixels left out)."""
    if saliency_u8.shape != mask.shape:
        raise ValueError(f"saliency map {saliency_u8.shape} and mask {mask.shape} differ in size")
    counted = mask != IGNORE
    fg = counted & (mask != 0)
    values = saliency_u8.reshape(-1)
    fg_hist = np.bincount(values[fg.reshape(-1)], minlength=256).astype(np.int64)
    counted_hist = np.bincount(values[counted.reshape(-1)], minlength=256).astype(np.int64)
    return fg_hist, counted_hist


def saliency_scores(histograms: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | int]:
    """MAE, max F-measure (beta^2 = 0.3) and foreground IoU at 0.5, averaged over images.

    * MAE: mean |s - g| with s = value / 255 and g in {0, 1};
    * max F: precision and recall of ``value >= t`` for t = 0..255, each averaged over images,
      F = (1 + b2) P R / (b2 P + R), maximum over t;
    * IoU: of ``value >= 128`` (s >= 0.5) with the foreground; 1 when both are empty.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    maes, ious, precisions, recalls = [], [], [], []
    for fg_hist, counted_hist in histograms:
        n = int(counted_hist.sum())
        if n == 0:
            continue
        bg_hist = counted_hist - fg_hist
        n_fg = int(fg_hist.sum())
        maes.append(float((fg_hist * (1.0 - levels)).sum() + (bg_hist * levels).sum()) / n)
        tp = np.cumsum(fg_hist[::-1])[::-1].astype(np.float64)          # value >= t, t = 0..255
        predicted = np.cumsum(counted_hist[::-1])[::-1].astype(np.float64)
        precisions.append(np.divide(tp, predicted, out=np.zeros(256), where=predicted > 0))
        recalls.append(tp / n_fg if n_fg else np.zeros(256))
        inter = tp[128]
        union = n_fg + predicted[128] - inter
        ious.append(float(inter / union) if union > 0 else 1.0)
    if not maes:
        return {"images": 0}
    p, r = np.mean(precisions, axis=0), np.mean(recalls, axis=0)
    denom = F_BETA2 * p + r
    f = np.divide((1 + F_BETA2) * p * r, denom, out=np.zeros(256), where=denom > 0)
    return {"images": len(maes), "mae": round(float(np.mean(maes)), 6),
            "max_f": round(float(f.max()), 6), "iou": round(float(np.mean(ious)), 6)}


# --------------------------------------------------------------------------- resume folders


def prepare_partial(partial: Path, print_fn: Callable[[str], None], fp: dict) -> int:
    """Make ``partial`` hold only maps made under ``fp``; return how many it already holds."""
    if partial.is_dir():
        if partial_fingerprint(partial) == fp:
            for leftover in partial.rglob(".*.tmp-*"):  # temp files of a killed run
                leftover.unlink(missing_ok=True)
            done = sum(1 for _ in partial.rglob("*.png"))
            print_fn(f"saliency: resuming {partial}: {done} maps kept from an interrupted run with the same config")
            return done
        print_fn(f"saliency: discarding {partial}: left by a run with another config or inputs")
        shutil.rmtree(partial)
    elif partial.exists():
        partial.unlink()
    partial.mkdir(parents=True)
    write_text_atomic(partial / FINGERPRINT_FILE, json.dumps(fp, indent=2, sort_keys=True) + "\n")
    return 0


def partial_fingerprint(folder: Path) -> dict | None:
    """The fingerprint a resume (or shard) folder was made under; None when missing or unreadable."""
    try:
        return json.loads((folder / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None
