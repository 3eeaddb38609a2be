"""The evaluate_seg stage as dvc.yaml runs it (tasks.evaluate on data/predict_seg/masks): hand-computed
scores of perfect and all-background predictions, the metrics file the headline stage reads, and
predictions that are missing or of the wrong size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataio.label_png import save_mask_png
from tasks import headline

IGNORE = 255


def _write_predictions(project, predict) -> Path:
    folder = project.root / "data" / "predict_seg" / "masks"
    folder.mkdir(parents=True)
    for image_id in project.dataset.ids("val"):
        save_mask_png(predict(image_id), folder / f"{image_id}.png")
    return folder


def _metrics(project) -> dict:
    return json.loads((project.root / "data" / "metrics" / "eval_seg.json").read_text())


def test_ground_truth_predictions_score_one_and_reach_the_headline(voc_project):
    ds = voc_project.dataset
    # predict_seg never writes 255: the ground truth with its void band painted background
    _write_predictions(voc_project, lambda i: np.where(ds.load_mask(i) == IGNORE, 0, ds.load_mask(i)))
    assert voc_project.run("evaluate_seg") == 0
    m = _metrics(voc_project)
    assert m["images"] == 3
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["boundary"]["f1"] == 1.0
    assert (voc_project.root / "data" / "eval_seg" / "per_class.csv").is_file()
    # the headline stage reads the file evaluate_seg writes, and finds its two values in it
    _, args = voc_project.command("evaluate_seg")
    assert args[args.index("--metrics") + 1] == headline.SOURCES["seg"]
    values = headline.run({"train_cls": "none.json", "pseudo": "none.json", "seg": headline.SOURCES["seg"]},
                          "headline.json")
    assert values["segmenter"] == {"val_miou": 1.0, "val_boundary_f1": 1.0}


def test_all_background_predictions_score_the_background_share_by_hand(voc_project):
    ds = voc_project.dataset
    _write_predictions(voc_project, lambda i: np.zeros_like(ds.load_mask(i)))
    assert voc_project.run("evaluate_seg") == 0
    m = _metrics(voc_project)
    gts = [ds.load_mask(i) for i in ds.ids("val")]
    background = sum(int((g == 0).sum()) for g in gts)
    counted = sum(int((g != IGNORE).sum()) for g in gts)          # 255 is left out of every score
    present = sorted(set(np.concatenate([g.ravel() for g in gts]).tolist()) - {0, IGNORE})
    # background: predicted everywhere, so IoU = its pixels / all counted pixels; a class in the ground
    # truth gets IoU 0; a class in neither has no IoU and stays out of the mean
    bg_iou = background / counted
    assert m["pixel_accuracy"] == pytest.approx(bg_iou, abs=1e-6)
    assert m["per_class_iou"]["background"] == pytest.approx(bg_iou, abs=1e-6)
    names = ["background", *ds.class_names]
    for label, name in enumerate(names[1:], start=1):
        assert m["per_class_iou"][name] == (0.0 if label in present else None), name
    assert present and m["miou"] == pytest.approx(bg_iou / (1 + len(present)), abs=1e-6)
    assert m["boundary"]["recall"] == 0.0


def test_missing_or_wrong_size_predictions_fail_naming_the_image(voc_project, capsys):
    ds = voc_project.dataset
    ids = ds.ids("val")
    folder = _write_predictions(voc_project, lambda i: np.zeros_like(ds.load_mask(i)))
    (folder / f"{ids[2]}.png").unlink()
    assert voc_project.run("evaluate_seg") == 2
    assert re.search(rf"1 of 3 images .* no prediction in data/predict_seg/masks, e\.g\. {ids[2]}",
                     capsys.readouterr().err)
    h, w = ds.load_mask(ids[2]).shape
    save_mask_png(np.zeros((h + 1, w), np.uint8), folder / f"{ids[2]}.png", palette=False)
    assert voc_project.run("evaluate_seg") == 2
    assert f"prediction of {ids[2]} is {w}x{h + 1} but its ground truth is {w}x{h}" in capsys.readouterr().err
    assert not (voc_project.root / "data" / "metrics" / "eval_seg.json").exists()
