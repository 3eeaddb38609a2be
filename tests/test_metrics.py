"""Metrics on hand-computed cases (method.metrics) and the evaluate stage end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from artifacts.cams import CamRecord, write_cam_file
from artifacts.pseudo_masks import PseudoMaskWriter
from core.config import EvaluateConfig
from method.metrics import (
    SegEvaluator,
    boundary_counts,
    boundary_edges,
    boundary_scores,
    confusion_matrix,
    context_pixels,
    cooccurrence_fp,
    fill_ignore,
    scores_from_confusion,
)

I = 255  # ignore


# --------------------------------------------------------------------------- confusion / IoU


def test_iou_precision_recall_by_hand_with_ignore_and_absent_class():
    gt = np.array([[0, 0, 1, 1],
                   [0, I, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, I]])
    conf = confusion_matrix(gt, pred, 3)
    assert conf.shape == (3, 4)
    assert conf.sum() == 7                      # the gt-ignore pixel is not counted
    assert conf[1, 3] == 1                      # class 1 predicted as 255 -> "other" column
    s = scores_from_confusion(conf)
    # background: TP 2, gt 3, pred 2 -> IoU 2/3; class 1: TP 3, gt 4, pred 4 -> IoU 3/5
    assert s["iou"][0] == pytest.approx(2 / 3) and s["iou"][1] == pytest.approx(3 / 5)
    assert math.isnan(s["iou"][2])              # class 2 absent everywhere: no IoU, not in the mean
    assert s["miou"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert s["precision"][1] == pytest.approx(3 / 4) and s["recall"][1] == pytest.approx(3 / 4)
    assert s["precision"][0] == pytest.approx(1.0) and s["recall"][0] == pytest.approx(2 / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    # the authors' mode drops the pixel predicted 255: class 1 gt 3 -> IoU 3/4
    a = scores_from_confusion(conf, ignore_pred_255=True)
    assert a["iou"][1] == pytest.approx(3 / 4) and a["iou"][0] == pytest.approx(2 / 3)
    assert a["miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_empty_prediction_scores_zero_for_present_class():
    gt = np.zeros((4, 4), np.uint8)
    gt[1:3, 1:3] = 2
    pred = np.zeros_like(gt)
    s = scores_from_confusion(confusion_matrix(gt, pred, 3))
    assert s["iou"][2] == 0.0 and math.isnan(s["precision"][2]) and s["recall"][2] == 0.0
    assert s["iou"][0] == pytest.approx(12 / 16)
    assert math.isnan(s["iou"][1])
    assert s["miou"] == pytest.approx((12 / 16 + 0) / 2)
    b = boundary_scores(boundary_counts(gt, pred))
    assert math.isnan(b["precision"]) and b["recall"] == 0.0 and b["f1"] == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(np.array([[3]]), np.array([[0]]), 3)
    with pytest.raises(ValueError, match="differ in size"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


# --------------------------------------------------------------------------- boundaries


def test_edges_are_the_union_of_per_label_laplacians():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (20, 24)).astype(np.uint8)
    label[5:15, 5:15] = 2
    union = np.zeros(label.shape, bool)
    for v in np.unique(label):
        lap = cv2.Laplacian((label == v).astype(np.float32), cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE)
        union |= lap != 0
    assert np.array_equal(boundary_edges(label), union)


def test_boundary_precision_recall_f1_by_hand():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 1                       # edge pixels: columns 2 and 3 (12 px)
    pred = np.zeros((6, 6), np.uint8)
    pred[:, 4:] = 1                     # edge pixels: columns 3 and 4
    assert np.array_equal(boundary_counts(gt, pred, tolerance=0), [6, 12, 6, 12])
    b = boundary_scores(boundary_counts(gt, pred, tolerance=0))
    assert b["precision"] == pytest.approx(0.5) and b["recall"] == pytest.approx(0.5) and b["f1"] == pytest.approx(0.5)
    b1 = boundary_scores(boundary_counts(gt, pred, tolerance=1))
    assert b1["precision"] == 1.0 and b1["recall"] == 1.0 and b1["f1"] == 1.0
    # no edges anywhere: undefined
    flat = np.zeros((4, 4), np.uint8)
    assert math.isnan(boundary_scores(boundary_counts(flat, flat))["f1"])


def test_ignore_band_is_filled_by_nearest_label_before_edges():
    row = np.array([[0, 0, I, I, 1, 1]])
    assert fill_ignore(row).tolist() == [[0, 0, 0, 1, 1, 1]]
    gt = np.repeat(row, 3, axis=0)
    pred = np.repeat(np.array([[0, 0, 0, 1, 1, 1]]), 3, axis=0)
    b = boundary_scores(boundary_counts(gt, pred, tolerance=0))
    assert b["f1"] == 1.0


# --------------------------------------------------------------------------- co-occurrence


def test_cooccurrence_ratio_by_hand():
    # class 0 (label 1) "train" co-occurs with context 1 "rail"
    gt = np.array([[1, 1, 1, 0, 0, 0],
                   [1, 1, 0, 0, 0, I]])
    ctx = np.array([[0, 1, 1, 1, 1, 0],
                    [0, 0, 0, 1, 1, 1]])
    pred = np.array([[1, 1, 1, 1, 0, 0],
                     [1, 0, 0, 1, 1, 1]])
    # FP: context-1 pixels predicted 1 that are not truly 1 (nor ignore): (0,3), (1,3), (1,4) -> 3
    assert cooccurrence_fp(gt, pred, ctx, {1: 0}) == {1: 3}
    ev = SegEvaluator(num_classes=1, context_class={1: 0})
    ev.add(gt, pred, ctx)
    pair = ev.summary()["cooccurrence"][0]
    # TP of class 0: (0,0) (0,1) (0,2) (1,0) -> 4
    assert pair["tp"] == 4 and pair["fp"] == 3 and pair["ratio"] == pytest.approx(3 / 4)
    # context-1 pixels not truly class 0: (0,3) (0,4) (1,3) (1,4); (0,1) (0,2) are train, (1,5) is ignore
    assert context_pixels(gt, ctx, {1: 0}) == {1: 4}
    assert pair["context_pixels"] == 4 and pair["context_share"] == pytest.approx(3 / 4)
    # no true positives: ratio undefined
    ev2 = SegEvaluator(num_classes=1, context_class={1: 0})
    ev2.add(gt, np.zeros_like(pred), ctx)
    assert math.isnan(ev2.summary()["cooccurrence"][0]["ratio"])


def test_evaluator_accumulates_like_one_big_image():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 3, (8, 10)) for _ in range(3)]
    preds = [rng.integers(0, 3, (8, 10)) for _ in range(3)]
    ev = SegEvaluator(num_classes=2)
    for g, p in zip(gts, preds):
        ev.add(g, p)
    whole = scores_from_confusion(confusion_matrix(np.concatenate(gts), np.concatenate(preds), 3))
    assert ev.summary()["standard"]["miou"] == pytest.approx(whole["miou"])
    with pytest.raises(ValueError, match="context"):
        SegEvaluator(num_classes=2, context_class={1: 0}).add(gts[0], preds[0])


# --------------------------------------------------------------------------- the evaluate stage


class _Dataset:
    """A tiny dataset with contexts (the interface of dataio.dataset.SegDataset)."""

    def __init__(self, n=4, size=(20, 24)):
        self.class_names = ["train", "boat"]
        self.num_classes = 2
        self.context_names = ["rail", "water"]
        self.context_class = {1: 0, 2: 1}
        h, w = size
        rng = np.random.default_rng(0)
        self._ids = [f"im{i}" for i in range(n)]
        self.masks, self.ctx, self.images = {}, {}, {}
        for k, i in enumerate(self._ids):
            m = np.zeros(size, np.uint8)
            c = np.zeros(size, np.uint8)
            cls = k % 2
            c[h // 2:, :] = cls + 1                      # the context fills the lower half
            m[4:h // 2 + 4, 6:18] = cls + 1               # the object stands on it
            m[4, 6:18] = I
            self.masks[i], self.ctx[i] = m, c
            self.images[i] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    def ids(self, split):
        return list(self._ids)

    def has_masks(self, split):
        return True

    def load_image(self, i):
        return self.images[i]

    def load_mask(self, i):
        return self.masks[i]

    def load_context(self, i):
        return self.ctx[i]

    def labels(self, i):
        v = np.zeros(2, np.float32)
        v[np.unique(self.masks[i][(self.masks[i] > 0) & (self.masks[i] < I)]) - 1] = 1
        return v


def _write_predictions(path, ds, predict):
    with PseudoMaskWriter(path, ds.class_names, {"method": "eps", "background": "threshold", "bg_threshold": 0.2,
                                                  "crf": "none"}) as w:
        for i in ds.ids("train"):
            w.add(i, predict(i))


@pytest.mark.parametrize("workers", [1, 2])
def test_evaluate_stage_perfect_and_leaky_predictions(tmp_path, workers):
    from tasks.evaluate import evaluate

    ds = _Dataset()
    cfg = EvaluateConfig(workers=workers, report_images=2, report_tile=40, sweep_thresholds=[0.1, 0.5, 0.9])
    perfect = tmp_path / "perfect.h5"
    _write_predictions(perfect, ds, lambda i: np.where(ds.masks[i] == I, 0, ds.masks[i]).astype(np.uint8))
    m = evaluate(cfg, ds, perfect, out_dir=tmp_path / "eval", metrics_path=tmp_path / "m.json",
                 plots_path=tmp_path / "plots" / "sweep.csv", progress=False)
    assert m["miou"] == 1.0 and m["boundary"]["f1"] == 1.0
    assert m["cooccurrence"]["mean_ratio"] == 0.0
    assert set(m["cooccurrence"]["pairs"]) == {"rail->train", "water->boat"}
    assert json.loads((tmp_path / "m.json").read_text()) == m
    for f in ("per_class.csv", "confusion.csv", "cooccurrence.csv", "threshold_sweep.csv", "report.png"):
        assert (tmp_path / "eval" / f).is_file(), f
    assert "threshold_sweep" not in m          # no CAMs given: no sweep
    assert "timing" not in m                   # timings live in the stages' own metrics files

    # a prediction that also paints the whole context as the class: ratio = context px / object px
    leaky = tmp_path / "leaky.h5"
    _write_predictions(leaky, ds, lambda i: np.where((ds.masks[i] > 0) & (ds.masks[i] < I), ds.masks[i],
                                                     ds.ctx[i]).astype(np.uint8))
    m2 = evaluate(cfg, ds, leaky, out_dir=tmp_path / "eval2", metrics_path=tmp_path / "m2.json", progress=False)
    m_obj = ds.masks["im0"]
    fp = int(((ds.ctx["im0"] == 1) & (m_obj != 1) & (m_obj != I)).sum())
    tp = int((m_obj == 1).sum())
    assert m2["cooccurrence"]["pairs"]["rail->train"]["ratio"] == pytest.approx(fp / tp, abs=1e-6)
    assert m2["miou"] < 1.0

    import pandas as pd
    per_class = pd.read_csv(tmp_path / "eval2" / "per_class.csv")
    assert list(per_class["name"]) == ["background", "train", "boat"]


def test_evaluate_threshold_sweep_from_cams_and_png_source(tmp_path):
    from artifacts.pseudo_masks import export_png
    from tasks.evaluate import evaluate

    ds = _Dataset(n=2)
    cams_dir = tmp_path / "cams"
    cams_dir.mkdir()
    for i in ds.ids("train"):
        obj = ((ds.masks[i] > 0) & (ds.masks[i] < I)).astype(np.float32)
        cls = int(ds.labels(i).argmax())
        write_cam_file(cams_dir / f"{i}.npz", CamRecord(0.6 * obj[None] + 0.3 * (1 - obj[None]),
                                                        np.array([cls]), None, obj.shape))
    (cams_dir / "meta.json").write_text(json.dumps({"ids": ds.ids("train")}))
    h5 = tmp_path / "p.h5"
    _write_predictions(h5, ds, lambda i: np.where(ds.masks[i] == I, 0, ds.masks[i]).astype(np.uint8))
    png_dir = tmp_path / "png"
    export_png(h5, png_dir)
    cfg = EvaluateConfig(workers=1, report_images=1, report_tile=32, sweep_thresholds=[0.2, 0.45, 0.7])
    m = evaluate(cfg, ds, png_dir, out_dir=tmp_path / "e", metrics_path=tmp_path / "m.json",
                 plots_path=tmp_path / "sweep.csv", cams_dir=cams_dir, progress=False)
    assert m["miou"] == 1.0
    import pandas as pd
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    # t=0.2: everything is foreground; t=0.45: exactly the objects; t=0.7: nothing
    assert sweep["threshold"].tolist() == [0.2, 0.45, 0.7]
    assert sweep["miou"][1] == pytest.approx(1.0)
    assert sweep["miou"][0] < 1.0 and sweep["miou"][2] < 1.0
    assert m["threshold_sweep"]["oracle_threshold"] == 0.45 and m["threshold_sweep"]["oracle_miou"] == 1.0
    # m_kc along the sweep: at t=0.2 every context pixel that is not the object is taken for the class
    ratios = []
    for i in ds.ids("train"):
        cls = int(ds.labels(i).argmax())
        fp = np.sum((ds.ctx[i] == cls + 1) & (ds.masks[i] != cls + 1) & (ds.masks[i] != I))
        ratios.append(fp / np.sum(ds.masks[i] == cls + 1))
    assert sweep["mean_mkc"][0] == pytest.approx(np.mean(ratios), abs=1e-6) and sweep["mean_mkc"][1] == 0.0
    assert m["threshold_sweep"]["oracle_mean_mkc"] == 0.0
    assert m["threshold_sweep"]["oracle_pairs"] == {"rail->train": 0.0, "water->boat": 0.0}


def test_evaluate_reports_missing_predictions(tmp_path):
    from tasks.evaluate import EvaluateError, evaluate

    ds = _Dataset(n=3)
    h5 = tmp_path / "p.h5"
    with PseudoMaskWriter(h5, ds.class_names, {}) as w:
        w.add("im0", ds.masks["im0"])
    with pytest.raises(EvaluateError, match="2 of 3 images .* no prediction"):
        evaluate(EvaluateConfig(workers=1), ds, h5, out_dir=tmp_path / "e", metrics_path=tmp_path / "m.json",
                 progress=False)
    assert not (tmp_path / "m.json").exists()
