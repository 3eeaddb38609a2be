"""rescue_saliency: which classes count as missed (hand-made maps), what the crop changes, and the stage's
outputs, errors, kill and resume on a tiny VOC dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from artifacts.cams import CamRecord, write_cam_file
from artifacts.saliency_maps import read_map_u8, saliency_path, write_map_atomic
from core.config import RescueSaliencyConfig, SaliencyConfig
from tasks import rescue_saliency as rs


def _record(h=20, w=20) -> CamRecord:
    """Class 0 confident on rows 2-5 x cols 2-9, class 2 on rows 10-13 x cols 12-17 (normalised CAMs)."""
    cams = np.full((2, h, w), 0.2, np.float32)
    cams[0, 2:6, 2:10] = 1.0
    cams[1, 10:14, 12:18] = 0.9
    return CamRecord(cams, np.array([0, 2]), None, (h, w))


def test_a_class_whose_confident_region_is_not_salient_is_missed_with_its_widened_box():
    sal = np.zeros((20, 20), np.uint8)
    sal[2:6, 2:10] = 255          # class 0's region salient
    sal[10, 12:18] = 200          # 6 of class 2's 24 pixels salient: 0.25
    (missed,) = rs.missed_boxes(_record(), sal, overlap=0.25, margin=0.5)
    assert (missed.index, missed.cls, missed.share) == (1, 2, 0.25)
    # rows 10..13 (4) widened by 2 each side, cols 12..17 (6) by 3, clipped at the image's edge (20)
    assert missed.box == (8, 16, 9, 20)
    assert rs.missed_boxes(_record(), sal, overlap=0.2, margin=0.5) == []   # 0.25 > 0.2: found


def test_a_map_at_or_below_the_salient_level_counts_as_not_salient():
    sal = np.full((20, 20), 127, np.uint8)    # 127 / 255 < 0.5
    assert [m.cls for m in rs.missed_boxes(_record(), sal, overlap=0.0, margin=0.0)] == [0, 2]
    sal[:] = 128                                # 128 / 255 > 0.5
    assert rs.missed_boxes(_record(), sal, overlap=0.0, margin=0.0) == []


def test_the_crop_map_is_kept_where_higher_and_nothing_changes_outside_the_boxes():
    rgb = np.zeros((20, 20, 3), np.uint8)
    sal = np.full((20, 20), 50, np.uint8)
    sal[9, 13] = 240
    boxes = rs.missed_boxes(_record(), sal, overlap=0.1, margin=0.0)
    seen = []

    def detector(crop):
        seen.append(crop.shape)
        return np.full(crop.shape[:2], 100, np.uint8)

    out = rs.rescued_map(rgb, sal, boxes, detector)
    assert seen == [(4, 8, 3), (4, 6, 3)]
    expect = sal.copy()
    expect[2:6, 2:10] = 100
    expect[10:14, 12:18] = 100
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(rs.rescued_map(rgb, sal, boxes[::-1], detector), out)
    with pytest.raises(rs.RescueError, match="expected uint8 of the crop's size"):
        rs.rescued_map(rgb, sal, boxes, lambda crop: np.zeros((3, 3), np.uint8))


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def inputs(voc_project, tmp_path):
    """CAMs and saliency maps for the tiny dataset's train images: the first image's class is salient,
    the others' classes are missed; val images have maps but no CAMs."""
    ds = voc_project.dataset
    cams_dir, sal_dir = tmp_path / "cams", tmp_path / "saliency"
    train = ds.ids("train")
    cams_dir.mkdir()
    for k, image_id in enumerate(train):
        h, w = ds.load_image(image_id).shape[:2]
        cams = np.zeros((1, h, w), np.float32)
        cams[0, 4:12, 6:18] = 1.0
        write_cam_file(rs.cam_path(cams_dir, image_id), CamRecord(cams, np.array([0]), None, (h, w)))
        sal = np.zeros((h, w), np.uint8)
        if k == 0:
            sal[4:12, 6:18] = 255
        write_map_atomic(saliency_path(sal_dir, image_id), sal)
    for image_id in ds.ids("val"):
        write_map_atomic(saliency_path(sal_dir, image_id), np.full(ds.load_image(image_id).shape[:2], 9, np.uint8))
    (cams_dir / "meta.json").write_text(json.dumps({"ids": train, "class_names": list(ds.class_names),
                                                    "fingerprint": "test"}))
    return ds, cams_dir, sal_dir, tmp_path / "rescued", tmp_path / "rescue.json"


def _run(inputs, **cfg):
    ds, cams_dir, sal_dir, out, metrics = inputs
    return rs.run(RescueSaliencyConfig(workers=1, **cfg), SaliencyConfig(backend="spectral_residual"), ds,
                  cams_dir=cams_dir, saliency_dir=sal_dir, out_dir=out, metrics_path=metrics, progress=False,
                  print_fn=lambda *_: None)


