"""bench/upper_bounds.py: the resolution and saliency oracles by hand, and the command on a tiny dataset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataio.label_png import save_mask_png

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("upper_bounds", REPO / "bench" / "upper_bounds.py")
ub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ub)


def test_resolution_oracle_keeps_grid_aligned_objects_and_loses_small_ones():
    gt = np.zeros((32, 32), np.uint8)
    gt[:16, :16] = 1                                  # one whole cell of a stride-16 grid
    pred = ub.resolution_oracle(gt, 3, [1.0], 16)
    assert (pred[:12, :12] == 1).all() and (pred[16:, :] == 0).all() and (pred[:, 16:] == 0).all()
    # bilinear upsampling rounds the cell's corner: (15, 15) has P(1) = 0.53^2 = 0.28 < P(bg)
    assert pred[15, 15] == 0 and pred[15, 0] == 1
    dot = np.zeros((32, 32), np.uint8)
    dot[20:22, 20:22] = 2                             # 4 of a cell's 256 pixels: the cell stays background
    assert (ub.resolution_oracle(dot, 3, [1.0], 16) == 0).all()
    # at scale 2 the same 2x2 object covers 16 of 256 pixels of an 8-px-image cell: still lost, but a
    # 12x12 object (144 / 256 of a stride-16 cell at scale 1) survives
    big = np.zeros((32, 32), np.uint8)
    big[16:28, 16:28] = 2
    assert (ub.resolution_oracle(big, 3, [1.0], 16)[16:28, 16:28] == 2).any()
    ignore = gt.copy()
    ignore[0, 0] = 255                                # ignore pixels are not a label
    assert ub.resolution_oracle(ignore, 3, [1.0], 16).max() <= 2


def test_saliency_background_oracle_by_hand():
    gt = np.array([[0, 1, 1, 2], [0, 0, 2, 255]], np.uint8)
    sal = np.array([[0.9, 0.8, 0.2, 0.7], [0.1, 0.6, 0.9, 0.9]], np.float32)
    # salient background pixels take the largest present class (1 and 2 have 2 pixels each: the first, 1);
    # non-salient pixels are background whatever their class; the ignore pixel (255) is not scored
    assert ub.saliency_background_oracle(gt, sal).tolist() == [[1, 1, 0, 2], [0, 1, 2, 1]]


def test_saliency_context_oracle_hands_a_salient_context_to_its_class_only_when_present():
    gt = np.array([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]], np.uint8)
    context = np.array([[1, 1, 0, 0], [2, 2, 0, 0], [0, 3, 0, 0]], np.uint8)
    sal = np.array([[0.9, 0.2, 0.9, 0.9], [0.9, 0.9, 0.9, 0.4], [0.9, 0.9, 0.9, 0.9]], np.float32)
    # contexts 1, 2, 3 belong to classes 0, 1, 2 (labels 1, 2, 3); class 2 (label 3) is absent
    pred = ub.saliency_context_oracle(gt, sal, context, {1: 0, 2: 1, 3: 2})
    # salient context 1 -> label 1, salient context 2 -> label 2, the non-salient context pixel stays
    # background; context 3's class is absent, so its salient pixel takes the largest present class (2),
    # as does salient generic background; a non-salient object pixel is background
    assert pred.tolist() == [[1, 0, 1, 1], [2, 2, 2, 0], [2, 2, 2, 2]]
    # the same maps without contexts: every salient background pixel takes the largest present class
    assert ub.saliency_background_oracle(gt, sal).tolist() == [[2, 0, 1, 1], [2, 2, 2, 0], [2, 2, 2, 2]]


def test_selection_oracle_by_hand():
    gt = np.array([[1, 1, 1, 1, 2, 2], [0, 0, 3, 3, 3, 255]], np.uint8)
    sal = np.array([[0.9, 0.9, 0.2, 0.1, 0.6, 0.1], [0.9, 0.0, 0.1, 0.1, 0.8, 0.9]], np.float32)
    # class 1: 2/4 salient, class 2: 1/2, class 3: 1/3; ignore (255) and background are not classes
    assert ub.selection_oracle(gt, sal, 0.4) == (2, 3)
    assert ub.selection_oracle(gt, sal, 0.5) == (0, 3)
    assert ub.selection_oracle(gt, sal, 0.3) == (3, 3)


@pytest.fixture
def tiny_prepared(tmp_path, make_voc):
    from dataio.manifest import write_manifest
    from dataio.voc import VOCDataset
    root = make_voc(size=(32, 48))
    ds = VOCDataset(root)
    manifest = tmp_path / "dataset.json"
    write_manifest(ds, manifest)
    return ds, manifest


def test_command_with_ground_truth_saliency_gives_perfect_saliency_bounds(tmp_path, tiny_prepared, capsys):
    ds, manifest = tiny_prepared
    sal_dir = tmp_path / "gt_saliency"
    assert ub.main(["--manifest", str(manifest), "--write-gt-saliency", str(sal_dir)]) == 0
    assert sorted(p.stem for p in sal_dir.glob("*.png")) == sorted(ds.ids("train") + ds.ids("val"))
    out = tmp_path / "bounds.json"
    assert ub.main(["--manifest", str(manifest), "--saliency-dir", str(sal_dir), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows["saliency alone (foreground IoU)"]["miou"] == pytest.approx(1.0)
    assert rows["saliency > 0.5 as the foreground (perfect classes)"]["miou"] == pytest.approx(1.0)
    assert rows["selection"]["foreground_share"] == pytest.approx(1.0)
    res = [v for k, v in rows.items() if k.startswith("resolution")]
    assert len(res) == 2 and all(0.0 < r["miou"] < 1.0 for r in res)   # 10x10 objects on a stride-16 grid
    assert "oracles: they use the ground truth" in capsys.readouterr().out
    # no contexts in this dataset: no context row, no per-pair ratios
    assert not any("context" in k for k in rows) and not any("pairs" in r for r in rows.values())


def test_command_reports_m_kc_per_pair_with_contexts(tmp_path, tiny_voc, capsys):
    """One context ('sky', class cat) under every image's bottom rows, all of it salient: the context
    row hands it to cat wherever cat is present, and its m_kc is that count over cat's true pixels."""
    from dataio.manifest import write_manifest
    from dataio.voc import VOCDataset
    (tiny_voc / "Ctx").mkdir()
    ds = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy")
    sal_dir = tmp_path / "sal"
    sal_dir.mkdir()
    fp = tp = 0
    for image_id in ds.ids("train") + ds.ids("val"):
        gt = ds.load_mask(image_id)
        ctx = np.zeros(gt.shape, np.uint8)
        ctx[20:, :] = 1                                  # below every object of the tiny masks
        save_mask_png(ctx, tiny_voc / "Ctx" / f"{image_id}.png", palette=False)
        sal = np.where((gt > 0) & (gt != 255) | (ctx == 1), 255, 0).astype(np.uint8)
        Image.fromarray(sal).save(sal_dir / f"{image_id}.png")
        if image_id in ds.ids("train") and (gt == 1).any():
            fp += int(((ctx == 1) & (gt == 0)).sum())
            tp += int((gt == 1).sum())
    (tiny_voc / "pairs.yaml").write_text("sky: cat\n")
    ds = VOCDataset(tiny_voc, labels=tiny_voc / "cls_labels.npy", contexts=tiny_voc / "pairs.yaml", context_dir="Ctx")
    manifest = tmp_path / "dataset.json"
    write_manifest(ds, manifest)
    out = tmp_path / "bounds.json"
    assert ub.main(["--manifest", str(manifest), "--saliency-dir", str(sal_dir), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert tp > 0 and fp > 0
    row = rows["saliency > 0.5 as the foreground, a salient context taken by its class"]
    assert row["pairs"]["sky->cat"] == pytest.approx(fp / tp)
    assert row["mean_mkc"] == pytest.approx(fp / tp)
    assert "| bound | sky->cat |" in capsys.readouterr().out
