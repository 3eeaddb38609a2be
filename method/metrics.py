"""Segmentation metrics for pseudo-masks and segmenter predictions (numpy + scipy.ndimage).

Label maps follow the project convention: ``0`` background, ``c + 1`` class ``c``,
``255`` ignore. ``L = C + 1`` labels in all.

* **Confusion matrix** ``(L, L + 1)``: rows are ground-truth labels, columns the predicted
  label; the extra last column counts predictions outside ``0..L-1`` (a ``255`` in a
  prediction). Ground-truth ``255`` pixels are never counted.
* **IoU / precision / recall** per label from that matrix. The standard mode counts an
  "other" prediction as a miss of the true label; the authors' mode (``ignore_pred_255``,
  as psa/EPS ``evaluate_png.py``) drops those pixels as if they were ignore in the ground
  truth. A label that is absent from both ground truth and prediction has no IoU (NaN) and
  does not enter the mean.
* **Boundary precision / recall / F1** as the EPS paper's Table 1 (after BES): class-agnostic
  edges of both label maps from a 4-neighbour Laplacian, matched within a pixel tolerance.
* **Co-occurrence confusion ratio** ``m_{k,c} = FP_{k,c} / TP_c`` (Table 2): pixels of
  context ``k`` (e.g. railroad) predicted as its co-occurring class ``c`` (train), over the
  true-positive pixels of ``c``.

Everything accumulates over a dataset (:class:`SegEvaluator`) and is summed before
dividing (micro averages), so image order does not matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

IGNORE = 255


# --------------------------------------------------------------------------- confusion / IoU


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_labels: int,
                     ignore_index: int = IGNORE) -> np.ndarray:
    """``(L, L + 1)`` int64 counts: row = ground truth, column = prediction (last = other)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    g = gt.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    valid = g != ignore_index
    bad = valid & ((g < 0) | (g >= num_labels))
    if bad.any():
        raise ValueError(f"ground truth holds label {int(g[bad][0])} outside 0..{num_labels - 1} "
                         f"(and {ignore_index} = ignore)")
    g, p = g[valid], p[valid]
    p = np.where((p < 0) | (p >= num_labels), num_labels, p)
    counts = np.bincount(g * (num_labels + 1) + p, minlength=num_labels * (num_labels + 1))
    return counts.reshape(num_labels, num_labels + 1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def scores_from_confusion(conf: np.ndarray, ignore_pred_255: bool = False) -> dict:
    """Per-label IoU, precision, recall (NaN where undefined) and their means.

    ``ignore_pred_255``: the authors' mode, which drops pixels predicted outside
    ``0..L-1`` instead of counting them as misses.
    """
    conf = np.asarray(conf, dtype=np.int64)
    num = conf.shape[0]
    square = conf[:, :num]
    tp = np.diag(square).astype(np.float64)
    gt_total = (square.sum(1) if ignore_pred_255 else conf.sum(1)).astype(np.float64)
    pred_total = square.sum(0).astype(np.float64)
    union = gt_total + pred_total - tp
    iou = _div(tp, union)
    precision = _div(tp, pred_total)
    recall = _div(tp, gt_total)
    counted = square.sum() if ignore_pred_255 else conf.sum()
    return {
        "iou": iou, "precision": precision, "recall": recall,
        "tp": tp, "gt_pixels": gt_total, "pred_pixels": pred_total,
        "miou": _nanmean(iou), "mean_precision": _nanmean(precision),
        "mean_recall": _nanmean(recall),
        "pixel_accuracy": float(tp.sum() / counted) if counted else math.nan,
    }


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


# --------------------------------------------------------------------------- boundaries


def fill_ignore(label: np.ndarray, ignore_index: int = IGNORE) -> np.ndarray:
    """Replace ignore pixels by the nearest valid label (the VOC void band straddles object
    borders, so its middle becomes the boundary). All-ignore maps are returned unchanged."""
    label = np.asarray(label)
    void = label == ignore_index
    if not void.any() or void.all():
        return label
    _, (iy, ix) = ndimage.distance_transform_edt(void, return_indices=True)
    return label[iy, ix]


def boundary_edges(label: np.ndarray) -> np.ndarray:
    """Class-agnostic edges of a label map: the union over labels of the pixels where the
    4-neighbour Laplacian of that label's binary map is non-zero.

    (A Laplacian of the raw label values could cancel where three labels meet, so it is
    taken per label.) The union is exactly "some 4-neighbour has another label", which is
    how it is computed; edges are two pixels thick, one on each side of a border. Pixels
    outside the image count as the same label (borders of the image are not edges).
    """
    label = np.asarray(label)
    edges = np.zeros(label.shape, dtype=bool)
    diff_v = label[1:, :] != label[:-1, :]
    diff_h = label[:, 1:] != label[:, :-1]
    edges[1:, :] |= diff_v
    edges[:-1, :] |= diff_v
    edges[:, 1:] |= diff_h
    edges[:, :-1] |= diff_h
    return edges


def _within(edges: np.ndarray, other: np.ndarray, tolerance: float) -> int:
    """How many ``edges`` pixels lie within ``tolerance`` (Euclidean px) of an ``other`` pixel."""
    if not edges.any() or not other.any():
        return 0
    dist = ndimage.distance_transform_edt(~other)
    return int(np.count_nonzero(edges & (dist <= tolerance)))


def boundary_counts(gt: np.ndarray, pred: np.ndarray, tolerance: float = 2.0,
                    ignore_index: int = IGNORE) -> np.ndarray:
    """``[matched predicted edge px, predicted edge px, matched gt edge px, gt edge px]``.

    Ground-truth ignore pixels take the nearest valid label first (:func:`fill_ignore`);
    so do prediction ignore pixels.
    """
    gt = fill_ignore(np.asarray(gt), ignore_index)
    pred = fill_ignore(np.asarray(pred), ignore_index)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    eg = boundary_edges(gt)
    ep = boundary_edges(pred)
    return np.array([_within(ep, eg, tolerance), int(ep.sum()),
                     _within(eg, ep, tolerance), int(eg.sum())], dtype=np.int64)


def boundary_scores(counts: np.ndarray) -> dict:
    """Precision, recall and F1 from summed :func:`boundary_counts`.

    Undefined precision (no predicted edges) or recall (no ground-truth edges) is NaN;
    F1 is 0 when one side has edges and the other none or nothing matches, and NaN when
    neither map has an edge.
    """
    mp, n_p, mg, n_g = (int(v) for v in counts)
    precision = mp / n_p if n_p else math.nan
    recall = mg / n_g if n_g else math.nan
    if n_p == 0 and n_g == 0:
        f1 = math.nan
    elif n_p == 0 or n_g == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- co-occurrence


def cooccurrence_fp(gt: np.ndarray, pred: np.ndarray, context: np.ndarray,
                    context_class: dict[int, int], ignore_index: int = IGNORE) -> dict[int, int]:
    """``FP_{k,c}`` per context ``k``: pixels of context ``k`` that are not truly class ``c``
    (nor ignore) but are predicted as ``c`` (label ``c + 1``)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    context = np.asarray(context)
    if not (gt.shape == pred.shape == context.shape):
        raise ValueError(f"ground truth {gt.shape}, prediction {pred.shape} and context "
                         f"{context.shape} differ in size")
    out = {}
    for k, c in context_class.items():
        lab = c + 1
        out[int(k)] = int(np.count_nonzero((context == k) & (pred == lab)
                                           & (gt != lab) & (gt != ignore_index)))
    return out


def context_pixels(gt: np.ndarray, context: np.ndarray, context_class: dict[int, int],
                   ignore_index: int = IGNORE) -> dict[int, int]:
    """Visible pixels of each context ``k`` that are not truly its class ``c`` (nor ignore): the
    denominator of the share of a context taken for its class, ``FP_{k,c} / context_pixels_k``."""
    gt = np.asarray(gt)
    context = np.asarray(context)
    if gt.shape != context.shape:
        raise ValueError(f"ground truth {gt.shape} and context {context.shape} differ in size")
    return {int(k): int(np.count_nonzero((context == k) & (gt != c + 1) & (gt != ignore_index)))
            for k, c in context_class.items()}


# --------------------------------------------------------------------------- accumulator


@dataclass
class SegEvaluator:
    """Accumulates every metric over a dataset, one image at a time."""

    num_classes: int                          # C (foreground)
    context_class: dict[int, int] = field(default_factory=dict)
    boundary_tolerance: float = 2.0
    conf: np.ndarray = field(init=False)
    boundary: np.ndarray = field(init=False)
    context_fp: dict[int, int] = field(init=False)
    context_px: dict[int, int] = field(init=False)
    images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = self.num_classes + 1
        self.conf = np.zeros((n, n + 1), dtype=np.int64)
        self.boundary = np.zeros(4, dtype=np.int64)
        self.context_fp = {int(k): 0 for k in self.context_class}
        self.context_px = {int(k): 0 for k in self.context_class}

    def add(self, gt: np.ndarray, pred: np.ndarray, context: np.ndarray | None = None) -> None:
        """Add one image (``context`` only needed when contexts are defined)."""
        self.conf += confusion_matrix(gt, pred, self.num_classes + 1)
        self.boundary += boundary_counts(gt, pred, self.boundary_tolerance)
        if self.context_class:
            if context is None:
                raise ValueError("the dataset defines contexts but no context map was given")
            for k, v in cooccurrence_fp(gt, pred, context, self.context_class).items():
                self.context_fp[k] += v
            for k, v in context_pixels(gt, context, self.context_class).items():
                self.context_px[k] += v
        self.images += 1

    def summary(self) -> dict:
        """All metrics: ``standard`` and ``ignore_pred_255`` scores, boundary, co-occurrence."""
        std = scores_from_confusion(self.conf)
        authors = scores_from_confusion(self.conf, ignore_pred_255=True)
        pairs = []
        for k, c in sorted(self.context_class.items()):
            tp = float(std["tp"][c + 1])
            fp = self.context_fp[int(k)]
            px = self.context_px[int(k)]
            pairs.append({"context": int(k), "class": int(c), "fp": fp, "tp": tp,
                          "ratio": fp / tp if tp > 0 else math.nan,
                          "context_pixels": px, "context_share": fp / px if px > 0 else math.nan,
                          "class_iou": float(std["iou"][c + 1])})
        return {"images": self.images, "confusion": self.conf.copy(), "standard": std,
                "ignore_pred_255": authors,
                "boundary": boundary_scores(self.boundary), "boundary_counts": self.boundary.copy(),
                "cooccurrence": pairs}
