"""The embedded synthetic co-occurrence dataset: EPS's three WSSS failure modes, in miniature.

EPS ("Railroad is not a Train") names three ways image-level supervision fails; every image
here is built to show them, so the default pipeline has something real to fix on a CPU:

* **sparse coverage** - each object is a large *body* whose texture and colour are drawn from a
  pool shared by all classes, plus one small *key part* (7-19 % of the object) whose colours and
  pattern are fixed per class (the train's yellow/black cab, the boat's red/white flag, ...).
  A classifier needs only the key part, so its CAM covers little of the object.
* **boundary mismatch** - objects are silhouettes composed of polygons, ellipses and circles
  (wheels, legs, wings, masts), slightly rotated and mirrored, never boxes.
* **co-occurrence** - class ``c`` has its own context ``k = c + 1`` (train/rail, boat/water,
  plane/sky, car/road, cow/grass, bird/foliage, horse/track, skier/snow). Each object is, with
  probability ``prepare.co_occurrence_rate``, placed over a large region of its context (a band
  under it for ground contexts, a region around it for sky/foliage): visible context is 2-10x the
  object's area (median ~4x, at 128 px).
  Context pixels are background (0) in the ground-truth mask.

Rules (what the tests and ``data/metrics/prepare.json`` check):

* per image: ``n ~ U{min_objects..max_objects}`` objects, classes drawn uniformly with replacement,
  placed where their boxes overlap little (an object that finds no spot with <= 30 % box overlap
  in 40 tries is left out; none was in 2,400 three-object test layouts at 32-128 px);
  each object independently gets its context drawn with probability ``co_occurrence_rate``;
* a context without its class (a "lone" context) appears in an image with probability
  ``prepare.lone_context_prob`` (one region of a class absent from the image); contexts never appear
  otherwise, so ``P(context k | class k-1 absent)`` is at most that;
* an object "stands on its own context" when at least :data:`ON_CONTEXT_MIN_COVERAGE` of the
  background ring around it (width ~15 % of the object's size) is its own context
  (:func:`measure_objects`, computed from the written mask and context map);
* masks: 0 background (generic or context), ``c + 1`` class ``c``; exact (polygons are rasterised
  without anti-aliasing, so mask and image agree pixel for pixel). There is no 255 ignore band: at
  128 px a 1-pixel band would hide ~20 % of the object pixels, exactly the boundary pixels the
  boundary-mismatch failure is about. Each object's outermost pixel ring is drawn darker (an
  outline) but labelled with its class. Image-level labels are the classes left visible in the
  mask, so labels and masks always agree;
* context maps: ``k`` where context ``k`` is visible, 0 elsewhere (under objects included).

Images are 3-channel JPEGs (quality :data:`JPEG_QUALITY`, 4:4:4 chroma so the small key parts
keep their colour); masks and context maps are palette PNGs with the VOC palette. Every image is
drawn from its own ``numpy`` generator seeded with ``SeedSequence([seed, split, index])``, so
images do not depend on each other: generation runs in parallel and same params give
byte-identical files.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = ("train", "boat", "plane", "car", "cow", "bird", "horse", "skier")
CONTEXT_NAMES: tuple[str, ...] = ("rail", "water", "sky", "road", "grass", "foliage", "track", "snow")
SPLITS: tuple[str, ...] = ("train", "val")
ON_CONTEXT_MIN_COVERAGE = 0.15
JPEG_QUALITY = 95
IGNORE = 255

# object size: longest side as a fraction of the image side, shrunk when more objects share it
_SIZE_RANGE = (0.38, 0.56)
_SIZE_SCALE = {1: 1.0, 2: 0.84, 3: 0.72}
_MAX_BBOX_OVERLAP = 0.12          # accepted overlap of a new object's box with an earlier one
_MAX_ZONE_OVERLAP = 0.1           # ... and of their surroundings (see _zone_box), when possible
_PLACEMENT_TRIES = 40
_SHIFT = 4                        # cv2 fixed-point bits for sub-pixel polygon vertices
_SCALE = float(1 << _SHIFT)


# --------------------------------------------------------------------------- names and layout


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` object class names (5..8)."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"the synthetic dataset has 1..{len(CLASS_NAMES)} classes, asked for {num_classes}")
    return list(CLASS_NAMES[:num_classes])


def context_names(num_classes: int) -> list[str]:
    """Context ``k`` (1-based) belongs to class ``k - 1``."""
    return list(CONTEXT_NAMES[:num_classes])


def contexts_spec(num_classes: int) -> dict:
    """``contexts.json``: the reader's list form plus ``names`` / ``class_of_context``."""
    names = context_names(num_classes)
    return {
        "contexts": [{"id": k, "name": n, "class": k - 1, "class_name": CLASS_NAMES[k - 1]}
                     for k, n in enumerate(names, start=1)],
        "names": names,
        "class_of_context": {str(k): k - 1 for k in range(1, num_classes + 1)},
    }


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


# --------------------------------------------------------------------------- textures


