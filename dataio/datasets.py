"""Dataset readers: one interface over VOC-layout folders and COCO 2014.

Every stage after ``prepare`` opens the dataset through the manifest
``data/prepared/dataset.json`` (:func:`open_dataset`), so stages never guess
where images, masks or labels live. ``prepare`` builds the reader from
``params.yaml`` (:func:`from_config`), checks it (:meth:`SegDataset.validate`)
and records it (:func:`write_manifest`)::

    ds = from_config(params.dataset, base_dir=".")   # or VOCDataset(...) / COCODataset(...)
    ds.validate(["train", "val"])                     # DatasetError before anything is written
    write_manifest(ds, "data/prepared/dataset.json")
    ...
    ds = open_dataset("data/prepared/dataset.json")   # in every later stage
    for image_id in ds.ids("train"):
        image, labels = ds.load_image(image_id), ds.labels(image_id)

Conventions (docs/design.md): ``C`` foreground classes; masks hold ``0``
background, ``c + 1`` class ``c``, ``255`` ignore; image-level labels are a
float32 multi-hot vector of length ``C`` (psa/EPS ``cls_labels.npy``). Split
names passed to :meth:`SegDataset.ids` are *logical* (``"train"``, ``"val"``)
and mapped to the dataset's own list names (``train_aug`` for VOC + SBD).
"""

from __future__ import annotations

import csv
import json
import functools
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.atomic import write_text_atomic

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
_MAX_SHOWN_PROBLEMS = 20


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (or id) and what to do.

    ``problems`` lists every problem found (the message shows the first few).
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (``(n, 3)`` uint8), for writing palette PNG masks."""
    return _voc_colormap(n).copy()


@functools.lru_cache(maxsize=4)
def _voc_colormap(n: int) -> np.ndarray:
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


def save_mask_png(mask: np.ndarray, path: str | Path, *, palette: bool = True) -> None:
    """Write an index mask (HxW uint8) as a palette PNG (VOC colours) or a grey PNG."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(voc_colormap().reshape(-1).tolist())
    im.save(path)


