"""The pseudo-mask HDF5 layout, its round trip, PNG export, and the export_masks stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from artifacts.cams import CamRecord, PseudoMaskError, write_cam_file
from artifacts.pseudo_masks import FORMAT, PngMasks, PseudoMasks, PseudoMaskWriter, export_png
from artifacts.pseudo_masks import main as pm_main
from core.config import ExportMasksConfig
from dataio.label_png import voc_palette
from tasks.export_masks import ExportMasksError, export

REPO = Path(__file__).resolve().parents[1]


def test_layout_readable_with_plain_h5py_and_round_trip(tmp_path):
    path = tmp_path / "pm.h5"
    rng = np.random.default_rng(0)
    masks = {"a": rng.integers(0, 3, (5, 7), dtype=np.uint8), "b": rng.integers(0, 3, (9, 4), dtype=np.uint8)}
    cams = {"a": rng.random((2, 5, 7)).astype(np.float32), "b": np.zeros((0, 9, 4), np.float32)}
    with PseudoMaskWriter(path, ["cat", "dog"], {"method": "eps", "scales": [0.5, 1.0], "bg_threshold": 0.2,
                                                 "checkpoint_sha256": "abc", "created": "now"}) as w:
        w.add("a", masks["a"], cams=cams["a"], classes=np.array([0, 1]), bg=rng.random((5, 7)))
        w.add("b", masks["b"], cams=cams["b"], classes=np.array([], int))
    with h5py.File(path, "r") as f:                       # the documented layout, no project code
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == 1 and f.attrs["num_classes"] == 2
        assert json.loads(f.attrs["scales"]) == [0.5, 1.0] and f.attrs["checkpoint_sha256"] == "abc"
        assert [s.decode() for s in f["class_names"][()]] == ["background", "cat", "dog"]
        assert [s.decode() for s in f["ids"][()]] == ["a", "b"]
        assert f["palette"].shape == (256, 3) and f["palette"].dtype == np.uint8
        ds = f["masks/a"]
        assert ds.dtype == np.uint8 and ds.compression == "gzip" and ds.chunks is not None
        np.testing.assert_array_equal(ds[()], masks["a"])
        assert f["cams/a"].dtype == np.float16 and f["cams/a"].attrs["classes"].tolist() == [0, 1]
        assert f["bg/a"].shape == (5, 7) and "b" not in f["bg"]
    with PseudoMasks(path) as pm:
        assert pm.ids == ["a", "b"] and len(pm) == 2 and "a" in pm and "zz" not in pm
        assert pm.attrs["scales"] == [0.5, 1.0] and pm.attrs["method"] == "eps"
        for i, m in pm:
            np.testing.assert_array_equal(m, masks[i])
        rec = pm.cams("a")
        np.testing.assert_allclose(rec.cams, cams["a"], atol=1e-3)
        assert rec.classes.tolist() == [0, 1] and rec.size == (5, 7) and rec.bg is not None
        assert pm.cams("b").cams.shape == (0, 9, 4)
        with pytest.raises(PseudoMaskError, match="no mask for image zz"):
            pm.mask("zz")


def test_writer_rejects_bad_ids_and_masks(tmp_path):
    with PseudoMaskWriter(tmp_path / "x.h5", ["c"], {}) as w:
        with pytest.raises(PseudoMaskError, match="cannot be an HDF5 name"):
            w.add("a/b", np.zeros((2, 2), np.uint8))
        with pytest.raises(PseudoMaskError, match="uint8"):
            w.add("a", np.zeros((2, 2), np.int64))
        w.add("a", np.zeros((2, 2), np.uint8))
        with pytest.raises(PseudoMaskError, match="written twice"):
            w.add("a", np.zeros((2, 2), np.uint8))
    with pytest.raises(PseudoMaskError, match="not found"):
        PseudoMasks(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(PseudoMaskError, match="not a readable HDF5"):
        PseudoMasks(tmp_path / "junk.h5")


def test_png_export_palette_and_grey(tmp_path, capsys):
    path = tmp_path / "pm.h5"
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    with PseudoMaskWriter(path, ["cat", "dog"], {}) as w:
        w.add("img1", mask)
    assert pm_main(["png", str(path), str(tmp_path / "png")]) == 0
    with Image.open(tmp_path / "png" / "img1.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), mask)
        assert np.array(im.getpalette()[:9]).reshape(3, 3).tolist() == voc_palette()[:3].tolist()
    export_png(path, tmp_path / "grey", palette=False)
    with Image.open(tmp_path / "grey" / "img1.png") as im:
        assert im.mode == "L"
    reader = PngMasks(tmp_path / "png")
    assert reader.ids == ["img1"]
    np.testing.assert_array_equal(reader.mask("img1"), mask)
    assert pm_main(["info", str(path)]) == 0
    assert '"images": 1' in capsys.readouterr().out


# --------------------------------------------------------------------------- export stage


def _cams_dir(tmp_path, method="eps", n=4, size=(12, 16)):
    d = tmp_path / "cams"
    d.mkdir()
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(n)]
    for i in ids:
        cams = rng.random((2, *size)).astype(np.float32)
        bg = rng.random(size).astype(np.float32) if method == "eps" else None
        write_cam_file(d / f"{i}.npz", CamRecord(cams, np.array([0, 2]), bg, size))
    (d / "meta.json").write_text(json.dumps({"ids": ids, "method": method, "has_bgmap": method == "eps",
                                             "class_names": ["a", "b", "c"], "scales": [1.0], "flip": True,
                                             "fingerprint": "f", "checkpoint_sha256": "s",
                                             "params": {"scales": [1.0]},
                                             "timing": {"images_per_s": 12.5}}))
    return d, ids


def test_export_masks_matches_argmax_and_workers_agree(tmp_path):
    cams, ids = _cams_dir(tmp_path)
    a = export(ExportMasksConfig(background="threshold", workers=1), cams, tmp_path / "one.h5", progress=False)
    export(ExportMasksConfig(background="threshold", workers=2), cams, tmp_path / "two.h5", progress=False)
    assert a["timing"]["images"] == len(ids)
    with PseudoMasks(tmp_path / "one.h5") as p1:
        assert "timing" not in p1.attrs and "created" not in p1.attrs   # nothing run-dependent in the file
    from artifacts.cams import read_cam_file
    with PseudoMasks(tmp_path / "one.h5") as p1, PseudoMasks(tmp_path / "two.h5") as p2:
        assert p1.ids == p2.ids == ids and p1.class_names == ["background", "a", "b", "c"]
        for i in ids:
            rec = read_cam_file(cams / f"{i}.npz")
            top = rec.cams.max(0)
            expected = np.where(top > 0.2, np.array([1, 3])[rec.cams.argmax(0)], 0)
            np.testing.assert_array_equal(p1.mask(i), expected)
            np.testing.assert_array_equal(p1.mask(i), p2.mask(i))
        assert p1.attrs["background"] == "threshold" and p1.attrs["crf"] == "none"
        assert p1.attrs["params"]["export_masks"]["bg_threshold"] == 0.2


@pytest.mark.parametrize("method", ["eps", "cam"])
def test_auto_background_uses_the_background_map_when_there_is_one(tmp_path, method):
    cams, ids = _cams_dir(tmp_path, method=method)
    expected_mode = "bgmap" if method == "eps" else "threshold"
    auto = export(ExportMasksConfig(background="auto", workers=1), cams, tmp_path / "auto.h5", progress=False)
    export(ExportMasksConfig(background=expected_mode, workers=1), cams, tmp_path / "explicit.h5", progress=False)
    assert auto["background"] == expected_mode
    with PseudoMasks(tmp_path / "auto.h5") as a, PseudoMasks(tmp_path / "explicit.h5") as b:
        for i in ids:
            np.testing.assert_array_equal(a.mask(i), b.mask(i))


def test_bgmap_needs_an_eps_model(tmp_path):
    cams, _ = _cams_dir(tmp_path, method="cam")
    with pytest.raises(ExportMasksError, match="cam model, which has no background map"):
        export(ExportMasksConfig(background="bgmap", workers=1), cams, tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_missing_cams_are_reported_before_work(tmp_path):
    cams, ids = _cams_dir(tmp_path)
    (cams / f"{ids[2]}.npz").unlink()
    with pytest.raises(ExportMasksError, match="1 CAM file"):
        export(ExportMasksConfig(background="auto", workers=1), cams, tmp_path / "x.h5", progress=False)
    with pytest.raises(ExportMasksError, match="run the infer_cam stage"):
        export(ExportMasksConfig(background="auto", workers=1), tmp_path / "nothing", tmp_path / "x.h5", progress=False)


def test_failed_export_keeps_the_previous_file(tmp_path):
    cams, _ = _cams_dir(tmp_path)
    out = tmp_path / "pm.h5"
    export(ExportMasksConfig(background="auto", workers=1), cams, out, progress=False)
    before = out.read_bytes()

    def boom(n):
        if n == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        export(ExportMasksConfig(background="auto", workers=1, bg_threshold=0.9), cams, out, progress=False, on_image=boom)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pm.h5")] == []


_KILL_SCRIPT = """
import sys, time
from core.config import ExportMasksConfig
from tasks.export_masks import export
def slow(n):
    if n == 1:
        print("writing", flush=True)
    time.sleep(0.5)
