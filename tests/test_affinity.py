"""AffinityNet (psa) and the random-walk refinement: the pair neighbourhood, pair labels and loss against
hand computations, sure regions, the windowed random walk against psa's dense matrix, train_affinity
(learning, kill and resume, bad inputs) and refine_masks (sizes, ids, labels, provenance)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ColourBlocks, write_voc_dataset

from artifacts.pseudo_masks import PseudoMasks, PseudoMaskWriter
from core.config import RefineMasksConfig, TrainAffinityConfig, build
from dataio.voc import VOCDataset
from method.mask_rule import sure_labels
from models.affinity import (
    AffinityNet,
    _shifted,
    affinity_labels,
    affinity_loss,
    load_affinity_net,
    pair_affinities,
    pair_offsets,
    random_walk,
    transition_weights,
)
from models.backbones import build_backbone
from tasks import refine_masks, train_affinity
from tasks.refine_masks import RefineMasksError
from tasks.train_affinity import TrainAffinityError, grid_labels

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "boat")


# --------------------------------------------------------------------------- the pieces, by hand


def test_pair_offsets_are_psas_half_disc():
    assert pair_offsets(3) == [(0, 1), (0, 2), (1, -2), (1, -1), (1, 0), (1, 1), (1, 2),
                               (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]
    offsets = pair_offsets(5)
    assert len(offsets) == 34 and len(set(offsets)) == 34           # psa's 34 partners at radius 5
    assert all(dx * dx + dy * dy < 25 and (dy > 0 or (dy == 0 and dx > 0)) for dy, dx in offsets)
    with pytest.raises(ValueError, match="at least 2"):
        pair_offsets(1)


def test_affinity_labels_on_a_constructed_grid():
    # one row: background, background, class 1, unsure, class 2
    labels = torch.tensor([[[0, 0, 1, 255, 2]]])
    bg, fg, neg = affinity_labels(labels, [(0, 1), (0, 2)])
    assert bg.shape == (1, 2, 1, 5)
    # offset (0, 1): pairs (0,1) bg+, (1,2) neg, (2,3) unsure, (3,4) unsure, (4,-) outside
    assert bg[0, 0, 0].tolist() == [True, False, False, False, False]
    assert neg[0, 0, 0].tolist() == [False, True, False, False, False]
    assert not fg[0, 0].any()
    # offset (0, 2): pairs (0,2) neg, (1,3) unsure, (2,4) neg (class 1 vs class 2)
    assert neg[0, 1, 0].tolist() == [True, False, True, False, False]
    assert not bg[0, 1].any() and not fg[0, 1].any()
    same = torch.tensor([[[3, 3], [3, 0]]])
    bg, fg, neg = affinity_labels(same, [(0, 1), (1, 0)])
    assert fg[0, 0].tolist() == [[True, False], [False, False]]      # (0,0)-(0,1) same class
    assert fg[0, 1].tolist() == [[True, False], [False, False]]      # (0,0)-(1,0)
    assert neg[0, 0, 1, 0] and neg[0, 1, 0, 1]                        # 3 next to 0, both directions
    assert not bg.any()


def test_pair_affinities_are_exp_of_minus_the_mean_absolute_difference():
    f = torch.zeros(1, 2, 2, 3)
    f[0, :, :, 1] = torch.tensor([1.0, 3.0])[:, None]               # column 1 differs by 1 and 3: mean 2
    aff = pair_affinities(f, [(0, 1), (1, 0)])
    assert torch.allclose(aff[0, 0, :, 0], torch.full((2,), math.exp(-2)))
    assert torch.allclose(aff[0, 0, :, 1], torch.full((2,), math.exp(-2)))
    assert torch.all(aff[0, 0, :, 2] == 0)                           # partner outside the grid
    assert torch.allclose(aff[0, 1, 0], torch.ones(3)) and torch.all(aff[0, 1, 1] == 0)


def test_pair_affinity_gradient_equals_autograd_of_the_formula():
    """The hand-written backward pass (it recomputes the sign to save memory) gives autograd's gradient."""
    torch.manual_seed(0)
    f = torch.randn(2, 3, 5, 6, dtype=torch.double, requires_grad=True)
    offsets = pair_offsets(3)
    assert torch.autograd.gradcheck(lambda x: pair_affinities(x, offsets), (f,))
    plain = torch.stack([torch.exp(-(f - _shifted(f, dy, dx)).abs().mean(1)) * _shifted(torch.ones(5, 6), dy, dx)
                         for dy, dx in offsets], 1)
    weights = torch.rand_like(plain)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), f)
    (g_ours,) = torch.autograd.grad((pair_affinities(f, offsets) * weights).sum(), f)
    assert torch.allclose(g_ours, g_plain)


