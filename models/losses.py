"""EPS losses (paper section 3.2-3.3) and the map selection of Table 3.

Notation (maps are the raw head outputs, ``(B, K, h, w)``):

* ``L_cls`` (eq. 4): multilabel soft margin between the labels ``y`` and the global
  average of the C class maps (raw, before any softmax). The background map (index C,
  last) is not part of the average, so ``L_cls`` sends it no gradient.
* ``L_sal`` (eq. 1-3): ``P = softmax(maps)`` over the C+1 maps;
  ``M_fg = sum_i y_i P_i 1[O(P_i, M_s) > tau]``,
  ``M_bg = sum_i y_i P_i 1[O(P_i, M_s) <= tau] + P_{C+1}``,
  ``M_hat = lam M_fg + (1 - lam)(1 - M_bg)``, ``L_sal = mean_pixels (M_s - M_hat)^2``.
  ``O(P_i, M_s) = |B_i ∩ B_s| / |B_i|`` with ``B = map > 0.5``; **O = 0 when B_i is empty**
  (a class with no confident pixel overlaps nothing, so it goes to the background, as in
  the authors' code, whose ``+1e-4`` in the denominator gives 0 there) unless
  ``empty_maps="foreground"``: the paper leaves 0/0 undefined, and counting it as background
  traps training (at initialisation no class probability exceeds 0.5, every present class
  joins the background, and L_sal then pushes each class *out* of the salient region, so it
  never crosses tau and the class maps settle on the contexts; the README's departures table
  gives the measured effect). The selection is a hard decision computed without gradient.
* The saliency map is resized to the map size with bilinear interpolation with
  antialiasing (each map cell sees the average of the image pixels it covers rather than
  4 sampled pixels; the authors used nearest-neighbour sampling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTIONS = ("adaptive", "relative", "naive", "predefined")


def image_logits(maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Image-level class scores: global average of the C class maps, ``(B, C)``."""
    return maps[:, :num_classes].mean(dim=(2, 3))


