"""Image-level labels (psa/EPS ``cls_labels.npy`` or a CSV, or derived from masks) and context specs.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dataio.files import DatasetError, normalise_class_name
from dataio.label_png import _value_counts


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
    * ``.csv`` long: header ``image_id,labels``; ``labels`` space-separated class names or 0-based indices.
    * ``.csv`` wide (what pandas and labelling tools export): header ``image_id,<class>,<class>,...``
      with one 0/1 column per class, in any order, names matched to ``class_names`` loosely.
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
                       "with header image_id,labels or image_id,<class>,<class>,...")


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
        header = [h.strip() for h in next(reader, None) or []]
        if header[:1] != ["image_id"] or len(header) < 2:
            raise DatasetError(f"{path}: first line must be the header 'image_id,labels' (long) or "
                               f"'image_id,<class>,<class>,...' (wide), got {','.join(header)!r}")
        if header[1:] != ["labels"]:
            return _read_wide_rows(path, header, reader, class_names)
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


def _read_wide_rows(path: Path, header: list[str], rows: Iterable[list[str]],
                    class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows of a wide label CSV: one 0/1 column per class (every class once, no other column)."""
    by_loose = {normalise_class_name(n): i for i, n in enumerate(class_names)}
    columns = []
    for name in header[1:]:
        idx = by_loose.get(normalise_class_name(name))
        if idx is None:
            raise DatasetError(f"{path}: line 1: column '{name}' is not a class; known: {', '.join(class_names)}")
        columns.append(idx)
    missing = [class_names[i] for i in range(len(class_names)) if i not in columns]
    if missing or len(set(columns)) != len(columns):
        raise DatasetError(f"{path}: line 1: the header must name every class once; "
                           + (f"missing {', '.join(missing)}" if missing else "a class is named twice"))
    out: dict[str, np.ndarray] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if len(cells) != len(header):
            raise DatasetError(f"{path}: line {lineno}: {len(cells)} values for {len(header)} columns")
        image_id = cells[0]
        if image_id in out:
            raise DatasetError(f"{path}: line {lineno}: image id '{image_id}' is listed twice; keep one row")
        bad = [v for v in cells[1:] if v not in ("0", "1", "0.0", "1.0")]
        if bad:
            raise DatasetError(f"{path}: line {lineno}: class columns hold 0 or 1, got {bad[0]!r}")
        vec = np.zeros(len(class_names), dtype=np.float32)
        vec[[c for c, v in zip(columns, cells[1:]) if float(v) == 1.0]] = 1.0
        out[image_id] = vec
    return out


def parse_contexts(spec: Any, class_names: Sequence[str], source: str = "contexts") -> tuple[list[str], dict[int, int]]:
    """Context names and ``{context k (1-based): class c (0-based)}`` from a contexts spec.

    The spec (``contexts.json`` or the manifest's ``contexts``) is a list of entries, one per context
    in order k = 1, 2, ..., each ``{"name": str, "class": int | class name}`` (optional ``"id": k``),
    a mapping ``{"contexts": [...]}``, or a plain mapping ``{context name: class}`` in context order.
    """
    if isinstance(spec, dict) and "contexts" in spec:
        spec = spec["contexts"]
    if isinstance(spec, dict):   # {context name: class}, contexts numbered 1, 2, ... in file order
        spec = [{"name": name, "class": cls} for name, cls in spec.items()]
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