def test_affinity_loss_is_psas_balanced_sum():
    aff = torch.tensor([[[[0.9, 0.5]], [[0.2, 0.6]]]])              # (1, K=2, 1, 2)
    bg = torch.tensor([[[[True, False]], [[False, False]]]])
    fg = torch.tensor([[[[False, True]], [[False, True]]]])
    neg = torch.tensor([[[[False, False]], [[True, False]]]])
    loss, parts = affinity_loss(aff, bg, fg, neg, eps=0.0)
    expected_bg = -math.log(0.9)
    expected_fg = (-math.log(0.5) - math.log(0.6)) / 2
    expected_neg = -math.log(1 - 0.2)
    assert parts["bg_pos"] == pytest.approx(expected_bg) and parts["fg_pos"] == pytest.approx(expected_fg)
    assert parts["neg"] == pytest.approx(expected_neg)
    assert loss.item() == pytest.approx(expected_bg / 4 + expected_fg / 4 + expected_neg / 2)
    empty = torch.zeros_like(bg)
    loss, _ = affinity_loss(aff, empty, empty, empty)
    assert loss.item() == 0.0                                          # no sure pair: no loss, no NaN


def test_sure_labels_follow_irns_thresholds_around_the_constant_background():
    cams = np.array([[[0.25, 0.35, 0.04, 0.10, 0.31]]], np.float32)
    scores = np.concatenate([np.full_like(cams, 0.20), cams])
    labels = sure_labels(scores, np.array([0, 3]), fg_margin=0.10, bg_margin=0.15)
    # 0.25: beats 0.20 but not 0.30 -> unsure; 0.35 and 0.31 > 0.30 -> class 3; 0.04 <= 0.05 -> background
    assert labels.tolist() == [[255, 3, 0, 255, 3]]
    two = np.array([[[0.1]], [[0.5]], [[0.6]]], np.float32)             # bg, class 0, class 4
    assert sure_labels(two, np.array([0, 1, 5]), 0.1, 0.15).tolist() == [[5]]


def test_grid_labels_read_the_centre_of_each_cell_and_ignore_cells_past_the_edge():
    labels = np.arange(36, dtype=np.uint8).reshape(6, 6)
    grid = grid_labels(labels, 4)
    assert grid.tolist() == [[labels[2, 2], 255], [255, 255]]
    assert grid_labels(np.zeros((8, 12), np.uint8), 4).shape == (2, 3)


def _dense_transition(aff: torch.Tensor, offsets, beta: float) -> torch.Tensor:
    """psa's infer_aff: the dense (N, N) matrix with a^beta both ways and 1 on the diagonal, divided by
    its column sums."""
    k, h, w = aff.shape
    n = h * w
    a = torch.eye(n, dtype=torch.float64)
    for idx, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                if 0 <= ty < h and 0 <= tx < w:
                    v = float(aff[idx, y, x]) ** beta
                    a[y * w + x, ty * w + tx] += v
                    a[ty * w + tx, y * w + x] += v
    return a / a.sum(0, keepdim=True)


def test_the_windowed_random_walk_equals_psas_dense_matrix_power():
    gen = torch.Generator().manual_seed(0)
    offsets = pair_offsets(3)
    h, w = 4, 5
    aff = torch.rand(len(offsets), h, w, generator=gen, dtype=torch.float64)
    aff = aff * torch.stack([pair_affinities(torch.zeros(1, 1, h, w), [o])[0, 0] for o in offsets]).double()
    scores = torch.rand(3, h, w, generator=gen, dtype=torch.float64)
    trans = _dense_transition(aff, offsets, beta=2.0)
    logt = 2
    dense = trans
    for _ in range(logt):                                               # psa: trans_mat squared logt times
        dense = dense @ dense
    expected = (scores.reshape(3, -1) @ dense).reshape(3, h, w)
    walked = random_walk(scores, aff, offsets, beta=2.0, steps=2 ** logt)
    torch.testing.assert_close(walked, expected)
    weights = transition_weights(aff, offsets, 2.0)
    torch.testing.assert_close(weights.sum(0), torch.ones(h, w, dtype=torch.float64))   # rows sum to 1
    assert torch.equal(random_walk(scores, aff, offsets, 2.0, 0), scores)


def test_affinity_net_fuses_the_levels_at_its_stride_as_psa():
    net = AffinityNet(build_backbone("efficientnet_lite0", 16, pretrained=False), feature_stride=4).eval()
    out = net(torch.rand(1, 3, 50, 37))
    assert out.shape == (1, net.out_channels, 13, 10)                 # ceil(50/4), ceil(37/4)
    assert [c.out_channels for c in net.reduce] == [64, 128, 256]      # psa's widths on three levels
    with torch.no_grad():
        backbone = build_backbone("resnet50", 16, pretrained=False).eval()
        x = torch.rand(1, 3, 40, 40)
        assert torch.equal(backbone(x), backbone.levels(x)[-1][1])    # levels() is forward() kept open


