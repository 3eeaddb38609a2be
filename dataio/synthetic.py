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

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from core.parallel import parallel_map
from dataio.label_png import save_mask_png
from dataio.synthetic_layout import _DESIGNS, _SIZE_RANGE, _place_objects, _zone_box
from dataio.synthetic_paint import _background, _Canvas, _context_region, _context_texture, _inner_outline, _paint_object, _paste

CLASS_NAMES: tuple[str, ...] = ("train", "boat", "plane", "car", "cow", "bird", "horse", "skier")


CONTEXT_NAMES: tuple[str, ...] = ("rail", "water", "sky", "road", "grass", "foliage", "track", "snow")


SPLITS: tuple[str, ...] = ("train", "val")


ON_CONTEXT_MIN_COVERAGE = 0.15


JPEG_QUALITY = 95


IGNORE = 255


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


assert tuple(d.name for d in _DESIGNS) == CLASS_NAMES and tuple(d.context for d in _DESIGNS) == CONTEXT_NAMES


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


def _write_sample(sample: Sample, root: Path, iid: str) -> None:
    Image.fromarray(sample.image).save(root / "JPEGImages" / f"{iid}.jpg", format="JPEG",
                                       quality=JPEG_QUALITY, subsampling=0)
    save_mask_png(sample.mask, root / "SegmentationClass" / f"{iid}.png")
    save_mask_png(sample.context, root / "ContextMaps" / f"{iid}.png")


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
    with parallel_map(work, jobs, workers=workers, progress=progress,
                      chunksize=max(1, min(32, len(jobs) // (max(1, workers) * 8))),
                      desc="generating synthetic images", mininterval=0.5) as generated:
        records = list(generated)

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
