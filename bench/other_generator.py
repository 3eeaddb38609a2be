"""A second co-occurrence dataset, painted independently of ``dataio/synthetic*``: the check on data the
defaults were not chosen on.

    python bench/other_generator.py --out /tmp/other                 # 480 train / 160 val images of 160 px
    python bench/compare_variants.py --target evaluate --out /tmp/cv_other \\
        --variant eps:dataset.kind=voc,dataset.root=/tmp/other \\
        --variant cam:dataset.kind=voc,dataset.root=/tmp/other,train_cls.method=cam

Six classes, each with its own context drawn around it 80% of the time (fish in a pond, kite in clouds, bus on
a street, sheep on a meadow, ship in a harbour, bird on a branch; 5% of images also show a context alone) over
striped, checked, noisy or graded backgrounds. Unlike the embedded set, most contexts are compact blobs and
boxes that a salient-object detector takes for objects. It writes the VOC layout ``prepare`` reads for
``dataset.kind: voc`` (JPEGImages, SegmentationClass, ImageSets/Segmentation, class_names.txt) with
``ContextMaps/`` and ``contexts.json`` for the co-occurrence confusion m_kc. Nothing in it was tuned to the
pipeline's results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CLASSES = ("fish", "kite", "bus", "sheep", "ship", "bird")
CONTEXTS = ("pond", "clouds", "street", "meadow", "harbor", "branch")
CO_OCCURRENCE, LONE_CONTEXT = 0.8, 0.05
HUES = ((30, 150, 240), (200, 60, 200), (230, 190, 40), (235, 235, 225), (180, 40, 40), (60, 110, 60))
CONTEXT_COLOURS = ((40, 110, 140), (215, 225, 240), (95, 95, 100), (70, 150, 50), (25, 45, 95), (100, 70, 40))


def noise(rng, h, w, scale, amp):
    n = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def background(rng, h, w):
    img = np.ones((h, w, 3), np.float32) * rng.uniform(60, 200, 3)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        period, angle = rng.uniform(8, 24), rng.uniform(0, np.pi)
        img += (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period * 2 * np.pi) * 25)[..., None]
    elif kind == 1:
        c = rng.integers(6, 20)
        img += (((xx // c + yy // c) % 2) * 30 - 15)[..., None]
    elif kind == 2:
        img += noise(rng, h, w, 6, 25)[..., None]
    else:
        img += (np.linspace(-40, 40, h)[:, None] * np.ones((1, w)))[..., None] * rng.choice([-1, 1])
    return img


def ellipse(cx, cy, ax, ay, delta=10):
    return cv2.ellipse2Poly((int(cx), int(cy)), (max(1, int(ax)), max(1, int(ay))), 0, 0, 360, delta)


def parts(cls, cx, cy, r, flip):
    """The object's polygons with the palette key of each."""
    f = -1 if flip else 1

    def poly(pts):
        return np.array([[cx + f * x * r, cy + y * r] for x, y in pts], np.int32)

    if cls == 0:   # fish: body, tail, eye
        return [(ellipse(cx, cy, r, r * 0.45), "main"), (poly([(0.85, 0), (1.5, -0.5), (1.5, 0.5)]), "accent"),
                (poly([(-0.6, -0.12), (-0.45, -0.12), (-0.45, 0.0), (-0.6, 0.0)]), "dark")]
    if cls == 1:   # kite: diamond, bow, spar
        return [(poly([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]), "main"), (poly([(0, 1), (0.25, 1.35), (-0.25, 1.35)]), "accent"),
                (poly([(0, -1), (0.05, 1), (-0.05, 1)]), "dark")]
    if cls == 2:   # bus: box, a row of windows, wheels
        out = [(poly([(-1, -0.45), (1, -0.45), (1, 0.35), (-1, 0.35)]), "main")]
        for i in range(4):
            x0 = -0.85 + i * 0.45
            out.append((poly([(x0, -0.32), (x0 + 0.3, -0.32), (x0 + 0.3, -0.05), (x0, -0.05)]), "light"))
        out += [(ellipse(cx + f * x * r, cy + 0.4 * r, r * 0.17, r * 0.17, 20), "dark") for x in (-0.6, 0.6)]
        return out
    if cls == 3:   # sheep: fleece blobs, head, legs
        out = [(ellipse(cx + f * dx * r, cy + dy * r, r * 0.45, r * 0.35, 15), "light")
               for dx, dy in ((-0.5, 0), (0, -0.2), (0.4, 0), (-0.2, 0.2), (0.2, 0.25))]
        out.append((poly([(0.8, -0.35), (1.15, -0.2), (1.1, 0.1), (0.8, 0.05)]), "dark"))
        out += [(poly([(x, 0.4), (x + 0.1, 0.4), (x + 0.1, 0.8), (x, 0.8)]), "dark") for x in (-0.5, -0.2, 0.2, 0.5)]
        return out
    if cls == 4:   # ship: hull, cabin, funnel
        return [(poly([(-1, 0), (1, 0), (0.7, 0.4), (-0.8, 0.4)]), "main"),
                (poly([(-0.4, -0.35), (0.35, -0.35), (0.35, 0), (-0.4, 0)]), "light"),
                (poly([(0.05, -0.7), (0.25, -0.7), (0.25, -0.35), (0.05, -0.35)]), "accent")]
    return [(ellipse(cx, cy, r * 0.6, r * 0.4), "main"), (poly([(-0.2, -0.1), (0.3, -0.1), (-0.4, -0.7)]), "accent"),
            (poly([(0.55, -0.1), (0.95, 0.0), (0.55, 0.1)]), "dark")]   # bird: body, wing, beak