# --------------------------------------------------------------------------- the stages


def _dataset(root: Path, n_train: int = 8) -> VOCDataset:
    write_voc_dataset(root, n_train=n_train, n_val=2, size=(32, 32), class_names=CLASSES)
    return VOCDataset(root, labels=root / "cls_labels.npy")


def _write_cams(path: Path, reader: VOCDataset, ids=None, background="threshold", size=None) -> Path:
    """A pseudo-mask file whose CAMs are the ground-truth boxes of each present class, softened."""
    attrs = {"method": "eps", "background": background, "bg_threshold": 0.2}
    with PseudoMaskWriter(path, list(reader.class_names), attrs) as w:
        for image_id in ids if ids is not None else reader.ids("train"):
            gt = reader.load_mask(image_id)
            gt = np.where(gt == 255, 0, gt)
            classes = np.array(sorted(set(np.unique(gt).tolist()) - {0}), np.int64) - 1
            cams = np.stack([np.where(gt == c + 1, 1.0, 0.1) for c in classes]).astype(np.float32)
            if size is not None:
                cams = cams[:, :size[0], :size[1]]
            w.add(image_id, np.zeros(cams.shape[1:], np.uint8), cams=cams, classes=classes)
    return path


def tiny_affinity_cfg(**over) -> TrainAffinityConfig:
    base = dict(backbone="efficientnet_lite0", pretrained=False, iterations=4, batch_size=4, crop_size=32,
                scale_range=[1.0, 1.25], lr=1e-3, checkpoint_every=2, log_every=1, threads=1, workers=0,
                device="cpu", radius=3)
    base.update(over)
    return build(TrainAffinityConfig, base, "train_affinity")


def _train(tmp_path, name, cfg, reader, h5, **kw):
    return train_affinity.run(cfg, seed=1, reader=reader, masks_path=h5, saliency_dir=None,
                              out_dir=tmp_path / name, state_dir=tmp_path / f"{name}_state",
                              manifest=tmp_path / "none.json", progress=False, **kw)


