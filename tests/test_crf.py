"""Dense CRF (method.crf): it pulls a blurred mask back onto the image edges."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from method.crf import CRF_PRESETS, CrfParams, crf_argmax, crf_posterior
from method.metrics import boundary_counts, boundary_scores, confusion_matrix, scores_from_confusion


def _scene(seed=0):
    """A 64x64 image with two coloured shapes on grey, and its label map."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((64, 64), np.uint8)
    gt[12:40, 10:34] = 1
    yy, xx = np.mgrid[:64, :64]
    gt[(yy - 44) ** 2 + (xx - 46) ** 2 < 12 ** 2] = 2
    colours = np.array([[120, 120, 120], [200, 40, 40], [40, 60, 210]], np.float32)
    img = colours[gt] + rng.normal(0, 4, (64, 64, 3))
    return np.clip(img, 0, 255).astype(np.uint8), gt


def _blurred_scores(gt, sigma=4.0, shift=3):
    """CAM-like scores: each class's map blurred, shifted, normalised; constant background 0.2."""
    cams = []
    for c in (1, 2):
        m = ndimage.gaussian_filter((gt == c).astype(np.float32), sigma)
        m = np.roll(m, shift, axis=1)
        cams.append(m / m.max())
    return np.concatenate([np.full((1, *gt.shape), 0.2, np.float32), np.stack(cams)])


@pytest.mark.parametrize("preset", ["paper", "psa"])
def test_crf_sharpens_a_blurred_mask(preset):
    img, gt = _scene()
    scores = _blurred_scores(gt)
    before = scores.argmax(0).astype(np.uint8)
    after = crf_argmax(img, scores, CRF_PRESETS[preset]).astype(np.uint8)
    f_before = boundary_scores(boundary_counts(gt, before, tolerance=1))["f1"]
    f_after = boundary_scores(boundary_counts(gt, after, tolerance=1))["f1"]
    miou_before = scores_from_confusion(confusion_matrix(gt, before, 3))["miou"]
    miou_after = scores_from_confusion(confusion_matrix(gt, after, 3))["miou"]
    assert f_after > f_before + 0.2, (f_before, f_after)
    assert miou_after > miou_before, (miou_before, miou_after)


def test_posterior_is_a_distribution_and_presets_match_the_papers():
    img, gt = _scene()
    q = crf_posterior(img, _blurred_scores(gt), CrfParams(iterations=3))
    assert q.shape == (3, 64, 64) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert CRF_PRESETS["paper"] == CrfParams(4.0, 67.0, 3.0, 3.0, 1.0, 10)
    assert CRF_PRESETS["psa"] == CrfParams(10.0, 80.0, 13.0, 3.0, 3.0, 10)


def test_label_unary_and_degenerate_inputs():
    img, gt = _scene()
    scores = _blurred_scores(gt)
    out = crf_argmax(img, scores, CRF_PRESETS["paper"], unary="labels", gt_prob=0.7)
    assert out.shape == gt.shape and set(np.unique(out)) <= {0, 1, 2}
    one = crf_argmax(img, scores[:1], CRF_PRESETS["paper"])          # only background: nothing to decide
    assert (one == 0).all()
    with pytest.raises(ValueError, match="does not match"):
        crf_posterior(img[:10], scores, CRF_PRESETS["paper"])
    with pytest.raises(ValueError, match="unknown CRF unary"):
        crf_posterior(img, scores, CRF_PRESETS["paper"], unary="bogus")
