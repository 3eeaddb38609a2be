"""EPS losses: eq. 1-4 computed by hand on small tensors, and the three map selection strategies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.losses import (
    classification_loss,
    estimated_saliency,
    image_logits,
    overlap_ratio,
    resize_saliency,
    saliency_loss,
    salient_share,
    select_maps,
)


def _by_hand(maps: np.ndarray, sal: np.ndarray, y: np.ndarray, tau: float, lam: float):
    """Eq. 1-3 with plain python loops over pixels, for one image. maps (C+1, h, w)."""
    k, h, w = maps.shape
    c = k - 1
    probs = np.zeros_like(maps)
    for i in range(h):
        for j in range(w):
            e = [math.exp(maps[m, i, j]) for m in range(k)]
            for m in range(k):
                probs[m, i, j] = e[m] / sum(e)
    fg = np.zeros((h, w))
    bg = probs[c].copy()
    chosen = []
    for m in range(c):
        b_i = probs[m] > 0.5
        b_s = sal > 0.5
        overlap = (b_i & b_s).sum() / b_i.sum() if b_i.sum() > 0 else 0.0
        if y[m] == 1 and overlap > tau:
            fg += probs[m]
            chosen.append(("fg", m))
        elif y[m] == 1:
            bg += probs[m]
            chosen.append(("bg", m))
    est = lam * fg + (1 - lam) * (1 - bg)
    loss = sum((sal[i, j] - est[i, j]) ** 2 for i in range(h) for j in range(w)) / (h * w)
    return probs, fg, bg, est, loss, chosen


def _case():
    # C = 3 classes + background on a 3x3 map.
    #  class 0 (present): confident on the left column, which the saliency covers -> foreground
    #  class 1 (present): confident on the right column, outside the saliency -> background
    #  class 2 (absent): confident in the middle, must not be used at all
    maps = np.full((4, 3, 3), -2.0)
    maps[0, :, 0] = 3.0
    maps[1, :, 2] = 3.0
    maps[2, 1, 1] = 4.0
    maps[3] = 0.5
    maps += np.linspace(-0.3, 0.3, 36).reshape(4, 3, 3)   # break symmetries
    sal = np.array([[0.9, 0.6, 0.1], [1.0, 0.2, 0.0], [0.8, 0.4, 0.3]])
    y = np.array([1.0, 1.0, 0.0])
    return maps, sal, y


@pytest.mark.parametrize("lam", [0.5, 0.2])
def test_saliency_loss_matches_eq_1_to_3_by_hand(lam):
    maps, sal, y = _case()
    probs, fg, bg, est, loss, chosen = _by_hand(maps, sal, y, tau=0.4, lam=lam)
    assert chosen == [("fg", 0), ("bg", 1)]
    t_maps = torch.tensor(maps[None], dtype=torch.float64)
    t_sal = torch.tensor(sal[None], dtype=torch.float64)
    t_y = torch.tensor(y[None], dtype=torch.float64)
    out = estimated_saliency(t_maps, t_sal, t_y, "adaptive", 0.4, lam)
    np.testing.assert_allclose(out["probs"][0].numpy(), probs, rtol=1e-12)
    np.testing.assert_allclose(out["fg_map"][0].numpy(), fg, rtol=1e-12)
    np.testing.assert_allclose(out["bg_map"][0].numpy(), bg, rtol=1e-12)
    np.testing.assert_allclose(out["estimate"][0].numpy(), est, rtol=1e-12)
    got = saliency_loss(t_maps, t_sal[:, None], t_y, "adaptive", 0.4, lam)
    assert got.item() == pytest.approx(loss, rel=1e-12)


def test_saliency_loss_averages_over_the_batch():
    maps, sal, y = _case()
    maps2 = maps[::-1].copy()        # a second, different image
    y2 = np.array([0.0, 1.0, 1.0])
    l1 = _by_hand(maps, sal, y, 0.4, 0.5)[4]
    l2 = _by_hand(maps2, sal.T.copy(), y2, 0.4, 0.5)[4]
    t = lambda a: torch.tensor(np.stack(a), dtype=torch.float64)  # noqa: E731
    got = saliency_loss(t([maps, maps2]), t([sal, sal.T]), t([y, y2]), "adaptive", 0.4, 0.5)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-12)


def test_classification_loss_matches_eq_4_by_hand():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 4, 3, 3))
    y = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    total = 0.0
    for b in range(2):
        s = 0.0
        for i in range(3):
            y_hat = maps[b, i].mean()                      # GAP of class map i (background excluded)
            sig = 1 / (1 + math.exp(-y_hat))
            s += y[b, i] * math.log(sig) + (1 - y[b, i]) * math.log(1 - sig)
        total += -s / 3
    got = classification_loss(torch.tensor(maps), torch.tensor(y))
    assert got.item() == pytest.approx(total / 2, rel=1e-10)
    np.testing.assert_allclose(image_logits(torch.tensor(maps), 3).numpy(), maps[:, :3].mean((2, 3)))


def test_classification_loss_sends_no_gradient_to_the_background_map():
    maps = torch.randn(2, 4, 5, 5, requires_grad=True)
    classification_loss(maps, torch.tensor([[1.0, 0, 1], [0, 1, 0]])).backward()
    assert torch.all(maps.grad[:, 3] == 0)
    assert torch.all(maps.grad[:, :3].abs().sum((2, 3)) > 0)
    # whereas L_sal does train the background map
    maps.grad = None
    saliency_loss(maps, torch.rand(2, 5, 5), torch.tensor([[1.0, 0, 1], [0, 1, 0]])).backward()
    assert maps.grad[:, 3].abs().sum() > 0


def test_selection_is_not_differentiated_through():
    maps, sal, y = _case()
    t_maps = torch.tensor(maps[None], requires_grad=True)
    out = estimated_saliency(t_maps, torch.tensor(sal[None]), torch.tensor(y[None]))
    assert not out["fg"].requires_grad and not out["bg"].requires_grad
    # the gradient equals that of the same expression with the selection as constants
    ((torch.tensor(sal[None]) - out["estimate"]) ** 2).mean().backward()
    g = t_maps.grad.clone()
    t2 = torch.tensor(maps[None], requires_grad=True)
    p = torch.softmax(t2, 1)
    est = 0.5 * p[:, 0] + 0.5 * (1 - (p[:, 1] + p[:, 3]))
    ((torch.tensor(sal[None]) - est) ** 2).mean().backward()
    torch.testing.assert_close(g, t2.grad)


# --------------------------------------------------------------------------- map selection


def _probs_from_masks(masks):
    """(C, h, w) boolean masks -> class probabilities that are 0.9 inside, 0.05 outside."""
    return torch.tensor(np.where(np.stack(masks), 0.9, 0.05))[None]


def _cols(lo, hi):
    """A 10x10 mask of columns lo..hi-1."""
    m = np.zeros((10, 10), bool)
    m[:, lo:hi] = True
    return m


def test_overlap_ratio_and_empty_maps():
    sal = torch.zeros(1, 4, 4)
    sal[0, :, :2] = 1.0                                      # left half is salient
    inside = np.zeros((4, 4), bool); inside[:, 0] = True     # noqa: E702
    half = np.zeros((4, 4), bool); half[0, :] = True         # noqa: E702  (2 of 4 pixels salient)
    empty = np.zeros((4, 4), bool)
    o = overlap_ratio(_probs_from_masks([inside, half, empty]), sal)
    torch.testing.assert_close(o, torch.tensor([[1.0, 0.5, 0.0]], dtype=o.dtype))


def test_adaptive_selection_picks_by_overlap_with_tau():
    sal = torch.zeros(1, 10, 10)
    sal[0, :, :5] = 1.0
    # overlaps: 1.0, 0.4 (exactly tau), 0.5, 0.0, empty map, 1.0 but absent
    probs = _probs_from_masks([_cols(0, 3), _cols(3, 8), _cols(3, 7), _cols(6, 9), np.zeros((10, 10), bool), _cols(0, 2)])
    labels = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    fg, bg = select_maps(probs, sal, labels, "adaptive", tau=0.4)
    assert fg.tolist() == [[True, False, True, False, False, False]]
    assert bg.tolist() == [[False, True, False, True, True, False]]   # O <= tau, and O = 0 for an empty map
    fg, bg = select_maps(probs, sal, labels, "adaptive", tau=0.3)
    assert fg.tolist() == [[True, True, True, False, False, False]]


def _box(r0, r1, c0, c1):
    m = np.zeros((10, 10), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_relative_selection_keeps_a_small_object_whose_map_covers_its_context():
    # a 2x2 salient object (4 of 100 cells: salient share 0.04); class 0's map covers the object and its
    # 4x4 context around it (overlap 4/16 = 0.25 <= tau: the paper's rule sends it to the background, where
    # L_sal then pushes it off the object and onto the context: the trap); class 1's map lies on pixels the
    # saliency missed (overlap 0): a class missed by the saliency still goes to the background (Table 3)
    sal = torch.zeros(1, 10, 10)
    sal[0, 3:5, 3:5] = 1.0
    torch.testing.assert_close(salient_share(sal), torch.tensor([0.04]))
    probs = _probs_from_masks([_box(2, 6, 2, 6), _box(6, 9, 6, 9), _box(3, 5, 3, 5)])
    labels = torch.tensor([[1.0, 1, 0]])
    torch.testing.assert_close(overlap_ratio(probs, sal), torch.tensor([[0.25, 0.0, 1.0]], dtype=probs.dtype))
    fg, bg = select_maps(probs, sal, labels, "adaptive", tau=0.4)
    assert fg.tolist() == [[False, False, False]] and bg.tolist() == [[True, True, False]]
    fg, bg = select_maps(probs, sal, labels, "relative", tau=0.4)
    assert fg.tolist() == [[True, False, False]] and bg.tolist() == [[False, True, False]]


def test_relative_selection_by_hand_against_the_salient_share():
    # image 0: salient share 0.5 (columns 0-4); image 1: 0.2 (columns 0-1)
    sal = torch.zeros(2, 10, 10)
    sal[0, :, :5] = 1.0
    sal[1, :, :2] = 1.0
    probs = torch.cat([_probs_from_masks([_cols(0, 3), _cols(1, 5) | _box(0, 5, 5, 6), _box(0, 3, 0, 10)]),
                       _probs_from_masks([_cols(0, 2), _cols(0, 10), _cols(1, 4)])])
    o = overlap_ratio(probs, sal)
    # image 0: 30/30, 40/45, 15/30; image 1: 20/20, 20/100, 10/30
    torch.testing.assert_close(o, torch.tensor([[1.0, 40 / 45, 0.5], [1.0, 0.2, 1 / 3]], dtype=o.dtype))
    labels = torch.ones(2, 3)
    # relative: overlap > tau, or overlap > the share (strictly: a map as salient as the image is not enough)
    fg, bg = select_maps(probs, sal, labels, "relative", tau=0.6)
    assert fg.tolist() == [[True, True, False], [True, False, True]]
    assert bg.tolist() == [[False, False, True], [False, True, False]]
    fg, _ = select_maps(probs, sal, labels, "adaptive", tau=0.6)
    assert fg.tolist() == [[True, True, False], [True, False, False]]


def test_empty_maps_foreground_keeps_unconfident_classes_in_the_foreground():
    sal = torch.zeros(1, 10, 10)
    sal[0, :, :5] = 1.0
    # overlap 1.0 | 0.0 (confident outside the saliency) | empty map, present | empty map, absent
    probs = _probs_from_masks([_cols(0, 3), _cols(6, 9), np.zeros((10, 10), bool), np.zeros((10, 10), bool)])
    labels = torch.tensor([[1.0, 1, 1, 0]])
    fg, bg = select_maps(probs, sal, labels, "adaptive", tau=0.4, empty_maps="foreground")
    assert fg.tolist() == [[True, False, True, False]]            # only the empty present map changes side
    assert bg.tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="empty_maps"):
        select_maps(probs, sal, labels, "adaptive", empty_maps="maybe")
    # the loss uses it, and reports the share of present classes in the foreground
    maps = torch.log(probs.clamp_min(1e-6))
    maps = torch.cat([maps, torch.full_like(maps[:, :1], math.log(0.05))], 1)
    loss_bg, share_bg = saliency_loss(maps, sal, labels, empty_maps="background", return_selection=True)
    loss_fg, share_fg = saliency_loss(maps, sal, labels, empty_maps="foreground", return_selection=True)
    assert (share_bg, share_fg) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert loss_bg.item() != pytest.approx(loss_fg.item())


def test_naive_and_predefined_selection():
    probs = torch.rand(2, 4, 3, 3)
    sal = torch.zeros(2, 3, 3)                                # saliency plays no role in these two
    labels = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    fg, bg = select_maps(probs, sal, labels, "naive")
    assert torch.equal(fg, labels.bool()) and not bg.any()
    always_bg = torch.tensor([False, False, True, False])     # e.g. sofa/chair/diningtable on VOC
    fg, bg = select_maps(probs, sal, labels, "predefined", predefined_background=always_bg)
    assert fg.tolist() == [[True, False, False, True], [False, True, False, False]]
    assert bg.tolist() == [[False, False, True, False], [False, False, True, False]]
    with pytest.raises(ValueError, match="predefined"):
        select_maps(probs, sal, labels, "predefined")
    with pytest.raises(ValueError, match="unknown map selection"):
        select_maps(probs, sal, labels, "greedy")


def test_naive_selection_loss_by_hand():
    maps, sal, y = _case()
    t = lambda a: torch.tensor(a[None])  # noqa: E731
    p = torch.softmax(t(maps), 1)[0].numpy()
    est = 0.5 * (p[0] + p[1]) + 0.5 * (1 - p[3])               # every present class is foreground
    got = saliency_loss(t(maps), t(sal), t(y), "naive", lam=0.5)
    assert got.item() == pytest.approx(((sal - est) ** 2).mean(), rel=1e-12)


def test_saliency_is_resized_to_the_map_size():
    maps = torch.randn(2, 3, 4, 4)
    labels = torch.tensor([[1.0, 0], [1, 1]])
    sal = torch.rand(2, 1, 32, 32)
    small = resize_saliency(sal, (4, 4))
    assert small.shape == (2, 1, 4, 4)
    torch.testing.assert_close(small, F.interpolate(sal, (4, 4), mode="bilinear", antialias=True,
                                                    align_corners=False))
    torch.testing.assert_close(saliency_loss(maps, sal, labels), saliency_loss(maps, small, labels))
    const = torch.full((1, 1, 32, 32), 0.7)
    torch.testing.assert_close(resize_saliency(const, (4, 4)), torch.full((1, 1, 4, 4), 0.7))
    # block-wise constant saliency stays block-wise ordered (left salient, right not)
    halves = torch.zeros(1, 1, 32, 32)
    halves[..., :16] = 1.0
    r = resize_saliency(halves, (4, 4))[0, 0]
    assert torch.all(r[:, 0] == 1) and torch.all(r[:, 3] == 0)


def test_loss_requires_c_plus_1_maps():
    with pytest.raises(ValueError, match="C\\+1"):
        saliency_loss(torch.randn(1, 3, 2, 2), torch.rand(1, 2, 2), torch.tensor([[1.0, 0, 1]]))


def test_nearest_saliency_resize_samples_one_pixel_per_cell():
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, 0, 0] = 1.0          # nearest at 2x2 samples rows/cols 0 and 2: sees this pixel
    sal[0, 0, 1, 1] = 1.0          # ... and never this one
    near = resize_saliency(sal, (2, 2), mode="nearest")[0, 0]
    assert near.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    area = resize_saliency(sal, (2, 2), mode="area")[0, 0]
    assert 0.0 < area[0, 0].item() < 1.0                      # a weighted mean of the pixels it covers
    with pytest.raises(ValueError, match="saliency resize"):
        resize_saliency(sal, (2, 2), mode="cubic")


def test_loss_size_upsamples_the_maps_before_the_softmax():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 4)
    labels = torch.tensor([[1.0, 0], [1, 1]])
    sal = torch.rand(2, 1, 16, 16)
    up = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    expected = saliency_loss(up, resize_saliency(sal, (8, 8)), labels)
    torch.testing.assert_close(saliency_loss(maps, sal, labels, loss_size=(8, 8)), expected)
    # at the map size it is the paper's loss, unchanged
    torch.testing.assert_close(saliency_loss(maps, sal, labels, loss_size=(4, 4)), saliency_loss(maps, sal, labels))


def test_upsampled_loss_sees_a_boundary_inside_a_cell():
    # one 2x2 map; the saliency's edge runs through the middle of the left cells. At map size the
    # saliency is a cell average (0.5) and the loss cannot tell the edge's side; upsampled it can.
    maps = torch.zeros(1, 2, 2, 2)                           # C = 1: class map + background
    sal = torch.zeros(1, 1, 8, 8)
    sal[..., :3] = 1.0                                       # 3 of the 4 columns of each left cell
    labels = torch.tensor([[1.0]])
    left_heavy = maps.clone()
    left_heavy[0, 0, :, 0] = 2.0                             # class on the left cells
    at_map = saliency_loss(left_heavy, sal, labels, "naive")
    fine = saliency_loss(left_heavy, sal, labels, "naive", loss_size=(8, 8))
    assert fine.item() != pytest.approx(at_map.item())
    # the gradient at loss_size reaches the raw maps
    m = left_heavy.clone().requires_grad_(True)
    saliency_loss(m, sal, labels, "naive", loss_size=(8, 8)).backward()
    assert m.grad.abs().sum() > 0
