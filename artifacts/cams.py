"""CAM files ``data/cams/<id>.npz`` (written by ``tasks.infer_cam``)::

    cams     (P, H, W) float16  normalised CAM of each present class, in [0, 1]
    classes  (P,)      int16    their 0-based class indices (ascending)
    bg       (H, W)    float16  background probability map (eps models only)
    size     (2,)      int32    image height, width
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PseudoMaskError(ValueError):
    """A CAM or pseudo-mask file is missing, corrupt, or not what the stage expects."""


@dataclass
class CamRecord:
    """The inference result of one image."""

    cams: np.ndarray                 # (P, H, W) float32/float16, normalised to max 1
    classes: np.ndarray              # (P,) 0-based class indices
    bg: np.ndarray | None            # (H, W) background probability, eps models only
    size: tuple[int, int]            # (H, W)


def cam_path(cams_dir: str | Path, image_id: str) -> Path:
    return Path(cams_dir) / f"{image_id}.npz"


def write_cam_file(path: str | Path, rec: CamRecord) -> None:
    """Write one CAM file atomically (temp name in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    arrays = {"cams": np.asarray(rec.cams, dtype=np.float16),
              "classes": np.asarray(rec.classes, dtype=np.int16),
              "size": np.asarray(rec.size, dtype=np.int32)}
    if rec.bg is not None:
        arrays["bg"] = np.asarray(rec.bg, dtype=np.float16)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def read_cam_file(path: str | Path) -> CamRecord:
    """Read one CAM file; a clear error names the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise PseudoMaskError(f"CAM file not found: {path} (run the infer_cam stage first)")
    try:
        with np.load(path) as z:
            cams = z["cams"].astype(np.float32)
            classes = z["classes"].astype(np.int64)
            bg = z["bg"].astype(np.float32) if "bg" in z.files else None
            size = tuple(int(v) for v in z["size"])
    except Exception as e:  # truncated zip, missing key, ...
        raise PseudoMaskError(f"CAM file {path} is corrupt ({e}); delete it and rerun infer_cam") from e
    if cams.ndim != 3 or cams.shape[1:] != size or len(classes) != cams.shape[0]:
        raise PseudoMaskError(f"CAM file {path}: cams {cams.shape}, classes {classes.shape} and "
                              f"size {size} do not agree")
    return CamRecord(cams, classes, bg, size)


def read_cams_meta(cams_dir: str | Path) -> dict:
    """``<cams_dir>/meta.json`` (written last by infer_cam), with a clear error when missing."""
    path = Path(cams_dir) / "meta.json"
    if not path.is_file():
        raise PseudoMaskError(f"{path} not found: run the infer_cam stage first (`dvc repro infer_cam`)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PseudoMaskError(f"{path} is corrupt ({e}); rerun infer_cam") from e
