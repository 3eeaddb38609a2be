"""COCO 2014 (or 2017): labels from the instances json, masks from EPS-style label PNGs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from core.atomic import write_text_atomic
from dataio.dataset import SegDataset
from dataio.files import DatasetError
from dataio.labels import read_label_file


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
        return self._describe(manifest_dir, project_dir, index=self.index_path)


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
