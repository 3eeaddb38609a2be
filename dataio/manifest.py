"""The dataset manifest: ``prepare`` builds the reader from params (:func:`from_config`) and
records it (:func:`write_manifest`); every later stage opens it (:func:`open_dataset`), so no stage
guesses where images, masks or labels live::

    ds = from_config(params.dataset, base_dir=".")
    ds.validate(["train", "val"])                     # DatasetError before anything is written
    write_manifest(ds, MANIFEST)
    ds = open_dataset(MANIFEST)                       # in every later stage
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.paths import MANIFEST, SYNTHETIC_DIR
from dataio.coco import COCODataset
from dataio.dataset import SegDataset
from dataio.files import DatasetError, _resolve
from dataio.voc import VOCDataset


def from_config(cfg: Any, base_dir: str | Path = ".", *,
                synthetic_root: str | Path = SYNTHETIC_DIR) -> SegDataset:
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
    contexts = None
    if cfg.contexts:
        in_root = _resolve(cfg.contexts, root)
        contexts = in_root if in_root.exists() else _resolve(cfg.contexts, base)
        if not contexts.is_file():
            raise DatasetError(f"params key 'dataset.contexts': file not found: {cfg.contexts} (looked in {root} "
                               f"and {base})")
    return VOCDataset(root, splits=splits, mask_dir=cfg.mask_dir, labels=labels, class_names=names,
                      context_dir=cfg.context_dir, contexts=contexts)


def write_manifest(dataset: SegDataset, manifest_path: str | Path = MANIFEST, *,
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
    if dataset.recorded_sizes:
        entry["image_size"] = dataset.recorded_sizes
    write_text_atomic(manifest_path, json.dumps(entry, indent=2, sort_keys=True) + "\n")
    return manifest_path


def open_dataset(manifest_path: str | Path = MANIFEST) -> SegDataset:
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
    if kind not in ("voc", "coco"):
        raise DatasetError(f"{manifest_path}: unknown dataset kind {kind!r} (expected voc or coco); "
                           "rerun the prepare stage")
    if kind == "voc":
        ds: SegDataset = VOCDataset(root, splits=splits, mask_dir=m.get("mask_dir") or "SegmentationClass",
                                    labels=labels, class_names=names, image_dir=m.get("image_dir") or "JPEGImages",
                                    context_dir=m.get("context_dir") or "ContextMaps", contexts=m.get("contexts") or [])
    else:
        index = _resolve(m["index"], base) if m.get("index") else None
        ds = COCODataset(root, splits=splits, mask_dir=m.get("mask_dir") or "SegmentationClass",
                         labels=labels, class_names=names, index_path=index)
    ds.recorded_sizes = dict(m.get("image_size") or {})   # image sides per split, measured by prepare
    return ds