def palette(rng, cls):
    main = np.clip(np.array(HUES[cls]) + rng.normal(0, 25, 3), 0, 255)
    return {"main": main, "light": np.clip(main * 0.4 + 150, 0, 255), "dark": main * 0.25,
            "accent": np.clip(255 - main + rng.normal(0, 20, 3), 0, 255)}


def context_region(rng, k, cx, cy, r, h, w):
    region = np.zeros((h, w), np.uint8)
    if k in (2, 3, 4):   # street, meadow, harbour: a band under the object
        top = int(cy - rng.uniform(0.1, 0.6) * r)
        bottom = min(h, int(cy + rng.uniform(1.0, 1.8) * r))
        x0 = max(0, int(cx - rng.uniform(1.6, 3.0) * r))
        x1 = min(w, int(cx + rng.uniform(1.6, 3.0) * r))
        region[top:bottom, x0:x1] = 1
    elif k == 5:         # branch: a thick bar under the bird
        y0 = int(cy + 0.5 * r + rng.uniform(-8, 8))
        y1 = int(cy + 0.5 * r + rng.uniform(-8, 8))
        cv2.line(region, (int(cx - 3 * r), y0), (int(cx + 3 * r), y1), 1, max(2, int(r * 0.35)))
    else:                # pond, clouds: a blob around the object
        axes = (int(r * rng.uniform(1.4, 2.2)), int(r * rng.uniform(1.1, 1.8)))
        cv2.ellipse(region, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    return region.astype(bool)


def draw_context(rng, img, ctx_map, k, cx, cy, r):
    h, w = ctx_map.shape
    region = context_region(rng, k, cx, cy, r, h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    tex = np.ones((h, w, 3), np.float32) * (np.array(CONTEXT_COLOURS[k]) + rng.normal(0, 12, 3))
    if k == 0:
        tex += (np.sin(yy / 3.0 + xx / 7.0) * 15)[..., None]
    elif k == 1:
        tex += noise(rng, h, w, 10, 18)[..., None]
    elif k == 2:
        tex += (((xx // 10) % 2 == 0) & (np.abs(yy - (cy + 0.3 * r)) < 1.5))[..., None] * 120.0
    elif k == 3:
        tex += noise(rng, h, w, 2, 20)[..., None] * np.array([0.5, 1, 0.3])
    elif k == 4:
        tex += (np.sin(yy / 2.0) * 20)[..., None]
    else:
        tex += noise(rng, h, w, 3, 12)[..., None]
    img[region] = tex[region]
    ctx_map[region] = k + 1


def make_image(rng, size):
    """One image: RGB, the class mask (0 background, c + 1) and the context map (0 none, k + 1)."""
    h = w = size
    img = background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    ctx_map = np.zeros((h, w), np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        c, r = int(rng.integers(len(CLASSES))), rng.uniform(0.10, 0.2) * size
        objects.append((c, rng.uniform(r * 1.2, w - r * 1.2), rng.uniform(r * 1.2, h - r * 1.2), r))
    objects.sort(key=lambda o: o[2])
    for c, cx, cy, r in objects:
        if rng.random() < CO_OCCURRENCE:
            draw_context(rng, img, ctx_map, c, cx, cy, r)
    if rng.random() < LONE_CONTEXT:
        k, r = int(rng.integers(len(CONTEXTS))), rng.uniform(0.1, 0.2) * size
        draw_context(rng, img, ctx_map, k, rng.uniform(r, w - r), rng.uniform(r, h - r), r)
    for c, cx, cy, r in objects:
        colours, flip = palette(rng, c), rng.random() < 0.5
        for pts, key in parts(c, cx, cy, r, flip):
            layer = np.zeros((h, w), np.uint8)
            cv2.fillPoly(layer, [pts.reshape(-1, 1, 2)], 1)
            inside = layer.astype(bool)
            img[inside] = colours[key] + rng.normal(0, 6, (inside.sum(), 3))
            mask[inside] = c + 1
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0.6), mask, ctx_map


def write_dataset(root: Path, size: int, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ContextMaps", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pal = [0] * 768
    for i, col in enumerate(((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
                             (0, 128, 128))):
        pal[3 * i:3 * i + 3] = col
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:04d}" for i in range(n)]
        for image_id in ids:
            img, mask, ctx_map = make_image(rng, size)
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
            png = Image.fromarray(mask, "P")
            png.putpalette(pal)
            png.save(root / "SegmentationClass" / f"{image_id}.png")
            Image.fromarray(ctx_map).save(root / "ContextMaps" / f"{image_id}.png")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "contexts.json").write_text(json.dumps(dict(zip(CONTEXTS, CLASSES))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the dataset root to write (dataset.root)")
    ap.add_argument("--size", type=int, default=160, help="image side in pixels")
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--val", type=int, default=160)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.size < 48:
        raise SystemExit("--size must be at least 48 px (objects are 10-20% of the side)")
    write_dataset(Path(args.out), args.size, args.train, args.val, args.seed)
    print(f"wrote {args.train} train / {args.val} val images of {args.size} px to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
