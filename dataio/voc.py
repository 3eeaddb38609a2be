"""The VOC folder layout: the synthetic dataset, PASCAL VOC 2012 (+ SBD), or a user's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from dataio.dataset import SegDataset
from dataio.files import (
    IMAGE_EXTENSIONS,
    LIST_DIR,
    VOC_CLASSES,
    DatasetError,
    read_class_names,
    read_id_list,
)
from dataio.labels import parse_contexts


class VOCDataset(SegDataset):
    """Any VOC-layout folder: the synthetic dataset, PASCAL VOC 2012 (+ SBD), or a user's own.

    ``root/JPEGImages/<id>.jpg`` (other image extensions are found too),
    ``root/<mask_dir>/<id>.png`` (palette *or* grey PNG; index values are read, never colours),
    ``root/ImageSets/Segmentation/<list>.txt`` (one id per line; a list may also be given as a
    path to a .txt file), optional context maps ``root/<context_dir>/<id>.png`` with their context ->
    class pairs (``contexts``: a file, a list or a mapping; default ``root/contexts.json``).

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
                    text = Path(contexts).read_text()
                    contexts = yaml.safe_load(text) if Path(contexts).suffix in (".yaml", ".yml") else json.loads(text)
                except (OSError, ValueError, yaml.YAMLError) as e:
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
        return self._describe(manifest_dir, project_dir, image_dir=self.image_dir,
                              context_dir=self.context_dir if self.context_names else None,
                              contexts=[{"id": k, "name": n, "class": self.context_class[k]}
                                        for k, n in enumerate(self.context_names, start=1)] or None)
