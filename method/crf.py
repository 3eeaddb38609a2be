"""Dense CRF refinement of pseudo-masks (Krähenbühl & Koltun 2011, through pydensecrf).

The unary of each label is ``-log(score)`` where the scores are the pseudo-mask scores
(background score, then the normalised CAM of each present class), exactly as psa/EPS
feed ``[bg, cams]`` to ``unary_from_softmax``; scores need not sum to one because a
per-pixel constant does not change the mean-field result. ``unary="labels"`` instead
starts from the hard argmax with confidence ``gt_prob`` (IRN's ``crf_inference_label``).

Presets:

* ``paper`` (default): the DeepLab-v1 kernel used for the CRF rows of the EPS paper's
  Table 4 -- bilateral weight 4, xy 67, rgb 3; Gaussian weight 3, xy 1; 10 iterations.
* ``psa``: the values in psa/EPS ``crf_inference`` -- bilateral weight 10, xy 80, rgb 13;
  Gaussian weight 3, xy 3; 10 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfParams:
    """Kernel weights and widths of the fully connected CRF."""

    bilateral_weight: float = 4.0
    bilateral_xy: float = 67.0
    bilateral_rgb: float = 3.0
    gaussian_weight: float = 3.0
    gaussian_xy: float = 1.0
    iterations: int = 10


CRF_PRESETS: dict[str, CrfParams] = {
    "paper": CrfParams(4.0, 67.0, 3.0, 3.0, 1.0, 10),
    "psa": CrfParams(10.0, 80.0, 13.0, 3.0, 3.0, 10),
}

_CLIP = 1e-5


def crf_posterior(image: np.ndarray, scores: np.ndarray, params: CrfParams,
                  unary: str = "scores", gt_prob: float = 0.7) -> np.ndarray:
    """Mean-field posterior ``(L, H, W)`` float32 for ``L`` candidate labels.

    ``image``: ``(H, W, 3)`` uint8 RGB; ``scores``: ``(L, H, W)`` non-negative scores
    (``unary="scores"``) -- with ``unary="labels"`` only their argmax is used.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels, unary_from_softmax

    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"CRF scores must be (labels, H, W), got shape {scores.shape}")
    n, h, w = scores.shape
    if image.shape[:2] != (h, w) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image {image.shape} does not match scores {scores.shape}")
    if n == 1:
        return np.ones((1, h, w), dtype=np.float32)
    crf = dcrf.DenseCRF2D(w, h, n)
    if unary == "scores":
        u = unary_from_softmax(np.clip(scores, _CLIP, None), clip=None)
    elif unary == "labels":
        u = unary_from_labels(scores.argmax(0).reshape(-1), n, gt_prob=gt_prob, zero_unsure=False)
    else:
        raise ValueError(f"unknown CRF unary {unary!r} (scores or labels)")
    crf.setUnaryEnergy(np.ascontiguousarray(u, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_xy, compat=params.gaussian_weight)
    crf.addPairwiseBilateral(sxy=params.bilateral_xy, srgb=params.bilateral_rgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8),
                             compat=params.bilateral_weight)
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n, h, w)


def crf_argmax(image: np.ndarray, scores: np.ndarray, params: CrfParams,
               unary: str = "scores", gt_prob: float = 0.7) -> np.ndarray:
    """Index (into ``scores``' first axis) of the most probable label after the CRF."""
    return crf_posterior(image, scores, params, unary, gt_prob).argmax(0)
