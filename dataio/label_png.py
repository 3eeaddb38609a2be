"""The one label-PNG codec and palette: index masks (0 background, c+1 class c, 255 ignore) as palette or grey PNGs.

Values are read as indices, never colours, and checked against the class count.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataio.files import IGNORE_INDEX, DatasetError


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette ``(n, 3)`` uint8 (the devkit's colours; 255, ignore, is (224, 224, 192))."""
    return _voc_palette(n).copy()


@functools.lru_cache(maxsize=4)
def _voc_palette(n: int) -> np.ndarray:
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def save_mask_png(mask: np.ndarray, path: str | Path, *, palette: bool | np.ndarray = True) -> None:
    """Write an index mask (HxW uint8) as a palette PNG or a grey PNG (``palette=False``).

    ``palette=True`` uses the VOC colours; an ``(n, 3)`` array gives others (e.g. a file's own).
    """
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L")
    if palette is not False:
        colours = voc_palette() if palette is True else np.asarray(palette, dtype=np.uint8)
        im = im.convert("P")
        im.putpalette(colours.reshape(-1).tolist())
    im.save(path)


def _mask_array(im: Image.Image, path: Path) -> np.ndarray:
    """Index values of an opened mask image (palette indices for 'P', grey values for 'L')."""
    if im.mode in ("P", "L"):
        return np.array(im, dtype=np.uint8)
    if im.mode == "1":
        return np.array(im, dtype=np.uint8)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"{path}: mask values {int(arr.min())}..{int(arr.max())} do not fit 0..255; "
                               "masks hold 0 = background, c+1 = class c, 255 = ignore")
        return arr.astype(np.uint8)
    raise DatasetError(f"{path}: mask is a {im.mode} colour image; masks must be palette or greyscale PNGs "
                       "holding class indices (0 = background, c+1 = class c, 255 = ignore), not colours")


def read_mask_file(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Decode a label PNG into HxW uint8 class indices (never RGB colours).

    With ``num_classes`` the values are checked to lie in ``{0..C, 255}``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mask = _mask_array(im, path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found; add it or remove its id from the split list") from None
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: mask is corrupt or not an image ({e}); replace the file") from None
    if num_classes is not None:
        _check_mask_values(mask, num_classes, path)
    return mask


def _value_counts(mask: np.ndarray) -> np.ndarray:
    """Pixels per value 0..255 (much faster than np.unique on big masks)."""
    return np.bincount(mask.ravel(), minlength=256)


def _image_value_counts(im: Image.Image, path: Path) -> np.ndarray:
    """Pixels per index of an opened mask image; PIL's C histogram for palette/grey PNGs."""
    if im.mode in ("P", "L"):
        return np.asarray(im.histogram(), dtype=np.int64)
    return _value_counts(_mask_array(im, path))


def _check_value_counts(counts: np.ndarray, num_classes: int, path: Path) -> None:
    bad = np.flatnonzero(counts)
    bad = bad[(bad > num_classes) & (bad != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(
            f"{path}: mask value(s) {', '.join(map(str, bad.tolist()))} out of range for {num_classes} classes; "
            f"allowed 0 (background), 1..{num_classes} (class index + 1), 255 (ignore). "
            "Check dataset.class_names or re-export the mask")


def _check_mask_values(mask: np.ndarray, num_classes: int, path: Path) -> None:
    _check_value_counts(_value_counts(mask), num_classes, path)