def test_train_affinity_learns_to_separate_objects_from_the_background(tmp_path):
    reader = ColourBlocks(num_train=16, num_val=2, size=32)           # squares the network can see
    h5 = _write_cams(tmp_path / "pm.h5", reader)
    summary = _train(tmp_path, "a", tiny_affinity_cfg(pretrained=True, iterations=40, lr=0.01, log_every=5,
                                                      checkpoint_every=100), reader, h5)
    rows = (tmp_path / "a" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    losses = [float(r.split("\t")[1]) for r in rows[1:]]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    assert summary["train/loss"] == pytest.approx(losses[-1])
    model, meta = load_affinity_net(tmp_path / "a" / "affinity.pt")
    assert meta["feature_stride"] == 4 and meta["radius"] == 3 and meta["class_names"] == reader.class_names
    offsets = pair_offsets(3)
    same, cross = [], []
    with torch.no_grad():
        for image_id in reader.ids("train"):
            x = torch.from_numpy(reader.load_image(image_id)).permute(2, 0, 1)[None].float() / 255
            model.eval()
            aff = pair_affinities(model(x), offsets)
            gt = reader.load_mask(image_id)
            bg, fg, neg = affinity_labels(torch.from_numpy(grid_labels(gt, 4).astype(np.int64))[None], offsets)
            same.append(aff[bg | fg])
            cross.append(aff[neg])
    assert torch.cat(same).mean() > torch.cat(cross).mean() + 0.1


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_affinity import tiny_affinity_cfg
from dataio.voc import VOCDataset
from tasks.train_affinity import run
root = Path({root!r})
reader = VOCDataset(root, labels=root / "cls_labels.npy")
def on_iteration(i):
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
run(tiny_affinity_cfg(iterations=6, workers=1), seed=3, reader=reader, masks_path={h5!r}, saliency_dir=None,
    out_dir={out!r}, state_dir={state!r}, manifest=root / "none.json", progress=False, on_iteration=on_iteration)
"""


def test_train_affinity_resumes_after_a_kill_with_identical_weights(tmp_path):
    reader = _dataset(tmp_path / "voc")
    h5 = _write_cams(tmp_path / "pm.h5", reader)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def script(name, kill_at, out, state):
        path = tmp_path / name
        path.write_text(_KILL_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path / "voc"), h5=str(h5),
                                            kill_at=kill_at, out=str(out), state=str(state)))
        return subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    train_affinity.run(tiny_affinity_cfg(iterations=6, workers=1), seed=3, reader=reader, masks_path=h5,
                       saliency_dir=None, out_dir=tmp_path / "ref", state_dir=tmp_path / "ref_state",
                       manifest=tmp_path / "voc" / "none.json", progress=False)
    killed = script("kill.py", 5, tmp_path / "run", tmp_path / "state")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "affinity.pt").exists()
    resumed = script("resume.py", -1, tmp_path / "run", tmp_path / "state")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "iteration 4/6" in resumed.stderr
    a = torch.load(tmp_path / "ref" / "affinity.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "affinity.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_affinity_bad_inputs_fail_before_training_naming_the_problem(tmp_path):
    reader = _dataset(tmp_path / "voc")
    ids = reader.ids("train")
    with pytest.raises(TrainAffinityError, match=f"partial.h5.*'{ids[0]}'"):
        _train(tmp_path, "a", tiny_affinity_cfg(), reader, _write_cams(tmp_path / "partial.h5", reader, ids[1:]))
    with PseudoMaskWriter(tmp_path / "nocams.h5", list(CLASSES), {"background": "threshold"}) as w:
        for i in ids:
            w.add(i, np.zeros((32, 32), np.uint8))
    with pytest.raises(TrainAffinityError, match="nocams.h5 holds no CAMs.*store_cams"):
        _train(tmp_path, "b", tiny_affinity_cfg(), reader, tmp_path / "nocams.h5")
    with pytest.raises(TrainAffinityError, match="saliency"):
        _train(tmp_path, "c", tiny_affinity_cfg(), reader,
               _write_cams(tmp_path / "sal.h5", reader, background="saliency"))
    with pytest.raises(TrainAffinityError, match="train_affinity.batch_size"):
        _train(tmp_path, "d", tiny_affinity_cfg(batch_size=64), reader, _write_cams(tmp_path / "pm.h5", reader))
    with pytest.raises(ValueError, match="'train_affinity.radus'"):
        tiny_affinity_cfg(radus=4)
    with pytest.raises(ValueError, match="'train_affinity.feature_stride' = 2 is not one of 4, 8"):
        tiny_affinity_cfg(feature_stride=2)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_refine_masks_keep_sizes_ids_and_present_classes_and_record_provenance(tmp_path):
    reader = _dataset(tmp_path / "voc")
    h5 = _write_cams(tmp_path / "pm.h5", reader)
    _train(tmp_path, "a", tiny_affinity_cfg(iterations=2), reader, h5)
    model = tmp_path / "a" / "affinity.pt"
    for background in ("export", "psa"):
        cfg = build(RefineMasksConfig, {"background": background, "logt": 3, "threads": 1}, "refine_masks")
        out = tmp_path / f"refined_{background}.h5"
        attrs = refine_masks.refine(cfg, model, h5, out, dataset=reader, progress=False)
        assert attrs["timing"]["images"] == len(reader.ids("train"))
        with PseudoMasks(out) as refined, PseudoMasks(h5) as source:
            assert refined.ids == source.ids and refined.class_names == source.class_names
            assert refined.attrs["refinement"]["refine_masks"]["background"] == background
            assert refined.attrs["background"] == "threshold" and "timing" not in refined.attrs
            for image_id in refined.ids:
                mask = refined.mask(image_id)
                assert mask.shape == reader.load_image(image_id).shape[:2]
                allowed = {0} | {int(c) + 1 for c in source.cams(image_id).classes}
                assert set(np.unique(mask).tolist()) <= allowed
    # the same inputs give the same bytes (a cached output depends on its inputs only)
    again = tmp_path / "again.h5"
    cfg = build(RefineMasksConfig, {"background": "psa", "logt": 3, "threads": 1}, "refine_masks")
    refine_masks.refine(cfg, model, h5, again, dataset=reader, progress=False)
    assert again.read_bytes() == (tmp_path / "refined_psa.h5").read_bytes()


def test_refine_masks_errors_name_the_file_and_leave_nothing(tmp_path):
    reader = _dataset(tmp_path / "voc")
    h5 = _write_cams(tmp_path / "pm.h5", reader)
    cfg = build(RefineMasksConfig, {"threads": 1}, "refine_masks")
    out = tmp_path / "refined.h5"
    with pytest.raises(RefineMasksError, match="missing.pt"):
        refine_masks.refine(cfg, tmp_path / "missing.pt", h5, out, dataset=reader, progress=False)
    _train(tmp_path, "a", tiny_affinity_cfg(iterations=1), reader, h5)
    small = _write_cams(tmp_path / "small.h5", reader, size=(16, 16))
    with pytest.raises(RefineMasksError, match="CAMs in .*small.h5"):
        refine_masks.refine(cfg, tmp_path / "a" / "affinity.pt", small, out, dataset=reader, progress=False)

    def interrupt(n):
        if n == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        refine_masks.refine(cfg, tmp_path / "a" / "affinity.pt", h5, out, dataset=reader, progress=False,
                            on_image=interrupt)
    assert not out.exists() and not list(tmp_path.glob(".refined.h5*"))
