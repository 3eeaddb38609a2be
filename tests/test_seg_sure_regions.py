"""train_seg's sure regions (``train_seg.conf_fg_margin`` / ``conf_bg_margin``): which pseudo-mask pixels
train the segmenter, checked by hand, and the error when the file holds no scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_train_seg import _train, make_dataset, tiny_cfg, write_pseudo_masks

from artifacts.pseudo_masks import PseudoMaskWriter
from dataio.voc import VOCDataset
from tasks import train_seg
from tasks.train_seg import IGNORE, MaskSource, TrainSegError, keep_sure


def test_keep_sure_ignores_the_unsure_pixels_and_those_a_crf_moved():
    # one row of 5 pixels: background score 0.5, one class (mask value 2) with these CAM values
    scores = np.array([[[0.5] * 5], [[0.9, 0.55, 0.4, 0.2, 0.62]]], np.float32)
    values = np.array([0, 2])
    exported = np.array([[2, 2, 0, 0, 0]], np.uint8)   # the last pixel moved to the background by a CRF
    # fg margin 0.1: the class is sure above 0.6 (pixels 0, 4); bg margin 0.15: the background below 0.35 (pixel 3)
    np.testing.assert_array_equal(keep_sure(exported, scores, values, 0.1, 0.15), [[2, 255, 255, 0, 255]])
    # no margins: every pixel as exported, except where the export disagrees with the scores
    np.testing.assert_array_equal(keep_sure(exported, scores, values, 0.0, 0.0), [[2, 2, 0, 0, 255]])


def write_scored_masks(path: Path, reader: VOCDataset) -> Path:
    """Masks with CAMs (threshold background 0.20): 1.0 on the object's left half, 0.25 on its right half
    (unsure at margin 0.10), 0.0 elsewhere."""
    with PseudoMaskWriter(path, list(reader.class_names), {"background": "threshold", "bg_threshold": 0.2}) as w:
        for image_id in reader.ids("train"):
            gt = np.where(reader.load_mask(image_id) == 255, 0, reader.load_mask(image_id))
            classes = np.array(sorted(set(np.unique(gt).tolist()) - {0}), np.int64) - 1
            cols = np.arange(gt.shape[1])[None, :]
            cams = []
            for c in classes:
                obj = gt == c + 1
                mid = np.median(np.nonzero(obj)[1])
                cams.append(np.where(obj, np.where(cols < mid, 1.0, 0.25), 0.0))
            cams = np.stack(cams).astype(np.float32) if cams else np.zeros((0,) + gt.shape, np.float32)
            w.add(image_id, gt.astype(np.uint8), cams=cams, classes=classes)
    return path


def test_margins_make_the_unsure_pixels_ignored_and_need_the_scores(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    h5 = write_scored_masks(tmp_path / "scored.h5", reader)
    cfg = tiny_cfg(conf_fg_margin=0.1, conf_bg_margin=0.15, iterations=2)
    scores = train_seg.sure_scores(cfg, h5, None)
    masks = MaskSource("pseudo", reader, h5, scores, (0.1, 0.15))
    for image_id in reader.ids("train"):
        gt = np.where(reader.load_mask(image_id) == 255, 0, reader.load_mask(image_id))
        got = masks.load(image_id)
        np.testing.assert_array_equal(got[gt == 0], 0)                      # background 0.20 vs 0.0: sure
        on = got[gt > 0]
        assert set(np.unique(on).tolist()) <= set(np.unique(gt[gt > 0]).tolist()) | {IGNORE}
        assert 0 < (on == IGNORE).sum() < on.size                           # the right halves only
    masks.close()
    assert train_seg.sure_scores(tiny_cfg(), h5, None) is None               # 0 and 0: no scores read
    assert train_seg.sure_scores(tiny_cfg(mask_source="ground_truth", conf_fg_margin=0.1), h5, None) is None
    summary = _train(tmp_path, "sure", cfg, reader, h5)
    assert 0.0 <= summary["val/mIoU_single_scale"] <= 1.0
    with pytest.raises(TrainSegError, match="conf_fg_margin.*pm.h5 holds no CAMs.*or set both to 0"):
        _train(tmp_path, "nocams", cfg, reader, write_pseudo_masks(tmp_path / "pm.h5", reader))
    assert not (tmp_path / "nocams").exists()


def test_a_missing_saliency_map_is_named_before_training(tmp_path):
    """With a saliency background rule the sure regions read the saliency maps: one missing is an error
    naming the map, and nothing is written."""
    from artifacts.saliency_maps import saliency_path, write_map_atomic

    reader = make_dataset(tmp_path / "voc")
    h5 = write_scored_masks(tmp_path / "scored.h5", reader)
    import h5py
    with h5py.File(h5, "r+") as f:
        f.attrs["background"] = "saliency"
    ids = reader.ids("train")
    for image_id in ids[1:]:
        write_map_atomic(saliency_path(tmp_path / "sal", image_id), np.full((32, 32), 255, np.uint8))
    cfg = tiny_cfg(conf_fg_margin=0.1, conf_bg_margin=0.15, iterations=2)
    with pytest.raises(TrainSegError, match=f"saliency map .*{ids[0]}.* is missing \\(train_seg.conf_\\*_margin"):
        _train(tmp_path, "nosal", cfg, reader, h5, saliency_dir=tmp_path / "sal")
    assert not (tmp_path / "nosal").exists()
