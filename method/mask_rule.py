"""The rule that turns an image's CAMs (and a background score) into a pseudo-mask.
"""

from __future__ import annotations

import numpy as np

from artifacts.cams import CamRecord, PseudoMaskError

# background rules that read the image's saliency map
SALIENCY_MODES = ("saliency", "saliency_floor", "joint")


def mask_scores(rec: CamRecord, background: str, bg_threshold: float,
                saliency: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate scores ``(1 + P, H, W)`` and their mask values ``[0, c_1 + 1, ...]``.

    ``background="threshold"``: the background score is the constant ``bg_threshold``
    (psa/EPS ``--thr``); ``"bgmap"``: it is the model's background probability map;
    ``"saliency"``: ``1 - saliency`` (``(H, W)`` in [0, 1]), the pixel-level saliency the
    classifier was trained on, so a class wins where it is salient and its normalised CAM beats
    the non-saliency; ``"saliency_floor"``: ``max(1 - saliency, bg_threshold)``, so a class takes a
    pixel only where it is salient *and* its normalised CAM beats the authors' constant (a salient
    pixel that every class map finds weak stays background); ``"joint"``: ``1 - sqrt(saliency * (1 -
    bg))``, one minus the geometric mean of the two foreground probabilities, the saliency detector's
    (sharp, but wrong where it is wrong in one image) and the EPS model's (coarse, but learnt over every image, so an error the
    detector makes in some images only is outvoted); ``"auto"``: bgmap when the record has one,
    else threshold.
    """
    h, w = rec.size
    if background == "auto":
        background = "threshold" if rec.bg is None else "bgmap"
    if background == "threshold":
        bg = np.full((1, h, w), bg_threshold, dtype=np.float32)
    elif background == "bgmap":
        if rec.bg is None:
            raise PseudoMaskError("background = bgmap needs the background map of an eps model; "
                                  "these CAMs come from a model without one (use threshold)")
        bg = rec.bg[None].astype(np.float32)
    elif background in SALIENCY_MODES:
        if saliency is None:
            raise PseudoMaskError(f"background = {background} needs the image's saliency map")
        if saliency.shape != (h, w):
            raise PseudoMaskError(f"saliency map is {saliency.shape[1]}x{saliency.shape[0]} but the CAMs are "
                                  f"{w}x{h}; rerun the saliency stage on this dataset")
        fg = np.clip(saliency, 0.0, 1.0).astype(np.float32)
        if background == "joint":
            if rec.bg is None:
                raise PseudoMaskError("background = joint needs the background map of an eps model; these CAMs "
                                      "come from a model without one (use saliency)")
            fg = np.sqrt(fg * (1.0 - np.clip(rec.bg.astype(np.float32), 0.0, 1.0)))
        bg = (1.0 - fg)[None]
        if background == "saliency_floor":
            bg = np.maximum(bg, np.float32(bg_threshold))
    else:
        raise PseudoMaskError(f"unknown background mode {background!r} (auto, threshold, bgmap, saliency, "
                              "saliency_floor or joint)")
    scores = np.concatenate([bg, rec.cams.astype(np.float32)], axis=0)
    values = np.concatenate([[0], np.asarray(rec.classes, dtype=np.int64) + 1])
    return scores, values


def argmax_mask(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint8 mask: the mask value of the highest score (ties go to the first, background)."""
    return np.asarray(values, dtype=np.uint8)[np.argmax(scores, axis=0)]


def sure_labels(scores: np.ndarray, values: np.ndarray, fg_margin: float, bg_margin: float,
                ignore: int = 255) -> np.ndarray:
    """psa's confident regions from an image's candidate scores (:func:`mask_scores`): a pixel is its
    class where that class still wins with the background score raised by ``fg_margin`` (psa's low
    alpha), background where the background still wins lowered by ``bg_margin`` (psa's high alpha),
    and ``ignore`` in between. With the constant 0.20 background, margins 0.10 / 0.15 give IRN's
    ``conf_fg_thres`` 0.30 and ``conf_bg_thres`` 0.05."""
    raised = scores.copy()
    raised[0] += fg_margin
    lowered = scores.copy()
    lowered[0] -= bg_margin
    fg = np.argmax(raised, axis=0)
    labels = np.full(scores.shape[1:], ignore, dtype=np.uint8)
    labels[fg != 0] = np.asarray(values, dtype=np.uint8)[fg[fg != 0]]
    labels[np.argmax(lowered, axis=0) == 0] = 0
    return labels
