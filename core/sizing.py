"""Size-aware defaults: the knobs set to ``auto`` in params.yaml, resolved from the training images' size.

The knobs that depend on image size default to ``auto``; each stage resolves them from ``L``, the
median long side of the train split's images (``prepare`` records it in the dataset manifest and in
``data/metrics/prepare.json``, with the values ``auto`` gives). An explicit value always wins.

The rules (``os`` is the output stride, ``s`` the segmenter's middle training scale):

* output stride (``train_cls``, ``train_seg``, ``train_affinity``): 16 when the image keeps at least
  8 cells across at stride 16 (``L >= 128``), else 8;
* training crops (``train_cls``, ``train_seg``, ``train_affinity``): ``L`` rounded down to a multiple of
  16, at most 448 (the paper's crop for the ~500-px VOC images), at least 32;
* ``train_cls.resize_long``: ``[0.75 L, 1.25 L]`` (the classifier sees the image about its own size);
* ``s = max(1, 12 * os / L)``: small images are upscaled so that the long side spans at least 12
  cells of the segmenter's (auto) output stride at the middle scale (128 px at stride 16: ``s`` = 1.5);
  ``train_seg.scale_range`` ``[2s/3, 4s/3]``, ``predict_seg.scales`` ``[5s/6, s, 7s/6]`` (centred on what
  the segmenter trained at), ``train_affinity.scale_range`` ``[2s/3, s]``;
* ``train_affinity.feature_stride``: 8 (psa) when that grid keeps at least 32 cells (``L >= 256``),
  else 4;
* ``saliency.input_size``: ``4 L`` rounded down to a multiple of 32, within [320, 1024] (IS-Net was
  trained at 1024; upscaling small images lets it see their objects at a size it knows); for U²-Net-p
  (``backend: u2netp``, trained at 320) within [320, 512]: on the real VOC photos it fails at 1024
  (foreground IoU 0.05 against 0.45 at 320, README). ``rescue_saliency.input_size`` applies the same
  rule to the median long side of the crops it runs the detector on (``tasks.rescue_saliency``: the
  crops are known only once the CAMs are, so it is resolved there, not here).

On the embedded 128-px images these give the values the project used before ``auto`` existed.
``infer_cam.scales`` is not sized: it stays the paper's 0.5, 1, 1.5, 2.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from core.config import AUTO, Auto

MAX_CROP = 448
MIN_CELLS = 8          # cells across the image at scale 1 for output stride 16
MIN_SEG_CELLS = 12     # cells across the long side at the segmenter's middle training scale
MIN_AFFINITY_CELLS = 32
U2NETP_MAX_INPUT = 512  # U²-Net-p was trained at 320; on real photos it degrades past ~400 and fails at 1024


def _down(x: float, multiple: int) -> int:
    return int(x // multiple) * multiple


def saliency_input_size(long_side: float, backend: str = "isnet") -> int:
    """The detector's input side for an image (or a crop) of long side ``long_side`` px: ``4 L`` rounded
    down to a multiple of 32, within [320, 1024] ([320, 512] for ``u2netp``)."""
    return min(U2NETP_MAX_INPUT if backend == "u2netp" else 1024, max(320, _down(4 * long_side, 32)))


def auto_values(long_side: float, saliency_backend: str = "isnet") -> dict[str, dict[str, Any]]:
    """section -> knob -> the value ``auto`` stands for, for images of median long side ``long_side`` px
    (the saliency input for ``saliency_backend``)."""
    if not long_side > 0:
        raise ValueError(f"the median long side of the images must be positive, got {long_side!r}")
    size = float(long_side)
    stride = 16 if size / 16 >= MIN_CELLS else 8
    crop = max(32, _down(min(size, MAX_CROP), 16))
    s = max(1.0, MIN_SEG_CELLS * stride / size)
    return {
        "saliency": {"input_size": saliency_input_size(size, saliency_backend)},
        "train_cls": {"output_stride": stride, "crop_size": crop,
                      "resize_long": [round(0.75 * size), round(1.25 * size)]},
        "train_seg": {"output_stride": stride, "crop_size": crop,
                      "scale_range": [round(2 * s / 3, 2), round(4 * s / 3, 2)]},
        "predict_seg": {"scales": [round(5 * s / 6, 2), round(s, 2), round(7 * s / 6, 2)]},
        "train_affinity": {"output_stride": stride, "crop_size": crop,
                           "scale_range": [round(2 * s / 3, 2), round(s, 2)],
                           "feature_stride": 8 if size / 8 >= MIN_AFFINITY_CELLS else 4},
    }


def auto_knobs(cfg: Any) -> list[str]:
    """The size knobs of config section ``cfg`` (typed ``... | Auto``) currently set to ``auto``; other
    knobs that take the word (``device: auto``) are not sizes."""
    hints = typing.get_type_hints(type(cfg))
    return [f.name for f in dataclasses.fields(cfg)
            if Auto in typing.get_args(hints[f.name]) and getattr(cfg, f.name) == AUTO]


def resolve(cfg: Any, section: str, long_side: float) -> Any:
    """``cfg`` with every ``auto`` knob replaced by its value for ``long_side``; explicit values stay."""
    names = auto_knobs(cfg)
    if not names:
        return cfg
    values = dict(auto_values(long_side, getattr(cfg, "backend", "isnet")).get(section, {}))
    if getattr(cfg, "backbone", None) == "resnet38d":
        values["output_stride"] = 8       # dilated by design
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"params key '{section}.{missing[0]}' has no 'auto' rule")
    return dataclasses.replace(cfg, **{n: values[n] for n in names})


def describe(cfg: Any, resolved: Any, section: str, long_side: float) -> str:
    """One log line naming what ``auto`` chose, or '' when nothing was auto."""
    names = auto_knobs(cfg)
    if not names:
        return ""
    chosen = ", ".join(f"{n} {getattr(resolved, n)}" for n in names)
    return f"{section}: auto sizes for images of median long side {long_side:g} px: {chosen}"


def sized(cfg: Any, section: str, dataset: Any) -> Any:
    """:func:`resolve` for ``dataset`` (a :class:`dataio.dataset.SegDataset`: its train images' median
    long side), printing what ``auto`` chose; a stage calls it before using ``cfg``."""
    if not auto_knobs(cfg):
        return cfg
    long_side = dataset.median_long_side("train")
    resolved = resolve(cfg, section, long_side)
    print(describe(cfg, resolved, section, long_side), flush=True)
    return resolved
