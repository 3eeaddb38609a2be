"""A user's own VOC-layout dataset: the wide label CSV, and context annotations given by params that
make evaluate report the co-occurrence confusion m_kc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLASSES

from core.config import DatasetConfig, EvaluateConfig
from dataio.files import DatasetError
from dataio.label_png import save_mask_png
from dataio.manifest import from_config, open_dataset, write_manifest
from dataio.voc import VOCDataset


def _wide_csv(root: Path, header: list[str], rows: list[list[str]]) -> Path:
    path = root / "wide.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_a_wide_csv_gives_the_same_labels_as_the_npy_file(tiny_voc):
    npy = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy")
    ids = npy.ids("train") + npy.ids("val")
    order = ["Boat", "cat", "dog"]                      # any column order, names matched loosely
    index = {n: TINY_CLASSES.index(n.lower()) for n in order}
    rows = [[i, *(str(int(npy.labels(i)[index[n]])) for n in order)] for i in ids]
    wide = VOCDataset(tiny_voc, labels=_wide_csv(tiny_voc, ["image_id", *order], rows))
    wide.validate(["train", "val"])
    for image_id in ids:
        np.testing.assert_array_equal(wide.labels(image_id), npy.labels(image_id))


@pytest.mark.parametrize("header, rows, needle", [
    (["image_id", "cat", "dog", "zebra"], [["tr_000", "1", "0", "0"]], "line 1: column 'zebra' is not a class"),
    (["image_id", "cat", "dog"], [["tr_000", "1", "0"]], "line 1: the header must name every class once; missing boat"),
    (["image_id", "cat", "dog", "boat"], [["tr_000", "1", "0", "0"], ["tr_001", "1", "0"]], "line 3: 3 values for 4"),
    (["image_id", "cat", "dog", "boat"], [["tr_000", "1", "yes", "0"]], "line 2: class columns hold 0 or 1, got 'yes'"),
    (["image_id", "cat", "dog", "boat"], [["tr_000", "1", "0", "0"], ["tr_000", "0", "1", "0"]],
     "line 3: image id 'tr_000' is listed twice"),
])
def test_a_malformed_wide_csv_names_the_file_and_line(tiny_voc, header, rows, needle):
    path = _wide_csv(tiny_voc, header, rows)
    with pytest.raises(DatasetError) as err:
        VOCDataset(tiny_voc, labels=path).validate(["train"])
    assert "wide.csv" in str(err.value) and needle in str(err.value)


def _context_dataset(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Every image: its mask as written by tiny_voc, context 1 ('sky', paired with cat) on the bottom
    rows and context 2 ('water', paired with boat) on the right columns, in a folder named Ctx."""
    (root / "Ctx").mkdir()
    ds = VOCDataset(root, labels=root / "cls_labels.npy")
    contexts = {}
    for image_id in ds.ids("train") + ds.ids("val"):
        ctx = np.zeros((24, 32), np.uint8)
        ctx[18:, :] = 1
        ctx[:18, 26:] = 2
        save_mask_png(ctx, root / "Ctx" / f"{image_id}.png", palette=False)
        contexts[image_id] = ctx
    (root / "pairs.yaml").write_text("sky: cat\nwater: boat\n")
    return root, contexts


def test_contexts_from_params_give_m_kc_equal_to_a_hand_count(tiny_voc, tmp_path):
    from tasks import evaluate

    root, contexts = _context_dataset(tiny_voc)
    cfg = DatasetConfig(kind="voc", root=str(root), labels="cls_labels.npy", contexts="pairs.yaml", context_dir="Ctx")
    manifest = write_manifest(from_config(cfg), tmp_path / "prepared" / "dataset.json", project_dir=tmp_path)
    ds = open_dataset(manifest)
    assert ds.context_names == ["sky", "water"] and ds.context_class == {1: 0, 2: 2}

    # predictions: the ground truth, plus every visible context pixel predicted as its paired class
    preds, fp, tp = tmp_path / "preds", {1: 0, 2: 0}, {0: 0, 2: 0}
    preds.mkdir()
    ids = ds.ids("train")
    for image_id in ids:
        gt, ctx = ds.load_mask(image_id), contexts[image_id]
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        for k, c in ((1, 0), (2, 2)):
            on = (ctx == k) & (gt == 0)
            pred[on] = c + 1
            fp[k] += int(on.sum())
            tp[c] += int(((pred == c + 1) & (gt == c + 1)).sum())
        save_mask_png(pred, preds / f"{image_id}.png", palette=False)
    metrics = evaluate.run(EvaluateConfig(workers=1, splits=["train"], report_images=0), predictions=preds,
                           manifest=manifest, cams_dir=None, saliency_dir=None, out_dir=tmp_path / "eval",
                           metrics_path=tmp_path / "eval.json", plots_path=None, progress=False)
    pairs = metrics["cooccurrence"]["pairs"]
    assert pairs["sky->cat"]["ratio"] == pytest.approx(fp[1] / tp[0], abs=1e-6)
    assert pairs["water->boat"]["ratio"] == pytest.approx(fp[2] / tp[2], abs=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text())["cooccurrence"]["pairs"] == pairs


def test_a_missing_contexts_file_is_named(tiny_voc):
    cfg = DatasetConfig(kind="voc", root=str(tiny_voc), contexts="nope.yaml")
    with pytest.raises(DatasetError, match="dataset.contexts.*nope.yaml"):
        from_config(cfg)
