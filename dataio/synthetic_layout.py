"""The generator's object designs (silhouettes of parts in a unit box, key part, context) and where objects go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

# object size: longest side as a fraction of the image side, shrunk when more objects share it
_SIZE_RANGE = (0.38, 0.56)


_SIZE_SCALE = {1: 1.0, 2: 0.84, 3: 0.72}


_MAX_BBOX_OVERLAP = 0.12          # accepted overlap of a new object's box with an earlier one


_MAX_ZONE_OVERLAP = 0.1           # ... and of their surroundings (see _zone_box), when possible


_PLACEMENT_TRIES = 40


_SHIFT = 4                        # cv2 fixed-point bits for sub-pixel polygon vertices


_SCALE = float(1 << _SHIFT)


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