def classification_loss(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls (eq. 4): multilabel soft margin on the GAP of the class maps (background excluded)."""
    num_classes = labels.shape[1]
    if maps.shape[1] < num_classes:
        raise ValueError(f"{maps.shape[1]} maps for {num_classes} classes")
    return F.multilabel_soft_margin_loss(image_logits(maps, num_classes), labels.to(maps.dtype))


SALIENCY_RESIZES = ("area", "nearest")


def resize_saliency(saliency: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resize ``(B, 1, H, W)`` or ``(B, H, W)`` saliency in [0, 1] to the map size ``(h, w)``.

    ``area``: antialiased bilinear (a cell sees the mean of the pixels it covers); ``nearest``:
    one sampled pixel per cell, as the authors' ``F.interpolate(..., mode='nearest')``.
    """
    if saliency.dim() == 3:
        saliency = saliency.unsqueeze(1)
    if tuple(saliency.shape[-2:]) == tuple(size):
        return saliency
    if mode == "nearest":
        return F.interpolate(saliency, size=size, mode="nearest")
    if mode != "area":
        raise ValueError(f"unknown saliency resize {mode!r} ({' or '.join(SALIENCY_RESIZES)})")
    return F.interpolate(saliency, size=size, mode="bilinear", align_corners=False, antialias=True)


def overlap_ratio(class_probs: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """``O(M_i, M_s) = |B_i ∩ B_s| / |B_i|`` for every class map, ``(B, C)``; 0 when ``B_i`` is empty.

    ``class_probs`` is ``(B, C, h, w)``, ``saliency`` ``(B, h, w)`` or ``(B, 1, h, w)``.
    """
    b_i = (class_probs > 0.5).flatten(2).to(class_probs.dtype)
    b_s = (saliency > 0.5).reshape(saliency.shape[0], 1, -1).to(class_probs.dtype)
    inter = (b_i * b_s).sum(-1)
    area = b_i.sum(-1)
    return torch.where(area > 0, inter / area.clamp(min=1), torch.zeros_like(inter))


def salient_share(saliency: torch.Tensor) -> torch.Tensor:
    """``|B_s| / (h w)`` per image, ``(B,)``: the overlap ratio a map placed at random would have."""
    return (saliency > 0.5).reshape(saliency.shape[0], -1).to(saliency.dtype).mean(-1)


def select_maps(class_probs: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
                strategy: str = "adaptive", tau: float = 0.4,
                predefined_background: torch.Tensor | None = None,
                empty_maps: str = "background") -> tuple[torch.Tensor, torch.Tensor]:
    """Which present class maps join the foreground and which the background.

    Returns two boolean ``(B, C)`` masks ``(fg, bg)``; absent classes are in neither.

    * ``adaptive`` (the paper): foreground iff the overlap ratio with the saliency > ``tau``;
      a class whose map has no pixel > 0.5 (``B_i`` empty) joins ``empty_maps``
      (``background``: the authors' code; ``foreground``: until the map is confident).
    * ``relative``: as ``adaptive``, and a class whose overlap ratio exceeds the image's salient share
      (its map is more salient than the image as a whole) joins the foreground too: a small object
      whose map also covers its larger context is not trapped in the background, while a class the
      saliency missed (its map on non-salient pixels) still goes there.
    * ``naive``: every present class is foreground.
    * ``predefined``: classes flagged in ``predefined_background`` (bool ``(C,)``) are always
      background, the others foreground.
    """
    with torch.no_grad():
        present = labels > 0.5
        if strategy in ("adaptive", "relative"):
            ratio = overlap_ratio(class_probs, saliency)
            fg_class = ratio > tau
            if strategy == "relative":
                fg_class = fg_class | (ratio > salient_share(saliency)[:, None])
            if empty_maps == "foreground":
                fg_class = fg_class | ~(class_probs > 0.5).flatten(2).any(-1)
            elif empty_maps != "background":
                raise ValueError(f"unknown empty_maps {empty_maps!r} (background or foreground)")
        elif strategy == "naive":
            fg_class = torch.ones_like(present)
        elif strategy == "predefined":
            if predefined_background is None:
                raise ValueError("map selection 'predefined' needs the list of background classes")
            fg_class = (~predefined_background.to(device=present.device, dtype=torch.bool)).expand_as(present)
        else:
            raise ValueError(f"unknown map selection '{strategy}'; choose one of {', '.join(SELECTIONS)}")
        return present & fg_class, present & ~fg_class


def estimated_saliency(maps: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
                       strategy: str = "adaptive", tau: float = 0.4, lam: float = 0.5,
                       predefined_background: torch.Tensor | None = None,
                       empty_maps: str = "background") -> dict[str, torch.Tensor]:
    """Eq. 1-2: ``M_hat`` from the C+1 maps; ``saliency`` must already be at the map size.

    Returns ``probs``, ``fg_map``, ``bg_map`` (``M_bg``, not inverted), ``estimate`` and the
    selection masks ``fg``/``bg`` (for logging and tests).
    """
    num_classes = labels.shape[1]
    if maps.shape[1] != num_classes + 1:
        raise ValueError(f"EPS needs C+1 = {num_classes + 1} maps, got {maps.shape[1]}")
    probs = torch.softmax(maps, dim=1)
    class_probs, background = probs[:, :num_classes], probs[:, num_classes]
    fg, bg = select_maps(class_probs, saliency, labels, strategy, tau, predefined_background, empty_maps)
    fg_w = fg.to(probs.dtype)[:, :, None, None]
    bg_w = bg.to(probs.dtype)[:, :, None, None]
    fg_map = (class_probs * fg_w).sum(1)
    bg_map = (class_probs * bg_w).sum(1) + background
    estimate = lam * fg_map + (1.0 - lam) * (1.0 - bg_map)
    return {"probs": probs, "fg_map": fg_map, "bg_map": bg_map, "estimate": estimate, "fg": fg, "bg": bg}


def saliency_loss(maps: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
                  strategy: str = "adaptive", tau: float = 0.4, lam: float = 0.5,
                  predefined_background: torch.Tensor | None = None, empty_maps: str = "background",
                  return_selection: bool = False, loss_size: tuple[int, int] | None = None,
                  saliency_resize: str = "area"):
    """L_sal (eq. 3): mean over batch and pixels of ``(M_s - M_hat)^2``.

    ``saliency`` is ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1] at any size. By default (the
    paper) it is resized to the map size (``saliency_resize``). With ``loss_size`` larger than
    the maps, the raw maps are first upsampled bilinearly to ``loss_size`` (before the softmax),
    so the loss and the selection see the saliency's boundaries instead of cell averages. With
    ``return_selection`` also the share of present classes that joined the foreground (a
    training diagnostic; NaN when no class is present).
    """
    if loss_size is not None and tuple(loss_size) != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=tuple(loss_size), mode="bilinear", align_corners=False)
    sal = resize_saliency(saliency.to(maps.dtype), tuple(maps.shape[-2:]), saliency_resize)[:, 0]
    out = estimated_saliency(maps, sal, labels, strategy, tau, lam, predefined_background, empty_maps)
    loss = ((sal - out["estimate"]) ** 2).mean()
    if not return_selection:
        return loss
    present = (out["fg"] | out["bg"]).sum()
    share = (out["fg"].sum() / present).item() if present > 0 else float("nan")
    return loss, share