def test_the_stage_writes_every_map_rescuing_only_the_missed_classes(inputs):
    ds, _, sal_dir, out, metrics_path = inputs
    metrics = _run(inputs)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i}.png" for i in ds.ids("train") + ds.ids("val"))
    first, second = ds.ids("train")
    for image_id in (first, *ds.ids("val")):     # nothing to rescue: the same bytes
        assert saliency_path(out, image_id).read_bytes() == saliency_path(sal_dir, image_id).read_bytes()
    rescued = read_map_u8(saliency_path(out, second))
    # B (rows 4-11, cols 6-17) widened by 0.3 of its size per side: rows 2-13, cols 2-21; nothing outside
    outside = np.ones_like(rescued, bool)
    outside[2:14, 2:22] = False
    assert rescued[2:14, 2:22].any() and not rescued[outside].any()
    assert metrics == json.loads(metrics_path.read_text())
    assert (metrics["present_classes"], metrics["missed_classes"], metrics["rescued_images"]) == (2, 1, 1)
    assert metrics["missed_region_salient_before"] == 0.0
    assert metrics["per_class"] == {ds.class_names[0]: {"present": 2, "missed": 1}}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _run(inputs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # same inputs, same bytes


@pytest.mark.parametrize("sides, backend, expected", [
    ([40, 68, 100], "u2netp", 320),     # median 68: 4 x 68 = 272 -> 256 (multiple of 32) -> at least 320
    ([90, 100, 110], "u2netp", 384),    # median 100: 400 -> 384
    ([200, 250, 300], "u2netp", 512),   # median 250: 1000 -> 992 -> U2-Net-p's 512 at most
    ([200, 250, 300], "isnet", 992),    # IS-Net: up to 1024
    ([], "u2netp", 512),                # nothing missed: the images' rule (long side 128 -> 512)
])
def test_auto_runs_the_crops_at_the_saliency_rule_for_their_median_long_side(sides, backend, expected):
    assert rs.crop_input_size(RescueSaliencyConfig(), backend, sides, 128.0) == expected
    assert rs.crop_input_size(RescueSaliencyConfig(input_size=416), backend, sides, 128.0) == 416


def test_the_stage_builds_the_detector_at_the_crops_size_and_reports_it(inputs, monkeypatch):
    import tasks.saliency

    real, seen = tasks.saliency.resolve_backend, []

    def spy(cfg, **kwargs):
        seen.append(cfg.input_size)
        return real(cfg, **kwargs)

    monkeypatch.setattr(tasks.saliency, "resolve_backend", spy)
    metrics = _run(inputs)      # one missed crop: B's 8 x 12 box widened to 12 x 20 -> 4 x 20 = 80 -> 320
    assert seen == [320] and (metrics["input_size"], metrics["median_crop_side"]) == (320, 20.0)
    ds, cams_dir, sal_dir, _, _ = inputs
    metrics = rs.run(RescueSaliencyConfig(workers=1, input_size=448), SaliencyConfig(backend="spectral_residual"),
                     ds, cams_dir=cams_dir, saliency_dir=sal_dir, out_dir=cams_dir.parent / "rescued_448",
                     metrics_path=None, progress=False, print_fn=lambda *_: None)
    assert seen == [320, 448] and metrics["input_size"] == 448 and "median_crop_side" not in metrics


def test_with_the_rescue_off_every_map_is_copied_and_the_misses_still_counted(inputs):
    ds, _, sal_dir, out, _ = inputs
    metrics = _run(inputs, enabled=False)
    for p in sal_dir.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert (metrics["missed_classes"], metrics["rescued_images"], metrics["enabled"]) == (1, 0, False)


def test_precomputed_maps_have_no_detector_to_rescue_with(inputs):
    ds, cams_dir, sal_dir, out, _ = inputs
    with pytest.raises(rs.RescueError, match="rescue_saliency.enabled.*precomputed"):
        rs.run(RescueSaliencyConfig(), SaliencyConfig(backend="precomputed", precomputed_dir=str(sal_dir)), ds,
               cams_dir=cams_dir, saliency_dir=sal_dir, out_dir=out, metrics_path=None, progress=False)
    assert not out.exists()


def test_a_train_image_without_a_saliency_map_is_named_before_any_work(inputs):
    ds, _, sal_dir, out, _ = inputs
    gone = saliency_path(sal_dir, ds.ids("train")[1])
    gone.unlink()
    with pytest.raises(rs.RescueError, match=f"{gone.name}.*saliency.splits"):
        _run(inputs)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_a_killed_run_leaves_no_output_and_the_next_run_resumes(inputs, monkeypatch):
    ds, _, _, out, _ = inputs
    real = rs.rescued_map

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rs, "rescued_map", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and saliency_path(partial, ds.ids("train")[0]).is_file()
    monkeypatch.setattr(rs, "rescued_map", real)
    lines = []
    _, cams_dir, sal_dir, _, metrics = inputs
    rs.run(RescueSaliencyConfig(workers=1), SaliencyConfig(backend="spectral_residual"), ds, cams_dir=cams_dir,
           saliency_dir=sal_dir, out_dir=out, metrics_path=metrics, progress=False, print_fn=lines.append)
    assert any("resuming" in line for line in lines)
    assert "1 kept from an interrupted run" in lines[-1] and not partial.exists()