def normalise_class_name(name: str) -> str:
    """Compare class names loosely: ``"tv/monitor"``, ``"TV monitor"`` and ``"tvmonitor"`` match."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


# --------------------------------------------------------------------------- file readers


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


def _labels_from_counts(counts: np.ndarray, num_classes: int) -> np.ndarray:
    return (counts[1: num_classes + 1] > 0).astype(np.float32)


def _labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return _labels_from_counts(_value_counts(mask), num_classes)


def _decode_npy_key(key: Any) -> str:
    # psa/EPS keys are id strings; IRN stores VOC ids as ints (2007_000032 -> 2007000032).
    if isinstance(key, (bytes, np.bytes_)):
        return key.decode()
    if isinstance(key, (int, np.integer)):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}" if len(s) == 10 else s
    return str(key)


def read_label_file(path: str | Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Image-level labels ``{id: (C,) float32 multi-hot}`` from ``cls_labels.npy`` or a CSV.

    * ``.npy``: the psa/EPS pickled dict ``{id: vector}`` (vectors of length C, values 0/1).
    * ``.csv``: header ``image_id,labels``; ``labels`` space-separated class names or 0-based indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found; fix params key 'dataset.labels' "
                           "(empty = derive labels from the masks)")
    c = len(class_names)
    if path.suffix.lower() == ".npy":
        return _read_npy_labels(path, c)
    if path.suffix.lower() in (".csv", ".txt"):
        return _read_csv_labels(path, class_names)
    raise DatasetError(f"{path}: unknown label file type; use cls_labels.npy (psa/EPS dict) or a CSV "
                       "with header image_id,labels")


def _read_npy_labels(path: Path, c: int) -> dict[str, np.ndarray]:
    try:
        obj = np.load(path, allow_pickle=True)
        table = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DatasetError(f"{path}: cannot read label file ({e}); expected the psa/EPS cls_labels.npy "
                           "dict saved with np.save(path, {id: multi-hot vector})") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{path}: expected a pickled dict {{id: multi-hot vector}} (psa/EPS cls_labels.npy), "
                           f"got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in table.items():
        image_id = _decode_npy_key(key)
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if vec.shape[0] != c:
            raise DatasetError(f"{path}: labels of '{image_id}' have length {vec.shape[0]}, expected {c} "
                               f"(one entry per foreground class, background excluded); "
                               "check dataset.class_names or regenerate the file")
        if not np.all((vec == 0) | (vec == 1)):
            raise DatasetError(f"{path}: labels of '{image_id}' are not 0/1 multi-hot values: {vec.tolist()}")
        out[image_id] = vec
    return out


def _read_csv_labels(path: Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    c = len(class_names)
    by_name = {n: i for i, n in enumerate(class_names)}
    by_loose = {normalise_class_name(n): i for i, n in enumerate(class_names)}
    out: dict[str, np.ndarray] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image_id", "labels"]:
            raise DatasetError(f"{path}: first line must be the header 'image_id,labels', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2:
                raise DatasetError(f"{path}: line {lineno}: expected 'image_id,labels', got {row!r}")
            image_id, tokens = row[0].strip(), row[1].split()
            if image_id in out:
                raise DatasetError(f"{path}: line {lineno}: image id '{image_id}' is listed twice; keep one row")
            vec = np.zeros(c, dtype=np.float32)
            for tok in tokens:
                if re.fullmatch(r"\d+", tok):
                    idx = int(tok)
                    if idx >= c:
                        raise DatasetError(f"{path}: line {lineno}: class index {idx} out of range 0..{c - 1} "
                                           f"(0-based, background excluded)")
                else:
                    idx = by_name.get(tok, by_loose.get(normalise_class_name(tok)))
                    if idx is None:
                        raise DatasetError(f"{path}: line {lineno}: unknown class name '{tok}'; "
                                           f"known: {', '.join(class_names)}")
                vec[idx] = 1.0
            out[image_id] = vec
    return out


def parse_contexts(spec: Any, class_names: Sequence[str], source: str = "contexts") -> tuple[list[str], dict[int, int]]:
    """Context names and ``{context k (1-based): class c (0-based)}`` from a contexts spec.

    The spec (``contexts.json`` or the manifest's ``contexts``) is a list of entries, one per context
    in order k = 1, 2, ..., each ``{"name": str, "class": int | class name}`` (optional ``"id": k``),
    or a mapping ``{"contexts": [...]}``.
    """
    if isinstance(spec, dict) and "contexts" in spec:
        spec = spec["contexts"]
    if not isinstance(spec, list):
        raise DatasetError(f"{source}: expected a list of {{\"name\": ..., \"class\": ...}} entries")
    names: list[str] = []
    mapping: dict[int, int] = {}
    by_name = {n: i for i, n in enumerate(class_names)}
    for pos, entry in enumerate(spec, start=1):
        if not isinstance(entry, dict):
            raise DatasetError(f"{source}: context entry {pos} must be a mapping with 'name' and 'class'")
        k = int(entry.get("id", pos))
        name = entry.get("name", entry.get("context_name", f"context_{k}"))
        cls = entry.get("class", entry.get("class_index", entry.get("class_name")))
        if isinstance(cls, str):
            if cls not in by_name:
                raise DatasetError(f"{source}: context '{name}' names unknown class '{cls}'")
            cls = by_name[cls]
        if not isinstance(cls, (int, np.integer)) or not 0 <= int(cls) < len(class_names):
            raise DatasetError(f"{source}: context '{name}' has class {cls!r}, expected 0..{len(class_names) - 1}")
        if k != pos:
            raise DatasetError(f"{source}: context ids must be 1, 2, ... in order; entry {pos} has id {k}")
        names.append(str(name))
        mapping[k] = int(cls)
    return names, mapping


# --------------------------------------------------------------------------- the interface


class SegDataset:
    """What every stage reads: ids per split, images, masks, image-level labels, context maps.

    Subclasses provide :meth:`ids`, :meth:`image_path`, :meth:`mask_path` and the label table;
    everything else (decoding, checks, label derivation) is shared here.
    """

    kind: str = ""

    def __init__(self, root: str | Path, *, class_names: Sequence[str], splits: dict[str, str] | None = None,
                 labels_path: str | Path | None = None):
        self.root = Path(root)
        self.class_names: list[str] = list(class_names)
        self.num_classes: int = len(self.class_names)
        self.splits: dict[str, str] = {"train": "train", "val": "val", **(splits or {})}
        self.labels_path: Path | None = Path(labels_path) if labels_path else None
        self.context_names: list[str] = []
        self.context_class: dict[int, int] = {}
        self._label_table: dict[str, np.ndarray] | None = None
        self._labels_loaded = False
        self._derived_labels: dict[str, np.ndarray] = {}
        self._has_masks: dict[str, bool] = {}
        if self.num_classes == 0:
            raise DatasetError(f"{self.root}: no class names; set params key 'dataset.class_names'")
        if self.num_classes >= IGNORE_INDEX:
            raise DatasetError(f"{self.root}: {self.num_classes} classes do not fit 8-bit masks "
                               f"(at most {IGNORE_INDEX - 1}, as {IGNORE_INDEX} means ignore)")
        if len(set(self.class_names)) != self.num_classes:
            raise DatasetError(f"{self.root}: class names must be unique, got {self.class_names}")

    # ----- overridden by readers
    def ids(self, split: str) -> list[str]:
        """Image ids of a split. ``split`` is logical ("train"/"val"); other names are used as is."""
        raise NotImplementedError

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, image_id: str) -> Path | None:
        """Where the id's label PNG is (or would be); ``None`` when the dataset has no mask folder."""
        raise NotImplementedError

    def context_path(self, image_id: str) -> Path | None:
        return None

    def _load_label_table(self) -> dict[str, np.ndarray] | None:
        """``{id: vector}`` from the label source, or ``None`` to derive labels from masks."""
        if self.labels_path is None:
            return None
        return read_label_file(self.labels_path, self.class_names)

    def describe(self, manifest_dir: Path, project_dir: Path) -> dict:
        """The manifest entry for this dataset (see :func:`write_manifest`)."""
        raise NotImplementedError

    # ----- shared behaviour
    def physical_split(self, split: str) -> str:
        """The dataset's own list name for a logical split ("train" -> "train_aug" for VOC + SBD)."""
        return self.splits.get(split, split)

    def load_image(self, image_id: str) -> np.ndarray:
        """HxWx3 uint8 RGB (no EXIF rotation: masks align with the stored pixels)."""
        return read_image_file(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """``(H, W)`` from the file header, without decoding pixels."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except FileNotFoundError:
            raise DatasetError(f"{path}: image not found; add it or remove '{image_id}' from the split list") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{path}: image is corrupt or not an image ({e}); replace the file") from None

    def has_masks(self, split: str) -> bool:
        """Whether the split has ground-truth masks (VOC test and weak-only splits do not).

        True when at least one id of the split has a mask file; :meth:`validate` then requires all.
        """
        if split not in self._has_masks:
            found = False
            for image_id in self.ids(split):
                path = self.mask_path(image_id)
                if path is None:
                    break
                if path.is_file():
                    found = True
                    break
            self._has_masks[split] = found
        return self._has_masks[split]

    def load_mask(self, image_id: str) -> np.ndarray | None:
        """HxW uint8: 0 background, c+1 class c, 255 ignore; ``None`` when the id has no mask."""
        path = self.mask_path(image_id)
        if path is None or not path.is_file():
            return None
        return read_mask_file(path, self.num_classes)

    def load_context(self, image_id: str) -> np.ndarray | None:
        """HxW uint8 context map (0 none, k context k); ``None`` unless the dataset defines contexts."""
        if not self.context_names:
            return None
        path = self.context_path(image_id)
        if path is None or not path.is_file():
            return None
        ctx = read_mask_file(path)
        bad = np.unique(ctx[ctx > len(self.context_names)])
        if bad.size:
            raise DatasetError(f"{path}: context value(s) {bad.tolist()} out of range 0..{len(self.context_names)}")
        return ctx

    def label_table(self) -> dict[str, np.ndarray] | None:
        """The label source read once (``None``: labels are derived from masks)."""
        if not self._labels_loaded:
            self._label_table = self._load_label_table()
            self._labels_loaded = True
        return self._label_table

    def labels(self, image_id: str) -> np.ndarray:
        """(C,) float32 multi-hot image-level labels (background excluded)."""
        table = self.label_table()
        if table is not None:
            vec = table.get(image_id)
            if vec is None:
                raise DatasetError(f"{self._label_source_name()}: no image-level labels for '{image_id}'; "
                                   "add them or remove the id from the split list")
            return vec.copy()
        if image_id not in self._derived_labels:
            path = self.mask_path(image_id)
            if path is None or not path.is_file():
                raise DatasetError(f"{path or self.root}: no mask to derive the labels of '{image_id}' from; "
                                   "give a label file in params key 'dataset.labels' (cls_labels.npy or CSV)")
            self._derived_labels[image_id] = _labels_from_mask(read_mask_file(path, self.num_classes),
                                                               self.num_classes)
        return self._derived_labels[image_id].copy()

    def _label_source_name(self) -> str:
        return str(self.labels_path or self.root)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, C={self.num_classes}, "
                f"splits={self.splits})")

    # ----- validation
    def validate(self, splits: Iterable[str] = ("train", "val"), *, decode: bool = True,
                 workers: int | None = None, progress: bool = True) -> None:
        """Check the splits before any stage writes; raise :class:`DatasetError` listing the problems.

        Checks: list file present, no duplicated id, every image present and readable, masks present
        (for splits that have masks), mask values in ``{0..C, 255}``, mask and context sizes equal to
        the image size, labels present, of the right length and not empty.
        ``decode=True`` decodes every image (JPEGs at 1/8 scale, which still reads the whole
        compressed stream) and every mask; ``decode=False`` reads headers only (existence, size) and
        skips mask values and, for labels derived from masks, the empty-label check.
        Work is spread over ``workers`` threads.
        """
        splits = list(splits)
        problems: list[str] = self.layout_problems(splits)
        if problems:
            raise DatasetError(f"dataset at {self.root} failed its check:\n  - " + "\n  - ".join(problems), problems)
        items: list[tuple[str, bool]] = []
        seen: set[str] = set()
        for split in splits:
            try:
                ids = self.ids(split)
            except DatasetError as e:
                problems.extend(e.problems)
                continue
            dup = sorted(i for i, k in Counter(ids).items() if k > 1)
            if dup:
                problems.append(f"{self.split_source(split)}: id(s) listed more than once: "
                                f"{', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''}; keep each id once")
            if not ids:
                problems.append(f"{self.split_source(split)}: split '{split}' has no images")
            with_masks = self.has_masks(split)
            for image_id in ids:
                if image_id not in seen:
                    seen.add(image_id)
                    items.append((image_id, with_masks))
        try:
            self.label_table()
        except DatasetError as e:
            problems.extend(e.problems)
            labels_broken = True
        else:
            labels_broken = False

        def check(item: tuple[str, bool]) -> list[str]:
            return self._check_item(item[0], item[1], decode=decode, check_labels=not labels_broken)

        n_workers = workers or min(8, os.cpu_count() or 1)
        results: Iterable[list[str]]
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = pool.map(check, items, chunksize=16)
            if progress and len(items) >= 500:
                from tqdm import tqdm
                results = tqdm(results, total=len(items), desc=f"checking {self.root.name}", unit="img",
                               mininterval=1.0, leave=False)
            for found in results:
                problems.extend(found)
        if problems:
            shown = problems[:_MAX_SHOWN_PROBLEMS]
            more = len(problems) - len(shown)
            msg = (f"dataset at {self.root} failed its check ({len(problems)} problem"
                   f"{'s' if len(problems) != 1 else ''}):\n  - " + "\n  - ".join(shown))
            if more:
                msg += f"\n  ... and {more} more"
            raise DatasetError(msg, problems)

    def split_source(self, split: str) -> Path:
        """The file that defines a split's ids (for messages)."""
        return self.root

    def layout_problems(self, splits: Sequence[str]) -> list[str]:
        """Whole-dataset problems (a missing folder) reported once instead of per image."""
        return []

    def _check_item(self, image_id: str, with_mask: bool, *, decode: bool, check_labels: bool) -> list[str]:
        problems: list[str] = []
        path = self.image_path(image_id)
        size = None
        try:
            with Image.open(path) as im:
                size = im.size
                if decode:
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
        except FileNotFoundError:
            problems.append(f"{path}: image not found; add it or remove '{image_id}' from the split list")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            problems.append(f"{path}: image is corrupt or unreadable ({e}); replace the file")
            size = None
        mask_path = self.mask_path(image_id) if with_mask else None
        counts = None
        if mask_path is not None:
            try:
                with Image.open(mask_path) as im:
                    if size is not None and im.size != size:
                        problems.append(f"{mask_path}: mask is {im.width}x{im.height} (WxH) but image {path.name} "
                                        f"is {size[0]}x{size[1]}; masks must have the image's size")
                    if decode:
                        counts = _image_value_counts(im, mask_path)
                        _check_value_counts(counts, self.num_classes, mask_path)
            except FileNotFoundError:
                problems.append(f"{mask_path}: mask not found (other images of the split have masks); "
                                f"add it or remove '{image_id}' from the split list")
            except DatasetError as e:
                problems.append(str(e))
                counts = None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                counts = None
                problems.append(f"{mask_path}: mask is corrupt or unreadable ({e}); replace the file")
        if self.context_names:
            ctx_path = self.context_path(image_id)
            if ctx_path is not None:
                try:
                    with Image.open(ctx_path) as im:
                        if size is not None and im.size != size:
                            problems.append(f"{ctx_path}: context map is {im.width}x{im.height} but image "
                                            f"{path.name} is {size[0]}x{size[1]}")
                        if decode:
                            ctx = _mask_array(im, ctx_path)
                            if ctx.size and int(ctx.max()) > len(self.context_names):
                                problems.append(f"{ctx_path}: context value {int(ctx.max())} out of range "
                                                f"0..{len(self.context_names)}")
                except FileNotFoundError:
                    problems.append(f"{ctx_path}: context map not found; regenerate the dataset")
                except DatasetError as e:
                    problems.append(str(e))
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                    problems.append(f"{ctx_path}: context map is corrupt or unreadable ({e})")
        if check_labels:
            problems.extend(self._check_labels(image_id, mask_path, counts))
        return problems

    def _check_labels(self, image_id: str, mask_path: Path | None, counts: np.ndarray | None) -> list[str]:
        """Labels present and not empty (derived labels: from the mask value counts of the caller)."""
        table = self.label_table()
        if table is not None:
            try:
                vec = table.get(image_id)
            except DatasetError as e:
                return e.problems
            source = self._label_source_name()
            if vec is None:
                return [f"{source}: no image-level labels for '{image_id}'; add them or remove the id "
                        "from the split list"]
        elif mask_path is None:
            return [f"{self.image_path(image_id)}: no labels for '{image_id}': no label file is given and its "
                    "split has no masks to derive them from; set params key 'dataset.labels' "
                    "(cls_labels.npy or CSV)"]
        elif counts is None:
            return []   # mask missing/corrupt (reported already) or not decoded (decode=False)
        else:
            vec = _labels_from_counts(counts, self.num_classes)
            self._derived_labels[image_id] = vec
            source = str(mask_path)
        if not vec.any():
            return [f"{source}: image '{image_id}' has no labels (no foreground class); give it at least "
                    "one class or remove it from the split list"]
        return []


# --------------------------------------------------------------------------- VOC layout


class VOCDataset(SegDataset):
    """Any VOC-layout folder: the synthetic dataset, PASCAL VOC 2012 (+ SBD), or a user's own.

    ``root/JPEGImages/<id>.jpg`` (other image extensions are found too),
    ``root/<mask_dir>/<id>.png`` (palette *or* grey PNG; index values are read, never colours),
    ``root/ImageSets/Segmentation/<list>.txt`` (one id per line; a list may also be given as a
    path to a .txt file), optional ``root/ContextMaps/<id>.png`` + contexts (synthetic).

    Class names: ``class_names`` if given, else ``root/class_names.txt``, else the 20 VOC classes.
    Labels: ``labels`` (cls_labels.npy or CSV); ``None`` derives them from the masks (the classes
    present, ignoring 0 and 255), which needs masks for every image.
    """

    kind = "voc"

    def __init__(self, root: str | Path, *, splits: dict[str, str] | None = None,
                 mask_dir: str = "SegmentationClass", labels: str | Path | None = None,
                 class_names: Sequence[str] | None = None, image_dir: str = "JPEGImages",
                 context_dir: str = "ContextMaps", contexts: Any = None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset folder not found; set params key 'dataset.root' to the folder "
                               "that holds JPEGImages/ and ImageSets/")
        names_file = root / "class_names.txt"
        if class_names:
            names = list(class_names)
        elif names_file.is_file():
            names = read_class_names(names_file)
        else:
            names = list(VOC_CLASSES)
        super().__init__(root, class_names=names, splits=splits, labels_path=labels)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.context_dir = context_dir
        self._ids: dict[str, list[str]] = {}
        self._image_paths: dict[str, Path] = {}
        if contexts is None and (root / "contexts.json").is_file():
            contexts = root / "contexts.json"
        if contexts is not None:
            source = str(contexts) if isinstance(contexts, (str, Path)) else "manifest 'contexts'"
            if isinstance(contexts, (str, Path)):
                try:
                    contexts = json.loads(Path(contexts).read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise DatasetError(f"{source}: cannot read contexts ({e})") from None
            self.context_names, self.context_class = parse_contexts(contexts, self.class_names, source)

    def list_path(self, split: str) -> Path:
        phys = self.physical_split(split)
        if phys.endswith(".txt"):
            p = Path(phys)
            return p if p.is_absolute() else self.root / p
        return self.root / LIST_DIR / f"{phys}.txt"

    def split_source(self, split: str) -> Path:
        return self.list_path(split)

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            path = self.list_path(split)
            if not path.is_file():
                hint = (f"set params key 'dataset.{split}_split' to an existing list name" if split in self.splits
                        else f"use a split that has a list in {path.parent}")
                raise DatasetError(f"{path}: list of split '{split}' not found; create it (one image id per "
                                   f"line) or {hint}")
            self._ids[split] = read_id_list(path)
        return list(self._ids[split])

    def layout_problems(self, splits: Sequence[str]) -> list[str]:
        folder = self.root / self.image_dir
        if not folder.is_dir():
            return [f"{folder}: image folder not found; VOC layout keeps images in <root>/{self.image_dir}/"]
        return []

    def image_path(self, image_id: str) -> Path:
        path = self._image_paths.get(image_id)
        if path is None:
            folder = self.root / self.image_dir
            path = folder / f"{image_id}.jpg"
            if not path.is_file():
                for ext in IMAGE_EXTENSIONS[1:]:
                    alt = folder / f"{image_id}{ext}"
                    if alt.is_file():
                        path = alt
                        break
            self._image_paths[image_id] = path
        return path

    def mask_path(self, image_id: str) -> Path | None:
        folder = self.root / self.mask_dir
        return folder / f"{image_id}.png" if folder.is_dir() else None

    def context_path(self, image_id: str) -> Path | None:
        return self.root / self.context_dir / f"{image_id}.png" if self.context_names else None

    def describe(self, manifest_dir: Path, project_dir: Path) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "root": _portable_path(self.root, manifest_dir, project_dir),
            "image_dir": self.image_dir,
            "mask_dir": self.mask_dir,
            "labels": _portable_path(self.labels_path, manifest_dir, project_dir) if self.labels_path else None,
            "class_names": self.class_names,
            "splits": dict(self.splits),
            "context_dir": self.context_dir if self.context_names else None,
            "contexts": [{"id": k, "name": n, "class": self.context_class[k]}
                         for k, n in enumerate(self.context_names, start=1)] or None,
        }


# --------------------------------------------------------------------------- COCO 2014


class COCODataset(SegDataset):
    """COCO 2014 (or 2017) with labels from the instances json and masks from EPS-style label PNGs.

    * images: ``root/<folder>/<stem>.jpg`` where the split's folder is its physical name if that
      folder exists, else ``<name>2014`` (so logical "train" -> ``train2014``);
    * labels: ``root/annotations/instances_<folder>.json``; the 80 categories map to 0..79 in
      sorted category-id order, names from the json; every annotation counts (crowd ones too);
    * masks: ``root/<mask_dir>/<folder>/<stem>.png`` if that folder exists, else
      ``root/<mask_dir>/<stem>.png`` (value = class index + 1, 0 background, 255 ignore);
    * ids are file stems (``COCO_train2014_000000000009``).

    Images without any annotated category are left out of the splits, as EPS does (they carry no
    image-level label to learn from). Parsing the 450 MB train json takes a while; ``index_path``
    names a compact index (:meth:`write_index`, written by ``prepare``) read instead.
    A ``labels`` file (cls_labels.npy / CSV) overrides the json's labels.
    """

    kind = "coco"

    def __init__(self, root: str | Path, *, splits: dict[str, str] | None = None,
                 mask_dir: str = "SegmentationClass", labels: str | Path | None = None,
                 class_names: Sequence[str] | None = None, index_path: str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: COCO folder not found; set params key 'dataset.root' to the folder "
                               "holding train2014/, val2014/ and annotations/")
        self.mask_dir = mask_dir
        self.index_path = Path(index_path) if index_path else None
        self._splits_index: dict[str, dict[str, list[int]]] = {}   # folder -> {stem: [class idx]}
        self._categories: list[dict] | None = None
        self._folder_of: dict[str, str] = {}
        self._index_folders: set[str] = set()
        splits_full = {"train": "train", "val": "val", **(splits or {})}
        if self.index_path is not None:
            self._read_index(self.index_path)
        else:
            # the smaller val json first: class names are needed now, the train json maybe never
            folders = [self._folder(root, p) for p in (splits_full["val"], splits_full["train"])]
            existing = [f for f in folders if self._json_path(root, f).is_file()]
            self._load_json(root, existing[0] if existing else folders[0])
        json_names = [c["name"] for c in self._categories or []]
        if class_names:
            if len(class_names) != len(json_names):
                raise DatasetError(f"params key 'dataset.class_names' has {len(class_names)} names but the COCO "
                                   f"annotations have {len(json_names)} categories; leave it empty to use theirs")
            names = list(class_names)
        else:
            names = json_names
        super().__init__(root, class_names=names, splits=splits_full, labels_path=labels)

    # ----- locating files
    @staticmethod
    def _folder(root: Path, phys: str) -> str:
        if (root / phys).is_dir() or phys.endswith(("2014", "2017")):
            return phys
        return f"{phys}2014"

    @staticmethod
    def _json_path(root: Path, folder: str) -> Path:
        return root / "annotations" / f"instances_{folder}.json"

    def split_folder(self, split: str) -> str:
        return self._folder(self.root, self.physical_split(split))

    def layout_problems(self, splits: Sequence[str]) -> list[str]:
        missing = [self.root / self.split_folder(s) for s in splits]
        return [f"{p}: COCO image folder not found; unpack {p.name}.zip into {self.root}"
                for p in missing if not p.is_dir()]

    def split_source(self, split: str) -> Path:
        folder = self.split_folder(split)
        return self.index_path if folder in self._index_folders else self._json_path(self.root, folder)

    def _load_json(self, root: Path, folder: str) -> None:
        path = self._json_path(root, folder)
        if not path.is_file():
            raise DatasetError(f"{path}: COCO annotation file not found; download annotations_trainval2014 "
                               "and unpack it into the dataset root")
        try:
            data = json.loads(path.read_text())
            cats = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]),
                          key=lambda c: c["id"])
            cat_index = {c["id"]: i for i, c in enumerate(cats)}
            stems = {int(im["id"]): Path(im["file_name"]).stem for im in data["images"]}
            table: dict[str, set[int]] = {}
            for ann in data["annotations"]:
                cid = int(ann["category_id"])
                if cid not in cat_index:
                    raise DatasetError(f"{path}: annotation {ann.get('id')} has unknown category_id {cid}")
                stem = stems.get(int(ann["image_id"]))
                if stem is None:
                    raise DatasetError(f"{path}: annotation {ann.get('id')} refers to unknown image_id "
                                       f"{ann['image_id']}")
                table.setdefault(stem, set()).add(cat_index[cid])
        except DatasetError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
        self._set_categories(cats, str(path))
        self._splits_index[folder] = {s: sorted(v) for s, v in sorted(table.items())}
        for stem in self._splits_index[folder]:
            self._folder_of[stem] = folder

    def _set_categories(self, cats: list[dict], source: str) -> None:
        if self._categories is None:
            self._categories = cats
        elif [c["id"] for c in cats] != [c["id"] for c in self._categories]:
            raise DatasetError(f"{source}: categories differ from the other split's annotation file")

    def _read_index(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            self._set_categories(data["categories"], str(path))
            for folder, entry in data["splits"].items():
                self._splits_index[folder] = {s: list(v) for s, v in entry["images"].items()}
                self._index_folders.add(folder)
                for stem in self._splits_index[folder]:
                    self._folder_of[stem] = folder
        except FileNotFoundError:
            raise DatasetError(f"{path}: COCO index not found; rerun the prepare stage") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{path}: unreadable COCO index ({e}); rerun the prepare stage") from None

    def _split_table(self, folder: str) -> dict[str, list[int]]:
        if folder not in self._splits_index:
            self._load_json(self.root, folder)
        return self._splits_index[folder]

    # ----- interface
    def ids(self, split: str) -> list[str]:
        return list(self._split_table(self.split_folder(split)))

    def _folder_for_id(self, image_id: str) -> str:
        folder = self._folder_of.get(image_id)
        if folder is None:
            m = re.match(r"COCO_([A-Za-z]+\d{4})_", image_id)
            if m:
                folder = m.group(1)
            else:
                candidates = [self.split_folder(s) for s in self.splits]
                folder = next((f for f in candidates if (self.root / f / f"{image_id}.jpg").is_file()),
                              candidates[0])
        return folder

    def image_path(self, image_id: str) -> Path:
        return self.root / self._folder_for_id(image_id) / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path | None:
        base = self.root / self.mask_dir
        if not base.is_dir():
            return None
        folder = base / self._folder_for_id(image_id)
        return (folder if folder.is_dir() else base) / f"{image_id}.png"

    def _load_label_table(self) -> dict[str, np.ndarray] | None:
        if self.labels_path is not None:
            return read_label_file(self.labels_path, self.class_names)
        return _CocoLabels(self)

    def _label_source_name(self) -> str:
        return str(self.labels_path or self.index_path or self.root / "annotations")

    def index_dict(self, splits: Iterable[str] = ("train", "val")) -> dict:
        """The compact index (categories + per-split ``{stem: [class idx]}``) of the given splits."""
        out_splits = {}
        for split in splits:
            folder = self.split_folder(split)
            out_splits[folder] = {"images": self._split_table(folder)}
        return {"format": "coco-index/1", "categories": self._categories, "splits": out_splits}

    def write_index(self, path: str | Path, splits: Iterable[str] = ("train", "val")) -> Path:
        """Write :meth:`index_dict` (atomically) so later stages skip parsing the instances json."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.index_dict(splits), sort_keys=True, separators=(",", ":")))
        self.index_path = path
        return path

    def describe(self, manifest_dir: Path, project_dir: Path) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "root": _portable_path(self.root, manifest_dir, project_dir),
            "mask_dir": self.mask_dir,
            "labels": _portable_path(self.labels_path, manifest_dir, project_dir) if self.labels_path else None,
            "class_names": self.class_names,
            "splits": dict(self.splits),
            "index": _portable_path(self.index_path, manifest_dir, project_dir) if self.index_path else None,
        }


class _CocoLabels:
    """Lazy label table: looks an id up in the (per split, loaded on demand) COCO annotations."""

    def __init__(self, ds: COCODataset):
        self._ds = ds

    def get(self, image_id: str, default: Any = None) -> np.ndarray | None:
        folder = self._ds._folder_for_id(image_id)
        classes = self._ds._split_table(folder).get(image_id)   # DatasetError names a missing json
        if classes is None:
            return default
        vec = np.zeros(self._ds.num_classes, dtype=np.float32)
        vec[list(classes)] = 1.0
        return vec


# --------------------------------------------------------------------------- construction + manifest


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


def from_config(cfg: Any, base_dir: str | Path = ".", *,
                synthetic_root: str | Path = "data/prepared/synthetic") -> SegDataset:
    """The reader params.yaml's ``dataset`` section describes (a :class:`core.config.DatasetConfig`).

    ``kind: voc`` / ``coco``: ``cfg.root`` relative to ``base_dir`` (the project root). A relative
    ``cfg.labels`` is looked up in the dataset root first, then in ``base_dir``.
    ``kind: synthetic``: the VOC-layout folder ``synthetic_root`` that ``prepare`` generated, with its
    ``cls_labels.npy`` unless ``cfg.labels`` says otherwise.
    """
    base = Path(base_dir)
    splits = {"train": cfg.train_split, "val": cfg.val_split}
    if cfg.kind == "synthetic":
        root = _resolve(synthetic_root, base)
    elif cfg.kind in ("voc", "coco"):
        if not cfg.root:
            raise DatasetError(f"params key 'dataset.root' is required when 'dataset.kind' is {cfg.kind}")
        root = _resolve(cfg.root, base)
    else:
        raise DatasetError(f"params key 'dataset.kind' = {cfg.kind!r} is not one of synthetic, voc, coco")
    labels: Path | None = None
    if cfg.labels:
        in_root = _resolve(cfg.labels, root)
        labels = in_root if in_root.exists() else _resolve(cfg.labels, base)
    elif cfg.kind == "synthetic" and (root / "cls_labels.npy").is_file():
        labels = root / "cls_labels.npy"
    names = list(cfg.class_names) or None
    if cfg.kind == "coco":
        return COCODataset(root, splits=splits, mask_dir=cfg.mask_dir, labels=labels, class_names=names)
    return VOCDataset(root, splits=splits, mask_dir=cfg.mask_dir, labels=labels, class_names=names)


def write_manifest(dataset: SegDataset, manifest_path: str | Path = "data/prepared/dataset.json", *,
                   project_dir: str | Path = ".") -> Path:
    """Record ``dataset`` in the manifest every later stage opens; returns its path.

    Paths inside the manifest's folder or inside ``project_dir`` are stored relative to the
    manifest's folder; others absolute. For COCO a compact label index ``coco_index.json`` is
    written next to the manifest. Written atomically; the content is deterministic.
    """
    manifest_path = Path(manifest_path)
    manifest_dir = manifest_path.parent
    manifest_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(dataset, COCODataset):
        dataset.write_index(manifest_dir / "coco_index.json", splits=("train", "val"))
    entry = dataset.describe(manifest_dir, Path(project_dir))
    write_text_atomic(manifest_path, json.dumps(entry, indent=2, sort_keys=True) + "\n")
    return manifest_path


def open_dataset(manifest_path: str | Path = "data/prepared/dataset.json") -> SegDataset:
    """The dataset ``prepare`` recorded; relative paths are resolved against the manifest's folder."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise DatasetError(f"{manifest_path}: dataset manifest not found; run the prepare stage first "
                           "(`dvc repro prepare` or `python -m tasks.prepare`)")
    try:
        m = json.loads(manifest_path.read_text())
        kind = m["kind"]
        base = manifest_path.parent
        root = _resolve(m["root"], base)
        labels = _resolve(m["labels"], base) if m.get("labels") else None
        splits = dict(m.get("splits") or {})
        names = m.get("class_names") or None
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{manifest_path}: unreadable dataset manifest ({type(e).__name__}: {e}); "
                           "rerun the prepare stage") from None
    if kind == "voc":
        return VOCDataset(root, splits=splits, mask_dir=m.get("mask_dir") or "SegmentationClass", labels=labels,
                          class_names=names, image_dir=m.get("image_dir") or "JPEGImages",
                          context_dir=m.get("context_dir") or "ContextMaps",
                          contexts=m.get("contexts") or [])
    if kind == "coco":
        index = _resolve(m["index"], base) if m.get("index") else None
        return COCODataset(root, splits=splits, mask_dir=m.get("mask_dir") or "SegmentationClass",
                           labels=labels, class_names=names, index_path=index)
    raise DatasetError(f"{manifest_path}: unknown dataset kind {kind!r} (expected voc or coco); "
                       "rerun the prepare stage")
