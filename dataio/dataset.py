"""The dataset interface every stage reads (:class:`SegDataset`) and its validation.

Conventions (docs/design.md): ``C`` foreground classes; masks hold ``0`` background, ``c + 1``
class ``c``, ``255`` ignore; image-level labels are a float32 multi-hot vector of length ``C``
(psa/EPS ``cls_labels.npy``). Split names passed to :meth:`SegDataset.ids` are *logical*
(``"train"``, ``"val"``) and mapped to the dataset's own list names (``train_aug`` for VOC + SBD).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataio.files import IGNORE_INDEX, MANIFEST_FORMAT, DatasetError, _portable_path, read_image_file
from dataio.label_png import _check_value_counts, _image_value_counts, _mask_array, read_mask_file
from dataio.labels import _labels_from_counts, _labels_from_mask, read_label_file

_MAX_SHOWN_PROBLEMS = 20


class SegImages(Protocol):
    """What the stages read from a dataset: :class:`SegDataset` has it, tests pass in-memory stand-ins."""

    class_names: list[str]
    num_classes: int

    def ids(self, split: str) -> list[str]: ...
    def load_image(self, image_id: str) -> np.ndarray: ...
    def labels(self, image_id: str) -> np.ndarray: ...
    def load_mask(self, image_id: str) -> np.ndarray | None: ...
    def median_long_side(self, split: str = "train") -> float: ...

    def has_masks(self, split: str) -> bool: ...


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
        # per logical split, what :meth:`size_statistics` gives; prepare records it in the manifest
        self.recorded_sizes: dict[str, dict] = {}
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
        """The manifest entry for this dataset (see :func:`dataio.manifest.write_manifest`); layouts
        add their own keys to :meth:`_describe`'s."""
        raise NotImplementedError

    def _describe(self, manifest_dir: Path, project_dir: Path, **layout: Any) -> dict:
        def portable(path: Path | None) -> str | None:
            return _portable_path(path, manifest_dir, project_dir) if path else None

        return {"format": MANIFEST_FORMAT, "kind": self.kind, "root": portable(self.root),
                "mask_dir": self.mask_dir, "labels": portable(self.labels_path),
                "class_names": self.class_names, "splits": dict(self.splits),
                **{k: portable(v) if isinstance(v, Path) else v for k, v in layout.items()}}

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

    def size_statistics(self, split: str) -> dict:
        """Image sides of ``split`` in pixels (file headers only): ``{"images", "long": {min, median, max},
        "short": {...}}``; recorded by prepare, so later stages read it without opening the images."""
        if split in self.recorded_sizes:
            return self.recorded_sizes[split]
        sides = np.array([self.image_size(i) for i in self.ids(split)], dtype=np.float64).reshape(-1, 2)
        if not len(sides):
            raise DatasetError(f"{self.root}: split '{split}' has no images to measure")
        long, short = sides.max(1), sides.min(1)
        stats = {"images": len(sides),
                 **{name: {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}
                    for name, v in (("long", long), ("short", short))}}
        self.recorded_sizes[split] = stats
        return stats

    def median_long_side(self, split: str = "train") -> float:
        """What ``auto`` knobs are sized from (core.sizing): the median long side of ``split``'s images."""
        return float(self.size_statistics(split)["long"]["median"])

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