export(ExportMasksConfig(background="auto", workers=1), sys.argv[1], sys.argv[2], progress=False, on_image=slow)
"""


def test_killed_export_leaves_no_file_at_the_final_path(tmp_path):
    cams, _ = _cams_dir(tmp_path, n=20)
    out = tmp_path / "pm.h5"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(cams), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.3)
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".pm.h5.tmp")]
        assert temps, "the export writes to a temporary file first"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


class _RGB:
    """Images for the CRF (the part of SegDataset the export reads)."""

    def __init__(self, size):
        self.size = size

    def load_image(self, i):
        return np.full((*self.size, 3), 128, np.uint8)

    def image_size(self, i):
        return self.size


def test_export_with_crf_and_size_check(tmp_path):
    cams, ids = _cams_dir(tmp_path, n=2)
    attrs = export(ExportMasksConfig(background="auto", workers=2, crf=True, crf_preset="psa"), cams, tmp_path / "crf.h5",
                   dataset=_RGB((12, 16)), progress=False)
    assert attrs["crf"]["preset"] == "psa" and attrs["crf"]["bilateral_xy"] == 80.0
    with PseudoMasks(tmp_path / "crf.h5") as pm:
        assert set(np.unique(pm.mask(ids[0]))) <= {0, 1, 3}
    with pytest.raises(ExportMasksError, match="rerun infer_cam"):
        export(ExportMasksConfig(background="auto", workers=1, crf=True), cams, tmp_path / "bad.h5", dataset=_RGB((13, 16)),
               progress=False)


def test_saliency_background_by_hand():
    from method.mask_rule import (  # two present classes (0 and 2) on a 1x4 strip; saliency decides where the background ends
        argmax_mask,
        mask_scores,
    )
    cams = np.array([[[0.9, 0.9, 0.2, 0.1]], [[0.1, 0.3, 0.6, 0.05]]], np.float32)
    rec = CamRecord(cams, np.array([0, 2]), None, (1, 4))
    sal = np.array([[1.0, 0.05, 0.7, 0.9]], np.float32)   # bg scores 0, 0.95, 0.3, 0.1
    mask = argmax_mask(*mask_scores(rec, "saliency", 0.2, sal))
    assert mask.tolist() == [[1, 0, 3, 0]]                # pixel 3: max CAM 0.1 <= 1 - 0.9 = 0.1 (tie -> bg)
    with pytest.raises(PseudoMaskError, match="saliency map"):
        mask_scores(rec, "saliency", 0.2)
    with pytest.raises(PseudoMaskError, match="2x1"):
        mask_scores(rec, "saliency", 0.2, np.zeros((1, 2), np.float32))


def test_joint_background_by_hand():
    from method.mask_rule import argmax_mask, mask_scores
    # one present class (1) on a 1x4 strip: the saliency says 1, 1, 0.25, 0.64; the model's background map
    # 0.75, 0, 0, 0.36; joint foreground sqrt(s (1 - bg)) = 0.5, 1, 0.5, 0.64 -> background 0.5, 0, 0.5, 0.36
    cams = np.array([[[0.4, 0.2, 0.6, 0.5]]], np.float32)
    rec = CamRecord(cams, np.array([1]), np.array([[0.75, 0.0, 0.0, 0.36]], np.float32), (1, 4))
    sal = np.array([[1.0, 1.0, 0.25, 0.64]], np.float32)
    scores, values = mask_scores(rec, "joint", 0.2, sal)
    np.testing.assert_allclose(scores[0], [[0.5, 0.0, 0.5, 0.36]], atol=1e-6)
    # pixel 0: salient, but the model calls it background; pixel 2: barely salient, the model calls it foreground
    assert argmax_mask(scores, values).tolist() == [[0, 2, 2, 2]]
    assert argmax_mask(*mask_scores(rec, "saliency", 0.2, sal)).tolist() == [[2, 2, 0, 2]]
    with pytest.raises(PseudoMaskError, match="background map of an eps model"):
        mask_scores(CamRecord(cams, np.array([1]), None, (1, 4)), "joint", 0.2, sal)
    with pytest.raises(PseudoMaskError, match="saliency map"):
        mask_scores(rec, "joint", 0.2)


def test_saliency_floor_background_by_hand():
    from method.mask_rule import argmax_mask, mask_scores
    # one present class (1) on a 1x4 strip: saliency 1, 1, 0.9, 0.1 -> 1 - s = 0, 0, 0.1, 0.9; floored at
    # 0.2 -> 0.2, 0.2, 0.2, 0.9. The class's normalised CAM 0.15, 0.6, 0.3, 0.95: pixel 0 is salient but
    # its class map is weak (a detector's false positive) and stays background; plain saliency gives it away
    cams = np.array([[[0.15, 0.6, 0.3, 0.95]]], np.float32)
    rec = CamRecord(cams, np.array([1]), None, (1, 4))
    sal = np.array([[1.0, 1.0, 0.9, 0.1]], np.float32)
    scores, values = mask_scores(rec, "saliency_floor", 0.2, sal)
    np.testing.assert_allclose(scores[0], [[0.2, 0.2, 0.2, 0.9]], atol=1e-6)
    assert argmax_mask(scores, values).tolist() == [[0, 2, 2, 2]]
    assert argmax_mask(*mask_scores(rec, "saliency", 0.2, sal)).tolist() == [[2, 2, 2, 2]]
    assert argmax_mask(*mask_scores(rec, "saliency_floor", 0.0, sal)).tolist() == [[2, 2, 2, 2]]   # floor 0 = saliency
    with pytest.raises(PseudoMaskError, match="saliency map"):
        mask_scores(rec, "saliency_floor", 0.2)


def test_export_with_saliency_background(tmp_path):
    from artifacts.cams import read_cam_file
    from artifacts.saliency_maps import load_saliency, write_map_atomic
    cams, ids = _cams_dir(tmp_path, method="cam")
    sal_dir = tmp_path / "saliency"
    rng = np.random.default_rng(1)
    for i in ids[:-1]:
        write_map_atomic(sal_dir / f"{i}.png", rng.integers(0, 256, (12, 16), dtype=np.uint8))
    cfg = ExportMasksConfig(background="saliency", workers=2)
    with pytest.raises(ExportMasksError, match=f"1 image\\(s\\) have no saliency map.*{ids[-1]}"):
        export(cfg, cams, tmp_path / "x.h5", saliency_dir=sal_dir, progress=False)
    assert not (tmp_path / "x.h5").exists()
    write_map_atomic(sal_dir / f"{ids[-1]}.png", np.full((12, 16), 128, np.uint8))
    attrs = export(cfg, cams, tmp_path / "x.h5", saliency_dir=sal_dir, progress=False)
    assert attrs["background"] == "saliency"
    with pytest.raises(ExportMasksError, match="is joint but the CAMs .* no background map; use background: saliency"):
        export(ExportMasksConfig(background="joint", workers=1), cams, tmp_path / "j.h5", saliency_dir=sal_dir,
               progress=False)
    assert not (tmp_path / "j.h5").exists()
    with PseudoMasks(tmp_path / "x.h5") as pm:
        for i in ids:
            rec = read_cam_file(cams / f"{i}.npz")
            bg = 1 - load_saliency(sal_dir, i, (12, 16))
            expected = np.where(rec.cams.max(0) > bg, np.array([1, 3])[rec.cams.argmax(0)], 0)
            np.testing.assert_array_equal(pm.mask(i), expected)
