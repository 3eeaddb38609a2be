"""CAM inference maths on constructed maps, and the infer_cam stage (resume, batching, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from artifacts.cams import read_cam_file
from core.config import ExportMasksConfig, InferCamConfig
from method.mask_rule import argmax_mask, mask_scores
from tasks.infer_cam import InferCamError, infer_dataset, infer_images, resolve_activation, scaled_size, split_maps

CPU = torch.device("cpu")


class ColourMaps(nn.Module):
    """Raw maps that are affine functions of the pixel colour, at output stride 2.

    ``weight`` (K, 3) and ``bias`` (K,): map k = weight[k] . rgb + bias[k]. With ``ramp`` the
    first map also gets a ramp rising left to right across the map (not flip-equivariant).
    """

    def __init__(self, weight, bias=None, ramp: bool = False):
        super().__init__()
        w = torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("w", w[:, :, None, None])
        self.register_buffer("b", torch.zeros(len(w)) if bias is None else torch.as_tensor(bias, dtype=torch.float32))
        self.ramp = ramp
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += x.shape[0]
        x = F.avg_pool2d(x, 2, ceil_mode=True)
        out = F.conv2d(x, self.w, self.b)
        if self.ramp:
            r = torch.linspace(0, 1, out.shape[-1])
            out = out.clone()
            out[:, 0] += r
        return out


def _stripes(colours, h=32, width=24):
    """An image of vertical stripes, one per colour (RGB floats in [0, 1])."""
    img = np.zeros((h, width * len(colours), 3), np.float32)
    for i, c in enumerate(colours):
        img[:, i * width:(i + 1) * width] = c
    return (img * 255).round().astype(np.uint8)


def _centres(width, n, margin=6):
    return [slice(i * width + margin, (i + 1) * width - margin) for i in range(n)]


def test_known_argmax_absent_class_and_normalisation():
    # cam model, C = 3: map k = 5 * colour channel k
    img = _stripes([(1, 0, 0), (0, 1, 0), (0, 0, 0)])
    labels = np.array([1, 1, 0], np.float32)            # blue (class 2) is not in the image's labels
    cfg = InferCamConfig(scales=[0.5, 1.0, 1.5, 2.0], flip=True, precision="fp32")   # the authors' arithmetic
    rec = infer_images(ColourMaps(5 * np.eye(3)).eval(), "cam", [img], [labels], cfg, CPU)[0]
    assert rec.classes.tolist() == [0, 1] and rec.cams.shape == (2, 32, 72) and rec.bg is None
    assert rec.cams.max(axis=(1, 2)) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert rec.cams.min() >= 0
    mask = argmax_mask(*mask_scores(rec, "threshold", 0.2))
    red, green, black = _centres(24, 3)
    assert (mask[:, red] == 1).all() and (mask[:, green] == 2).all() and (mask[:, black] == 0).all()
    # scaling the raw maps does not change the normalised CAMs
    rec7 = infer_images(ColourMaps(35 * np.eye(3)).eval(), "cam", [img], [labels], cfg, CPU)[0]
    np.testing.assert_allclose(rec7.cams, rec.cams, atol=1e-4)


def test_flip_views_are_flipped_back():
    img = _stripes([(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    labels = np.array([1, 0, 0], np.float32)
    plain = InferCamConfig(scales=[1.0, 2.0], flip=False, precision="fp32")
    flip = InferCamConfig(scales=[1.0, 2.0], flip=True, precision="fp32")
    # a flip-equivariant model: adding the flipped-back mirror view changes nothing
    m = ColourMaps(4 * np.eye(3)).eval()
    a = infer_images(m, "cam", [img], [labels], plain, CPU)[0]
    b = infer_images(m, "cam", [img], [labels], flip, CPU)[0]
    np.testing.assert_allclose(a.cams, b.cams, atol=1e-5)
    # a model with a left-to-right ramp: the mirror view, flipped back, carries the opposite ramp,
    # so the sum is flat; without flipping back it would double the ramp
    ramp = ColourMaps(np.zeros((3, 3)), ramp=True).eval()
    blank = np.zeros((16, 40, 3), np.uint8)
    r1 = infer_images(ramp, "cam", [blank], [labels], plain, CPU)[0].cams[0]
    r2 = infer_images(ramp, "cam", [blank], [labels], flip, CPU)[0].cams[0]
    assert r1[:, -1].mean() > r1[:, 0].mean() + 0.5
    assert np.ptp(r2) < 1e-3


def _eps_model():
    # eps, C = 2 (+ background last): logits (6R, 6G, 6B + 1.5)
    return ColourMaps([[6, 0, 0], [0, 6, 0], [0, 0, 6]], bias=[0, 0, 1.5]).eval()


def test_threshold_versus_background_map():
    # A: red (both modes: class 0); B: p0 ~ 0.40, p_bg ~ 0.55 -> threshold says class 0, bgmap says background;
    # D: blue (both: background); E: p0 ~ 0.15, p1 ~ 0.80 (class 1 absent), p_bg ~ 0.05 ->
    # threshold says background (0.15 < 0.2), bgmap says class 0 (0.15 > 0.05)
    colours = [(1, 0, 0), (0.347, 0, 0.15), (0, 0, 1), (0.433, 0.712, 0)]
    img = _stripes(colours)
    labels = np.array([1, 0], np.float32)
    cfg = InferCamConfig(scales=[1.0, 2.0], flip=True)
    rec = infer_images(_eps_model(), "eps", [img], [labels], cfg, CPU)[0]
    assert rec.bg is not None and rec.classes.tolist() == [0]
    a, b, d, e = _centres(24, 4)
    # the stored background is the mean softmax probability of the background channel
    logits = np.array([6 * 0, 6 * 0, 6 * 1 + 1.5])
    assert rec.bg[:, d].mean() == pytest.approx(np.exp(logits[2]) / np.exp(logits).sum(), abs=2e-3)
    thr = argmax_mask(*mask_scores(rec, "threshold", 0.2))
    bgm = argmax_mask(*mask_scores(rec, "bgmap", 0.2))
    assert (thr[:, a] == 1).all() and (bgm[:, a] == 1).all()
    assert (thr[:, b] == 1).all() and (bgm[:, b] == 0).all()
    assert (thr[:, d] == 0).all() and (bgm[:, d] == 0).all()
    assert (thr[:, e] == 0).all() and (bgm[:, e] == 1).all()


def test_cam_models_have_no_background_map():
    img = _stripes([(1, 0, 0)])
    rec = infer_images(ColourMaps(np.eye(3)).eval(), "cam", [img], [np.array([1, 0, 0], np.float32)],
                       InferCamConfig(scales=[1.0]), CPU)[0]
    with pytest.raises(ValueError, match="bgmap needs the background map"):
        mask_scores(rec, "bgmap", 0.2)


def test_activation_choice_and_map_count_check():
    assert resolve_activation("auto", "eps") == "softmax" and resolve_activation("auto", "cam") == "relu"
    maps = torch.tensor([[-1.0, 2.0, 0.5]]).view(1, 3, 1, 1)
    fg, bg = split_maps(maps, "eps", "relu", 2)
    assert fg.flatten().tolist() == [0.0, 2.0] and bg.item() == pytest.approx(torch.softmax(maps, 1)[0, 2].item())
    with pytest.raises(InferCamError, match="returned 3 maps"):
        split_maps(maps, "cam", "relu", 2)


def test_scaled_size_caps_long_side():
    assert scaled_size(100, 50, 2.0, 4096) == (200, 100, False)
    assert scaled_size(100, 50, 2.0, 150) == (150, 75, True)
    assert scaled_size(3, 3, 0.1, 100)[:2] == (1, 1)


def test_batching_and_memory_bound_do_not_change_results():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (20, 28, 3), dtype=np.uint8) for _ in range(3)] + \
           [rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)]
    labs = [np.array([1, 0, 1], np.float32)] * 4
    m = ColourMaps(rng.normal(size=(4, 3)) * 3).eval()
    big = infer_images(m, "eps", imgs, labs, InferCamConfig(max_batch_pixels=10**8), CPU)
    small = [infer_images(m, "eps", [i], [lab], InferCamConfig(max_batch_pixels=1024), CPU)[0]
             for i, lab in zip(imgs, labs)]
    for x, y in zip(big, small):
        np.testing.assert_allclose(x.cams, y.cams, atol=1e-5)
        np.testing.assert_allclose(x.bg, y.bg, atol=1e-5)


class _Images:
    """The slice of dataio.dataset.SegDataset that inference reads."""

    def __init__(self, n=5):
        rng = np.random.default_rng(3)
        self.class_names = ["a", "b", "c"]
        self.num_classes = 3
        self._ids = [f"img{i}" for i in range(n)]
        self.images = {i: rng.integers(0, 256, (18, 22, 3), dtype=np.uint8) for i in self._ids}

    def ids(self, split):
        return list(self._ids) if split == "train" else []

    def load_image(self, i):
        return self.images[i]

    def labels(self, i):
        v = np.zeros(3, np.float32)
        v[int(i[-1]) % 3] = 1
        return v


META = {"method": "eps", "num_classes": 3, "class_names": ["a", "b", "c"], "sha256": "test"}


def test_stage_resumes_after_interruption(tmp_path):
    ds = _Images()
    cfg = InferCamConfig(scales=[1.0, 0.5], batch_images=2, loader_threads=1)
    model = ColourMaps(np.random.default_rng(0).normal(size=(4, 3))).eval()
    out = tmp_path / "cams"

    class Stop(Exception):
        pass

    def stop_after_first(n):
        raise Stop

    with pytest.raises(Stop):
        infer_dataset(cfg, ds, model, META, out, progress=False, device=CPU, on_chunk=stop_after_first)
    assert not out.exists()
    partial = tmp_path / ".cams.partial"
    assert sorted(p.stem for p in partial.glob("*.npz")) == ["img0", "img1"]
    seen_before = model.images_seen
    meta = infer_dataset(cfg, ds, model, META, out, progress=False, device=CPU)
    # only the 3 remaining images were inferred: 2 scales x 2 flips each
    assert model.images_seen - seen_before == 3 * 4
    assert not partial.exists() and meta["ids"] == ds._ids
    assert meta["timing"]["resumed_images"] == 2 and meta["has_bgmap"]
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == meta["fingerprint"]
    rec = read_cam_file(out / "img4.npz")
    assert rec.classes.tolist() == [1] and rec.cams.dtype == np.float32 and rec.bg.shape == (18, 22)
    # same result as an uninterrupted run
    fresh = infer_dataset(cfg, ds, model, META, tmp_path / "fresh", progress=False, device=CPU)
    assert fresh["fingerprint"] == meta["fingerprint"]
    for i in ds._ids:
        np.testing.assert_array_equal(read_cam_file(out / f"{i}.npz").cams, read_cam_file(tmp_path / "fresh" / f"{i}.npz").cams)
    # rerun with the same fingerprint: nothing to infer; a changed param starts over
    seen_before = model.images_seen
    infer_dataset(cfg, ds, model, META, out, progress=False, device=CPU)
    assert model.images_seen == seen_before
    infer_dataset(InferCamConfig(scales=[1.0], batch_images=2), ds, model, META, out, progress=False, device=CPU)
    assert model.images_seen - seen_before == 5 * 2


def test_stage_rejects_mismatched_classifier(tmp_path):
    ds = _Images()
    model = ColourMaps(np.eye(3)).eval()
    with pytest.raises(InferCamError, match="has 4 classes but the dataset has 3"):
        infer_dataset(InferCamConfig(), ds, model, {**META, "num_classes": 4}, tmp_path / "c", progress=False)
    with pytest.raises(InferCamError, match="differ from the dataset"):
        infer_dataset(InferCamConfig(), ds, model, {**META, "class_names": ["x", "y", "z"]}, tmp_path / "c",
                      progress=False)
    with pytest.raises(InferCamError, match="must return 4"):   # an eps model must give C+1 maps
        infer_dataset(InferCamConfig(), ds, model, META, tmp_path / "c", progress=False, device=CPU)


def test_run_with_a_saved_classifier(tmp_path, tiny_voc):
    """The stage entry point on a real VOC-layout folder and a classifier file."""
    pytest.importorskip("models.classifier")
    from dataio.manifest import write_manifest
    from dataio.voc import VOCDataset
    from models.classifier import build_classifier, save_classifier
    from tasks.export_masks import export
    from tasks.infer_cam import run

    ds = VOCDataset(tiny_voc)
    manifest = tmp_path / "dataset.json"
    write_manifest(ds, manifest)
    torch.manual_seed(0)
    model = build_classifier("eps", "efficientnet_lite0", ds.num_classes, output_stride=16, pretrained=False)
    ckpt = tmp_path / "classifier.pt"
    save_classifier(ckpt, model, {"method": "eps", "backbone": "efficientnet_lite0", "num_classes": ds.num_classes,
                                  "class_names": ds.class_names, "output_stride": 16})
    cfg = InferCamConfig(scales=[0.5, 1.0], threads=1, device="cpu")
    meta = run(cfg, manifest=manifest, checkpoint=ckpt, out_dir=tmp_path / "cams", progress=False)
    assert meta["ids"] == ds.ids("train") and len(meta["checkpoint_sha256"]) == 64
    attrs = export(ExportMasksConfig(workers=1, background="bgmap"), tmp_path / "cams", tmp_path / "pm.h5",
                   progress=False)
    assert attrs["method"] == "eps" and attrs["background"] == "bgmap"


def test_bf16_and_channels_last_keep_the_masks():
    # a real network (EfficientNet-Lite0 with its ImageNet weights, an untrained EPS head: near-flat maps, the
    # hard case) on 64-px images: channels-last only reorders memory (maps equal to float32 rounding);
    # bfloat16 moves the normalised maps by up to ~0.1 here and keeps ~97% of the mask pixels (constant
    # background 0.20, the authors' rule)
    from conftest import ColourBlocks

    from models.classifier import build_classifier

    torch.manual_seed(0)
    data = ColourBlocks(num_train=6, size=64, block=(20, 36))
    model = build_classifier("eps", "efficientnet_lite0", 3, output_stride=16).eval()
    imgs = [data.load_image(i) for i in data.ids("train")]
    labs = [data.labels(i) for i in data.ids("train")]
    export = ExportMasksConfig(background="threshold")

    def masks(**mode):
        recs = infer_images(model, "eps", imgs, labs, InferCamConfig(scales=[1.0, 1.5], **mode), CPU)
        return recs, [argmax_mask(*mask_scores(r, export.background, export.bg_threshold)) for r in recs]

    base, base_masks = masks()
    for mode, map_tol, agreement in (({"channels_last": True}, 1e-4, 1.0),
                                     ({"precision": "bf16"}, 0.15, 0.95),
                                     ({"precision": "bf16", "channels_last": True}, 0.15, 0.95)):
        recs, got = masks(**mode)
        for r, b in zip(recs, base):
            assert r.cams.dtype == np.float32 and np.abs(r.cams - b.cams).max() <= map_tol, (mode, np.abs(r.cams - b.cams).max())
        same = np.mean([np.mean(m == b) for m, b in zip(got, base_masks)])
        assert same >= agreement, (mode, same)