class _Canvas:
    """Pixel grids shared by the texture functions of one image."""

    def __init__(self, size: int):
        self.size = size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.yy, self.xx = yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cell: float, aspect: float = 1.0) -> np.ndarray:
    """Value noise in [0, 1]: a random grid of ``cell``-pixel cells, bicubic-upsampled.

    ``aspect`` > 1 stretches cells vertically (grass blades).
    """
    gw = max(2, int(round(size / max(cell, 1.0))) + 2)
    gh = max(2, int(round(size / max(cell * aspect, 1.0))) + 2)
    grid = rng.random((gh, gw), dtype=np.float32)
    up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(up, 0.0, 1.0)


def _stripes(c: _Canvas, period: float, angle: float, phase: float, hard: bool) -> np.ndarray:
    t = (c.xx * math.cos(angle) + c.yy * math.sin(angle)) * (2 * math.pi / max(period, 2.0)) + phase
    s = np.sin(t)
    return (s > 0).astype(np.float32) if hard else (0.5 + 0.5 * s).astype(np.float32)


def _checker(c: _Canvas, period: float, angle: float) -> np.ndarray:
    k = 2 * math.pi / max(period, 2.0)
    u = c.xx * math.cos(angle) + c.yy * math.sin(angle)
    v = -c.xx * math.sin(angle) + c.yy * math.cos(angle)
    return ((np.sin(u * k) * np.sin(v * k)) > 0).astype(np.float32)


def _dots(c: _Canvas, period: float, radius: float, ox: float, oy: float) -> np.ndarray:
    period = max(period, 3.0)
    dx = np.mod(c.xx - ox, period) - period / 2
    dy = np.mod(c.yy - oy, period) - period / 2
    return (dx * dx + dy * dy < radius * radius).astype(np.float32)


