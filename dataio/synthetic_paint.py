"""The generator's painting: textures, backgrounds, context regions and their textures, objects with their key parts and outlines.
"""

from __future__ import annotations

import colorsys
import math
from typing import Sequence

import cv2
import numpy as np

from dataio.synthetic_layout import _DESIGNS, _SCALE, _SHIFT, _ClassDesign, _fill, _Placed


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