def _gradient(c: _Canvas, angle: float) -> np.ndarray:
    u = c.xx * math.cos(angle) + c.yy * math.sin(angle)
    lo, hi = float(u.min()), float(u.max())
    return ((u - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _random_pattern(c: _Canvas, rng: np.random.Generator, kinds: Sequence[str], scale: float) -> np.ndarray:
    """One of ``kinds``, its period around ``scale`` pixels, in [0, 1]."""
    kind = kinds[int(rng.integers(len(kinds)))]
    period = scale * float(rng.uniform(0.6, 1.5))
    angle = float(rng.uniform(0, math.pi))
    if kind == "noise":
        return _smooth_noise(rng, c.size, period * 0.6)
    if kind == "stripes":
        return _stripes(c, period, angle, float(rng.uniform(0, 2 * math.pi)), hard=bool(rng.random() < 0.5))
    if kind == "checker":
        return _checker(c, period, angle)
    if kind == "dots":
        return _dots(c, period, period * float(rng.uniform(0.2, 0.35)), *rng.uniform(0, period, 2))
    if kind == "gradient":
        return _gradient(c, angle)
    raise ValueError(kind)


def _mix(c1: Sequence[float], c2: Sequence[float], t: np.ndarray) -> np.ndarray:
    """HxWx3 colours ``c1 + (c2 - c1) * t`` (cv2: numpy is slow on a trailing axis of 3)."""
    t = t.astype(np.float32, copy=False)
    return cv2.merge([cv2.addWeighted(t, float(c2[ch]) - float(c1[ch]), t, 0.0, float(c1[ch])) for ch in range(3)])


def _paste(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    """``dst[mask] = src[mask]`` in place (cv2: much faster than boolean indexing of HxWx3)."""
    out = cv2.copyTo(src, mask.astype(np.uint8, copy=False), dst)
    if out is not dst:
        dst[...] = out


def _shade(img: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Multiply every channel by an HxW factor, in place."""
    f = factor.astype(np.float32, copy=False)
    return cv2.multiply(img, cv2.merge([f, f, f]), dst=img)


def _paint(dst: np.ndarray, mask: np.ndarray, colour: Sequence[float]) -> None:
    _paste(dst, np.full_like(dst, colour), mask)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


# --------------------------------------------------------------------------- object designs


@dataclass(frozen=True)
class _Part:
    role: str                 # body | dark | key | key2 (painted in that order)
    kind: str                 # poly | ellipse | circle
    data: tuple               # poly: ((x, y), ...); ellipse: (cx, cy, rx, ry); circle: (cx, cy, r * h)


@dataclass(frozen=True)
class _ClassDesign:
    name: str
    context: str
    aspect: float                                  # width / height
    parts: Callable[[Callable[..., float]], list]  # jitter -> [_Part] in unit box coords, front at x = 1
    key_colours: tuple                             # (a, b) RGB of the key part's two-colour pattern
    key_pattern: str                               # hstripes | vstripes | dots | diag | check
    key2_colour: tuple = (0, 0, 0)
    ground: bool = True                            # context under the object (else around it)
    ground_top: float = 0.55                       # where the ground band starts, in object heights


def _rect(x0, y0, x1, y1):
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def _P(role, kind, *data):
    return _Part(role, kind, tuple(data) if kind != "poly" else tuple(data[0]))


def _train_parts(j):
    nose = j(0.80, 0.04)
    wheels = [_P("dark", "circle", x, 0.9, 0.09) for x in (j(0.1), j(0.26), j(0.62), j(0.8))]
    return [
        _P("body", "poly", ((0, 0.12), (nose, 0.12), (1.0, j(0.42)), (1.0, 0.84), (0, 0.84))),
        _P("dark", "poly", _rect(0.02, 0.84, 0.98, 0.9)), *wheels,
        _P("key", "poly", ((nose - 0.03, 0.16), (nose + 0.06, 0.16), (0.97, 0.42), (0.97, 0.62),
                           (nose - 0.03, 0.62))),
    ]


def _boat_parts(j):
    mast = j(0.45, 0.05)
    return [
        _P("body", "poly", ((0.0, j(0.55)), (1.0, j(0.5)), (j(0.86), 0.93), (j(0.14), 0.93))),
        _P("body", "poly", _rect(j(0.28), j(0.36), j(0.64), 0.56)),
        _P("dark", "poly", _rect(mast, 0.03, mast + 0.06, 0.37)),
        _P("key", "poly", ((mast + 0.06, 0.03), (mast + j(0.36), j(0.12)), (mast + 0.06, j(0.24)))),
    ]


def _plane_parts(j):
    return [
        _P("body", "ellipse", 0.5, 0.55, 0.47, j(0.13, 0.02)),
        _P("body", "poly", ((0.42, 0.58), (0.6, 0.58), (j(0.46), 0.99), (j(0.36), 0.99))),
        _P("body", "poly", ((0.46, 0.5), (0.56, 0.5), (j(0.44), 0.24), (j(0.39), 0.24))),
        _P("dark", "ellipse", 0.88, 0.5, 0.05, 0.04),
        _P("key", "poly", ((0.03, 0.53), (0.16, 0.53), (j(0.1), 0.1), (0.02, 0.1))),
    ]


def _car_parts(j):
    roof = j(0.1, 0.03)
    return [
        _P("body", "poly", ((0.0, 0.52), (0.04, 0.44), (0.96, 0.44), (1.0, 0.52), (1.0, 0.8), (0.0, 0.8))),
        _P("body", "poly", ((0.2, 0.45), (j(0.3), roof), (j(0.68), roof), (0.83, 0.45))),
        _P("key", "poly", ((0.31, 0.42), (0.35, roof + 0.07), (0.48, roof + 0.07), (0.48, 0.42))),
        _P("key", "poly", ((0.51, 0.42), (0.51, roof + 0.07), (0.66, roof + 0.07), (0.76, 0.42))),
        _P("dark", "circle", j(0.22), 0.8, 0.18),
        _P("dark", "circle", j(0.78), 0.8, 0.18),
    ]


def _cow_parts(j):
    legs = [_P("body", "poly", _rect(x, 0.5, x + 0.065, 0.98)) for x in (j(0.2), j(0.3), j(0.57), j(0.67))]
    return [
        _P("body", "ellipse", 0.45, 0.42, 0.34, j(0.22, 0.02)), *legs,
        _P("body", "poly", ((0.7, 0.3), (0.84, 0.2), (0.87, 0.4), (0.72, 0.52))),
        _P("dark", "poly", ((0.11, 0.35), (j(0.03), 0.72), (0.07, 0.72), (0.14, 0.38))),
        _P("key", "ellipse", 0.88, 0.3, 0.1, j(0.15, 0.02)),
    ]


def _bird_parts(j):
    return [
        _P("body", "ellipse", 0.45, 0.55, 0.28, 0.2),
        _P("body", "poly", ((0.22, 0.5), (0.0, j(0.36)), (0.0, j(0.7)), (0.22, 0.62))),
        _P("body", "poly", ((0.28, 0.5), (0.62, 0.48), (j(0.42), j(0.08)))),
        _P("dark", "poly", _rect(0.39, 0.7, 0.42, 0.97)),
        _P("dark", "poly", _rect(0.5, 0.7, 0.53, 0.97)),
        _P("key", "circle", 0.76, 0.38, j(0.14, 0.015)),
        _P("key2", "poly", ((0.86, 0.32), (1.0, j(0.4)), (0.86, 0.46))),
    ]


def _horse_parts(j):
    legs = [_P("body", "poly", _rect(x, 0.5, x + 0.05, 1.0)) for x in (j(0.17), j(0.25), j(0.55), j(0.63))]
    return [
        _P("body", "ellipse", 0.42, 0.45, 0.3, 0.16), *legs,
        _P("body", "poly", ((0.62, 0.42), (0.7, 0.3), (0.82, j(0.07)), (0.92, 0.12), (0.78, 0.48))),
        _P("body", "ellipse", 0.9, 0.13, 0.09, 0.07),
        _P("dark", "poly", ((0.13, 0.38), (j(0.03), 0.76), (0.08, 0.77), (0.15, 0.42))),
        _P("key", "poly", ((0.32, 0.26), (0.54, 0.26), (0.52, 0.45), (0.34, 0.45))),
    ]


def _skier_parts(j):
    return [
        _P("body", "poly", _rect(0.3, 0.22, 0.7, 0.6)),
        _P("body", "poly", _rect(0.32, 0.58, 0.47, 0.93)),
        _P("body", "poly", _rect(0.53, 0.58, 0.68, 0.93)),
        _P("body", "poly", ((0.3, 0.25), (j(0.06), j(0.55)), (0.16, 0.58), (0.33, 0.38))),
        _P("body", "poly", ((0.7, 0.25), (j(0.94), j(0.55)), (0.84, 0.58), (0.67, 0.38))),
        _P("dark", "poly", _rect(0.0, 0.93, 1.0, 1.0)),
        _P("key", "circle", 0.5, 0.12, 0.11),
    ]


_DESIGNS: tuple[_ClassDesign, ...] = (
    _ClassDesign("train", "rail", 2.4, _train_parts, ((250, 205, 25), (20, 20, 20)), "hstripes", ground_top=0.6),
    _ClassDesign("boat", "water", 1.5, _boat_parts, ((225, 25, 35), (250, 250, 250)), "vstripes", ground_top=0.62),
    _ClassDesign("plane", "sky", 2.0, _plane_parts, ((255, 125, 0), (255, 255, 255)), "dots", ground=False),
    _ClassDesign("car", "road", 2.0, _car_parts, ((40, 220, 240), (245, 255, 255)), "diag", ground_top=0.55),
    _ClassDesign("cow", "grass", 1.6, _cow_parts, ((245, 110, 175), (255, 255, 255)), "check", ground_top=0.5),
    _ClassDesign("bird", "foliage", 1.3, _bird_parts, ((230, 20, 20), (120, 0, 0)), "dots",
                 key2_colour=(255, 215, 0), ground=False),
    _ClassDesign("horse", "track", 1.3, _horse_parts, ((125, 35, 200), (240, 190, 40)), "hstripes", ground_top=0.55),
    _ClassDesign("skier", "snow", 0.55, _skier_parts, ((150, 240, 30), (15, 15, 15)), "hstripes", ground_top=0.5),
)
assert tuple(d.name for d in _DESIGNS) == CLASS_NAMES and tuple(d.context for d in _DESIGNS) == CONTEXT_NAMES


@dataclass
class _Placed:
    """One object in image coordinates."""

    cls: int
    on_context: bool
    polys: list                      # [(role, Nx2 float32 pixel coords)]
    bbox: tuple                      # x0, y0, x1, y1 (floats)
    size: tuple                      # w, h of the unrotated object


def _shape_points(part: _Part, w: float, h: float) -> np.ndarray:
    if part.kind == "poly":
        pts = np.asarray(part.data, np.float32)
    else:
        if part.kind == "ellipse":
            cx, cy, rx, ry = part.data
        else:                                          # circle: radius in object heights
            cx, cy, r = part.data
            rx, ry = r * h / w, r
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False, dtype=np.float32)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    return pts


def _layout_object(design: _ClassDesign, rng: np.random.Generator, w: float, h: float) -> list:
    """Parts of one object, centred on (0, 0), mirrored and rotated at random."""
    def jitter(v: float, s: float = 0.03) -> float:
        return v + float(rng.uniform(-s, s))

    parts = design.parts(jitter)
    flip = rng.random() < 0.5
    angle = math.radians(float(rng.uniform(-8, 8)))
    ca, sa = math.cos(angle), math.sin(angle)
    out = []
    for part in parts:
        pts = _shape_points(part, w, h)
        px = (pts[:, 0] - 0.5) * w
        py = (pts[:, 1] - 0.5) * h
        if flip:
            px = -px
        out.append((part.role, np.stack([px * ca - py * sa, px * sa + py * ca], axis=1)))
    return out


def _fill(mask: np.ndarray, pts: np.ndarray, value: int = 1) -> None:
    cv2.fillPoly(mask, [np.round(pts * _SCALE).astype(np.int32)], value, lineType=cv2.LINE_8, shift=_SHIFT)


def _overlap(a: tuple, b: tuple) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(area, 1e-6)


def _zone_box(bbox: tuple) -> tuple:
    """An object's surroundings: its box grown by 30 % (+2 px) per side (where its context must show)."""
    x0, y0, x1, y1 = bbox
    mx, my = 0.3 * (x1 - x0) + 2, 0.3 * (y1 - y0) + 2
    return (x0 - mx, y0 - my, x1 + mx, y1 + my)


def _place_objects(cfg: Any, rng: np.random.Generator) -> list[_Placed]:
    s = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes = rng.integers(0, cfg.num_classes, size=n)
    on_ctx = rng.random(n) < cfg.co_occurrence_rate
    placed: list[_Placed] = []
    for i in range(n):
        design = _DESIGNS[int(classes[i])]
        long_side = s * float(rng.uniform(*_SIZE_RANGE)) * _SIZE_SCALE[n]
        w, h = (long_side, long_side / design.aspect) if design.aspect >= 1 else (long_side * design.aspect, long_side)
        polys = _layout_object(design, rng, w, h)
        allpts = np.concatenate([p for _, p in polys])
        lo, hi = allpts.min(axis=0), allpts.max(axis=0)
        best = None
        for _ in range(_PLACEMENT_TRIES):
            cx = float(rng.uniform(1 - lo[0], s - 1 - hi[0])) if s - 2 > hi[0] - lo[0] else s / 2
            cy = float(rng.uniform(1 - lo[1], s - 1 - hi[1])) if s - 2 > hi[1] - lo[1] else s / 2
            bbox = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            worst = max((_overlap(bbox, p.bbox) for p in placed), default=0.0)
            # prefer spots where the objects' surroundings (their contexts) do not collide either
            crowd = max((_overlap(_zone_box(bbox), _zone_box(p.bbox)) for p in placed), default=0.0)
            score = (max(worst - _MAX_BBOX_OVERLAP, 0.0), crowd)
            if best is None or score < best[0]:
                best = (score, worst, cx, cy, bbox)
            if worst <= _MAX_BBOX_OVERLAP and crowd <= _MAX_ZONE_OVERLAP:
                break
        _, worst, cx, cy, bbox = best
        if worst > 0.3:          # no room left: leave the object out rather than hide another
            continue
        shifted = [(role, (p + np.asarray([cx, cy], np.float32)).astype(np.float32)) for role, p in polys]
        placed.append(_Placed(int(classes[i]), bool(on_ctx[i]), shifted, bbox, (w, h)))
    return placed


# --------------------------------------------------------------------------- contexts


def _context_region(design: _ClassDesign, bbox: tuple, rng: np.random.Generator, s: int) -> np.ndarray:
    """Binary region (HxW uint8) of an object's context: a band under it or a region around it."""
    x0, y0, x1, y1 = bbox
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = np.zeros((s, s), np.uint8)
    if design.context == "foliage":
        r0 = max(w, h)
        for _ in range(int(rng.integers(6, 9))):
            ccx = cx + float(rng.uniform(-0.6, 0.6)) * w / 2
            ccy = cy + float(rng.uniform(-0.5, 0.8)) * h / 2
            rr = r0 * float(rng.uniform(0.4, 0.6))
            cv2.circle(region, (int(round(ccx * _SCALE)), int(round(ccy * _SCALE))), int(round(rr * _SCALE)),
                       1, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)
        return region
    if not design.ground:                         # sky: a boxy super-ellipse around the object
        ax = w / 2 * float(rng.uniform(1.6, 2.1))
        ay = h / 2 * float(rng.uniform(2.2, 3.0))
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        c, si = np.cos(t), np.sin(t)
        px = cx + ax * np.sign(c) * np.abs(c) ** 0.5
        py = cy + ay * np.sign(si) * np.abs(si) ** 0.5
        _fill(region, np.stack([px, py], 1).astype(np.float32))
        return region
    # ground band: from part-way up the object to well below it, about twice its width
    half = max(w, 0.8 * h) / 2 * float(rng.uniform(1.9, 2.6))       # tall objects (skier) too
    top = y0 + design.ground_top * h
    bottom = y1 + max(h, 0.45 * w) * float(rng.uniform(0.5, 1.0))     # flat objects get deep bands too
    xs = np.linspace(cx - half, cx + half, 13)
    style = design.context
    if style in ("water", "track"):
        amp = (0.05 if style == "water" else 0.08) * h
        ys = top + amp * np.sin(xs / max(w, 1) * 2 * math.pi * float(rng.uniform(1, 2.5)) + float(rng.uniform(0, 6.3)))
    elif style in ("grass", "snow"):
        ys = top + rng.uniform(-0.08, 0.08, xs.shape) * h
    else:                                          # rail, road: straight
        ys = np.full_like(xs, top)
    spread = w * float(rng.uniform(0.0, 0.25))
    pts = list(zip(xs, ys)) + [(cx + half + spread, bottom), (cx - half - spread, bottom)]
    _fill(region, np.asarray(pts, np.float32))
    return region


def _context_texture(name: str, c: _Canvas, rng: np.random.Generator, bbox: tuple) -> np.ndarray:
    """Colour field (HxWx3 float) of a context; cues (rails, lane marks, branch) sit by the object."""
    s = c.size
    x0, y0, x1, y1 = bbox
    w, h = x1 - x0, y1 - y0
    fine = _smooth_noise(rng, s, 1.5)
    if name == "rail":
        img = _mix((112, 100, 90), (150, 138, 124), 0.6 * fine + 0.4 * _smooth_noise(rng, s, 4))
        rail_y = y1 - 0.04 * h
        thick = max(1.0, 0.035 * h)
        sleeper = max(4.0, 0.14 * w)
        ties = (np.mod(c.xx - float(rng.uniform(0, sleeper)), sleeper) < sleeper * 0.35) & \
               (c.yy > rail_y - 0.02 * h) & (c.yy < rail_y + 0.22 * h)
        _paint(img, ties, (92, 66, 46))
        for ry in (rail_y, rail_y + 0.16 * h):
            _paint(img, np.abs(c.yy - ry) <= thick, (175, 175, 182))
        return img
    if name == "water":
        period = max(3.0, 0.06 * s)
        sway = 1.5 * np.sin(c.xx * 2 * math.pi / (3 * period) + float(rng.uniform(0, 6.3)))
        t = np.sin(c.yy * 2 * math.pi / period + sway)
        return _mix((35, 85, 150), (80, 135, 200), 0.5 + 0.35 * t + 0.15 * (fine - 0.5))
    if name == "sky":
        grad = np.clip((c.yy - (y0 - 1.5 * h)) / max(4 * h, 1), 0, 1)
        img = _mix((105, 155, 225), (185, 210, 242), grad)
        clouds = np.clip((_smooth_noise(rng, s, s / 6) - 0.55) * 4, 0, 1) * 0.7
        return _shade(img, 1 - clouds) + _mix((0, 0, 0), (245, 247, 252), clouds)
    if name == "road":
        img = _mix((62, 62, 68), (92, 92, 98), fine)
        line_y = y1 + 0.3 * h
        dash = max(4.0, 0.22 * w)
        marks = (np.abs(c.yy - line_y) <= max(1.0, 0.035 * h)) & (np.mod(c.xx, dash) < dash * 0.55)
        _paint(img, marks, (230, 220, 150))
        return img
    if name == "grass":
        blades = _smooth_noise(rng, s, 1.5, aspect=5.0)
        return _mix((40, 105, 38), (100, 170, 62), 0.65 * blades + 0.35 * _smooth_noise(rng, s, 6))
    if name == "foliage":
        leaves = (_smooth_noise(rng, s, 2.5) > 0.5).astype(np.float32)
        img = _mix((62, 88, 28), (150, 148, 44), 0.7 * leaves + 0.3 * fine)
        by = y1 - 0.05 * h
        slope = float(rng.uniform(-0.25, 0.25))
        branch = np.abs(c.yy - (by + slope * (c.xx - (x0 + x1) / 2))) <= max(1.0, 0.06 * h)
        _paint(img, branch, (105, 70, 40))
        return img
    if name == "track":
        rake = _stripes(c, max(3.0, 0.05 * s), float(rng.uniform(0.3, 0.8)), 0.0, hard=False)
        return _mix((176, 146, 100), (205, 176, 128), 0.55 * rake + 0.45 * fine)
    if name == "snow":
        img = _mix((200, 210, 232), (240, 243, 250), 0.6 * _smooth_noise(rng, s, s / 8) + 0.4 * fine)
        ang = float(rng.uniform(-0.5, 0.5))
        base = y1 + 0.25 * h
        for off in (0.0, max(2.0, 0.08 * w)):
            track = np.abs((c.yy - base) - ang * (c.xx - (x0 + x1) / 2) - off) <= 0.6
            _paint(img, track, (165, 172, 192))
        return img
    raise ValueError(name)


# --------------------------------------------------------------------------- backgrounds and objects


def _background(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Muted, textured generic background (one texture, or two split by a slanted line)."""
    kinds = ("noise", "stripes", "checker", "dots", "gradient")

    def layer() -> np.ndarray:
        h, sat, val = float(rng.random()), float(rng.uniform(0.04, 0.3)), float(rng.uniform(0.38, 0.78))
        c1 = _hsv(h, sat, val)
        c2 = _hsv(h + float(rng.uniform(-0.08, 0.08)), sat * float(rng.uniform(0.5, 1.3)),
                  np.clip(val + float(rng.choice([-1, 1])) * float(rng.uniform(0.08, 0.2)), 0.1, 0.95))
        t = _random_pattern(c, rng, kinds, c.size * float(rng.uniform(0.06, 0.2)))
        amp = float(rng.uniform(0.35, 0.8))
        return _mix(c1, c2, amp * t + (1 - amp) * 0.5)

    img = layer()
    if rng.random() < 0.5:
        other = layer()
        ang = float(rng.uniform(-0.35, 0.35))
        y = c.size * float(rng.uniform(0.3, 0.7))
        lower = c.yy > y + math.tan(ang) * (c.xx - c.size / 2)
        _paste(img, other, lower)
    return _shade(img, 0.85 + 0.3 * _smooth_noise(rng, c.size, c.size / 2))


def _key_texture(design: _ClassDesign, c: _Canvas, h: float) -> np.ndarray:
    a, b = design.key_colours
    period = max(2.5, 0.12 * h)
    if design.key_pattern == "hstripes":
        t = _stripes(c, period, math.pi / 2, 0.0, hard=True)
    elif design.key_pattern == "vstripes":
        t = _stripes(c, period, 0.0, 0.0, hard=True)
    elif design.key_pattern == "diag":
        t = _stripes(c, period * 1.5, math.pi / 4, 0.0, hard=True) * 0.8
    elif design.key_pattern == "check":
        t = _checker(c, period, 0.0)
    elif design.key_pattern == "dots":
        t = _dots(c, period * 1.6, period * 0.45, 0.0, 0.0)
    else:
        raise ValueError(design.key_pattern)
    return _mix(a, b, t)


def _body_colour(rng: np.random.Generator, under: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, float]:
    """A saturated body colour far from what lies under the object (salient) and from its key part."""
    best, best_d = None, -1.0
    for _ in range(30):
        col = _hsv(float(rng.random()), float(rng.uniform(0.45, 0.95)), float(rng.uniform(0.4, 0.95)))
        d = min(float(np.linalg.norm(col - under)), float(np.linalg.norm(col - key)) * 1.2)
        if d > best_d:
            best, best_d = col, d
        if d >= 110:
            break
    return best, best_d


def _paint_object(img: np.ndarray, obj: _Placed, c: _Canvas, rng: np.random.Generator,
                  body_kinds: Sequence[str]) -> np.ndarray:
    """Paint one object in place; return its silhouette (HxW bool)."""
    s = c.size
    design = _DESIGNS[obj.cls]
    w, h = obj.size
    roles = {}
    for role, pts in obj.polys:
        m = roles.setdefault(role, np.zeros((s, s), np.uint8))
        _fill(m, pts)
    sil = np.zeros((s, s), bool)
    for m in roles.values():
        sil |= m.astype(bool)
    under = np.asarray(cv2.mean(img, sil.astype(np.uint8))[:3], np.float32)   # what the object must stand out from
    body_c, _ = _body_colour(rng, under, np.asarray(design.key_colours[0], np.float32))
    hsv_shift = float(rng.uniform(0.02, 0.1)) * float(rng.choice([-1, 1]))
    r, g, b = body_c / 255.0
    hh, ss, vv = colorsys.rgb_to_hsv(r, g, b)
    body_c2 = _hsv(hh + hsv_shift, ss, float(np.clip(vv * float(rng.uniform(0.6, 0.85)), 0, 1)))
    t = _random_pattern(c, rng, body_kinds, max(3.0, h * float(rng.uniform(0.15, 0.4))))
    amp = float(rng.uniform(0.3, 0.75))
    y0 = obj.bbox[1]
    light = 1.12 - 0.24 * np.clip((c.yy - y0) / max(obj.bbox[3] - y0, 1), 0, 1)
    layers = {
        "body": lambda: _shade(_mix(body_c, body_c2, amp * t), light),
        "dark": lambda: _mix((38, 38, 44), (70, 70, 78), _smooth_noise(rng, s, 2)),
        "key": lambda: _key_texture(design, c, h),
        "key2": lambda: np.full((s, s, 3), design.key2_colour, np.float32),
    }
    for role in ("body", "dark", "key", "key2"):
        if role in roles:
            _paste(img, layers[role](), roles[role])
    return sil


def _inner_outline(inst: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of another instance (or background)."""
    pad = np.pad(inst, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    diff = np.zeros(inst.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        diff |= pad[1 + dy:pad.shape[0] - 1 + dy, 1 + dx:pad.shape[1] - 1 + dx] != centre
    return diff & (inst > 0)


@dataclass
class Sample:
    """One generated image with its ground truth and what the generator intended."""

    image: np.ndarray               # HxWx3 uint8 RGB
    mask: np.ndarray                # HxW uint8: 0 background, c+1 class c
    context: np.ndarray             # HxW uint8: 0 none, k context k
    labels: np.ndarray              # (C,) float32, the classes left in the mask
    object_classes: list[int] = field(default_factory=list)
    object_on_context: list[bool] = field(default_factory=list)
    lone_context: int = 0           # k of a context drawn without its class (0 = none)


def generate_sample(cfg: Any, split_index: int, index: int) -> Sample:
    """Image ``index`` of split ``split_index`` (0 train, 1 val); depends only on these and ``cfg``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(split_index), int(index)]))
    s = int(cfg.image_size)
    c = _Canvas(s)
    img = _background(c, rng)
    objects = _place_objects(cfg, rng)
    ctx = np.zeros((s, s), np.uint8)

    regions: list[tuple] = []   # (k, region, protected zone or None, bbox)
    lone = 0
    present = {o.cls for o in objects}
    absent = [k for k in range(cfg.num_classes) if k not in present]
    if absent and rng.random() < cfg.lone_context_prob:
        cls = absent[int(rng.integers(len(absent)))]
        design = _DESIGNS[cls]
        side = s * float(rng.uniform(*_SIZE_RANGE)) * 0.8
        w, h = (side, side / design.aspect) if design.aspect >= 1 else (side * design.aspect, side)
        cx, cy = rng.uniform(w / 2, s - w / 2), rng.uniform(h / 2, s - h / 2)
        bbox = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        regions.append((cls + 1, _context_region(design, bbox, rng, s), None, bbox))
        lone = cls + 1
    for o in objects:
        if o.on_context:
            design = _DESIGNS[o.cls]
            x0, y0, x1, y1 = _zone_box(o.bbox)
            zone = np.zeros((s, s), bool)
            zone[max(0, int(y0)):int(math.ceil(y1)) + 1, max(0, int(x0)):int(math.ceil(x1)) + 1] = True
            regions.append((o.cls + 1, _context_region(design, o.bbox, rng, s), zone, o.bbox))
    textures = [_context_texture(CONTEXT_NAMES[k - 1], c, rng, bbox) for k, _, _, bbox in regions]
    for (k, region, _, _), tex in zip(regions, textures):
        _paste(img, tex, region)
        np.putmask(ctx, region.astype(bool), k)
    # each object keeps its own context next to it where a later region overlapped it
    for (k, region, zone, _), tex in zip(regions, textures):
        if zone is not None:
            m = region.astype(bool) & zone
            _paste(img, tex, m)
            np.putmask(ctx, m, k)

    inst = np.zeros((s, s), np.int32)
    body_kinds = ("noise", "stripes", "checker", "dots", "gradient")
    for i, o in enumerate(objects, start=1):
        sil = _paint_object(img, o, c, rng, body_kinds)
        np.putmask(inst, sil, i)
    _paste(img, img * 0.45, _inner_outline(inst))
    cls_of_inst = np.asarray([0] + [o.cls + 1 for o in objects], np.uint8)
    mask = cls_of_inst[inst]
    ctx[inst > 0] = 0

    img += rng.normal(0.0, 2.5, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    labels = np.zeros(cfg.num_classes, np.float32)
    present_ids = np.unique(mask)
    present_ids = present_ids[(present_ids > 0) & (present_ids != IGNORE)]
    labels[present_ids.astype(np.int64) - 1] = 1.0
    return Sample(image, mask, ctx, labels, [o.cls for o in objects], [o.on_context for o in objects], lone)


# --------------------------------------------------------------------------- measuring co-occurrence


@dataclass(frozen=True)
class ObjectContext:
    """One object region and how much of the background around it is its own context."""

    cls: int
    pixels: int
    coverage: float                 # share of its background ring that is its own context

    @property
    def on_own_context(self) -> bool:
        return self.coverage >= ON_CONTEXT_MIN_COVERAGE


def measure_objects(mask: np.ndarray, context: np.ndarray, context_class: dict[int, int]) -> list[ObjectContext]:
    """Connected object regions of a mask and their own-context coverage (see module rules).

    Ignore pixels touching a class are counted with it (VOC's boundary band); regions smaller than
    0.1 % of the image (or 4 pixels) are fragments, not objects.
    """
    own: dict[int, list[int]] = {}
    for k, c in context_class.items():
        own.setdefault(int(c), []).append(int(k))
    background = mask == 0
    band = mask == IGNORE
    kernel3 = np.ones((3, 3), np.uint8)
    min_pixels = max(4, int(0.001 * mask.size))
    out: list[ObjectContext] = []
    for value in np.unique(mask):
        if value == 0 or value == IGNORE:
            continue
        cls = int(value) - 1
        region = (mask == value).astype(np.uint8)
        allowed = (band | (mask == value)).astype(np.uint8)
        for _ in range(3):        # reclaim the outline band, through thin all-band parts (masts, legs)
            region = cv2.dilate(region, kernel3) & allowed
        n, comps, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        ks = own.get(cls, [])
        for j in range(1, n):
            area = int(stats[j, cv2.CC_STAT_AREA])
            if area < min_pixels:
                continue
            comp = (comps == j).astype(np.uint8)
            r = max(2, int(round(0.15 * math.sqrt(area))))
            ring = cv2.dilate(comp, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
            ring = ring.astype(bool) & background
            total = int(ring.sum())
            hit = int(np.isin(context[ring], ks).sum()) if ks and total else 0
            out.append(ObjectContext(cls, area, hit / total if total else 0.0))
    return out


# --------------------------------------------------------------------------- writing the dataset


@functools.lru_cache(maxsize=1)
def _voc_palette() -> tuple[int, ...]:
    from dataio.label_png import voc_colormap  # one VOC palette everywhere

    return tuple(voc_colormap().reshape(-1).tolist())


def save_palette_png(index: np.ndarray, path: Path) -> None:
    """An index map (mask or context map) as a palette PNG with the VOC colours."""
    im = Image.fromarray(np.ascontiguousarray(index, dtype=np.uint8))
    im.putpalette(_voc_palette())
    im.save(path, format="PNG")


def _write_sample(sample: Sample, root: Path, iid: str) -> None:
    Image.fromarray(sample.image).save(root / "JPEGImages" / f"{iid}.jpg", format="JPEG",
                                       quality=JPEG_QUALITY, subsampling=0)
    save_palette_png(sample.mask, root / "SegmentationClass" / f"{iid}.png")
    save_palette_png(sample.context, root / "ContextMaps" / f"{iid}.png")


def _generate_one(cfg: Any, root: str, job: tuple[int, int]) -> dict:
    split_index, index = job
    cv2.setNumThreads(1)
    sample = generate_sample(cfg, split_index, index)
    iid = image_id(SPLITS[split_index], index)
    _write_sample(sample, Path(root), iid)
    return {"id": iid, "split": SPLITS[split_index], "labels": sample.labels,
            "objects": sample.object_classes, "on_context": sample.object_on_context,
            "lone_context": sample.lone_context}


def write_dataset(cfg: Any, root: str | Path, *, workers: int = 1, progress: bool = True) -> list[dict]:
    """Generate the whole dataset into ``root`` (VOC layout); returns one record per image.

    ``cfg`` is a :class:`core.config.PrepareConfig`. Files: ``JPEGImages/``, ``SegmentationClass/``,
    ``ContextMaps/``, ``ImageSets/Segmentation/{train,val}.txt``, ``cls_labels.npy``, ``labels.csv``,
    ``class_names.txt``, ``contexts.json``. The caller makes ``root`` appear atomically.
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ContextMaps", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(0, i) for i in range(cfg.num_train)] + [(1, i) for i in range(cfg.num_val)]
    work = functools.partial(_generate_one, cfg, str(root))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="generating synthetic images", unit="img", mininterval=0.5)
    records: list[dict] = []
    try:
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ctx.Pool(workers) as pool:
                for rec in pool.imap(work, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8)))):
                    records.append(rec)
                    if bar:
                        bar.update()
        else:
            for job in jobs:
                records.append(work(job))
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()

    names = class_names(cfg.num_classes)
    for split in SPLITS:
        ids = [r["id"] for r in records if r["split"] == split]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    # fresh arrays: pickled bytes must not depend on whether records crossed a process boundary
    table = {r["id"]: np.asarray(r["labels"].tolist(), np.float32) for r in records}
    np.save(root / "cls_labels.npy", table, allow_pickle=True)
    rows = ["image_id,labels"] + [f"{r['id']},{' '.join(names[c] for c in np.flatnonzero(r['labels']))}"
                                  for r in records]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "class_names.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "contexts.json").write_text(json.dumps(contexts_spec(cfg.num_classes), indent=2) + "\n")
    return records
