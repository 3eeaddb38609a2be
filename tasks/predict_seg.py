"""Stage ``predict_seg``: label maps of the trained segmenter on a split (val by default).

``python -m tasks.predict_seg`` reads ``data/prepared/dataset.json`` and
``data/train_seg/segmenter.pt`` and writes ``data/predict_seg/``:

* ``masks/<id>.png`` -- palette PNGs (0 background, c+1 class c; VOC ``SegmentationClass``
  style, ready for the VOC evaluation server), the source that ``evaluate`` scores;
* ``report.png`` -- image / ground truth / prediction for the first ``report_images`` images;
* ``meta.json`` -- the segmenter checksum, the params (timings: ``data/timings/predict_seg.json``).

Per image: every scale ``s`` of ``predict_seg.scales`` resizes the image to
``round(s*H) x round(s*W)`` (bilinear), with ``flip`` its mirror image is added; the logits of
each view are upsampled to ``H x W`` (flipped back), turned into softmax probabilities and
averaged. ``crf: true`` refines the averaged probabilities with a dense CRF (method/crf.py,
``crf_preset``); the label is the argmax.

Resume: masks are written one by one (atomically) into ``.state/predict_seg/<fingerprint>/``;
a rerun with the same segmenter, params and ids skips what is there. The finished folder is
moved into place in one rename, so a kill never leaves a half-written ``data/predict_seg``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.atomic import atomic_path
from core.config import PredictSegConfig, result_params
from core.paths import MANIFEST, PREDICT_DIR, PREDICT_SEG_STATE, SEGMENTER
from core.sizing import sized
from core.stage_cli import stage_main
from core.timings import write_timings
from dataio.dataset import SegImages
from models.precision import prepare_model, resolve_precision, run_model

IGNORE = 255
_NOT_IN_FINGERPRINT = ("report_images",)  # besides the operational knobs: the masks do not depend on it


class PredictSegError(ValueError):
    """Prediction cannot run as asked; the message names the file, id or params key."""


# --------------------------------------------------------------------------- the maths


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: np.ndarray, scales: list[float], flip: bool,
                  device: torch.device, precision: str = "fp32", channels_last: bool = False) -> torch.Tensor:
    """Averaged softmax probabilities ``(C + 1, H, W)`` over scales (and flips) of one image.

    ``image``: ``HxWx3`` uint8 RGB; the model takes RGB in [0, 1] and returns logits at its
    feature resolution.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise PredictSegError(f"images must be HxWx3 RGB, got shape {image.shape}")
    h, w = image.shape[:2]
    x0 = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device).float().div_(255.0)
    total = None
    views = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = x0 if size == (h, w) else F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = run_model(model, x, device, precision, channels_last)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        prob = torch.softmax(logits.float(), dim=1)
        if flip:
            prob = torch.stack([prob[0], prob[1].flip(-1)])
        prob = prob.sum(0)
        total = prob if total is None else total + prob
        views += 2 if flip else 1
    return total / views


def label_map(probs: np.ndarray | torch.Tensor, image: np.ndarray | None = None,
              crf_params=None) -> np.ndarray:
    """uint8 label map from ``(C + 1, H, W)`` probabilities, optionally after a dense CRF."""
    probs = probs.cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if crf_params is not None:
        from method.crf import crf_posterior
        probs = crf_posterior(image, probs, crf_params)
    return probs.argmax(0).astype(np.uint8)


# --------------------------------------------------------------------------- report


def report_image(rows: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]],
                 class_names: list[str], tile: int = 160) -> np.ndarray:
    """A grid ``image | ground truth | prediction`` (one row per image) with a colour legend."""
    from PIL import Image, ImageDraw

    from dataio.label_png import voc_palette

    pal = voc_palette()
    pad, header = 4, 16
    cols = 3
    width = cols * (tile + pad) + pad
    legend_h = 18 * ((len(class_names) + 1 + 3) // 4) + pad
    height = header + len(rows) * (tile + pad) + pad + legend_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((pad + c * (tile + pad), 2), title, fill=(0, 0, 0))

    def fit(arr: np.ndarray, resample) -> Image.Image:
        im = Image.fromarray(arr)
        im.thumbnail((tile, tile), resample)
        return im

    for r, (image_id, image, gt, pred) in enumerate(rows):
        y = header + r * (tile + pad)
        tiles = [fit(image, Image.BILINEAR),
                 fit(pal[gt], Image.NEAREST) if gt is not None else None,
                 fit(pal[pred], Image.NEAREST)]
        for c, t in enumerate(tiles):
            x = pad + c * (tile + pad)
            if t is None:
                draw.text((x + 4, y + tile // 2), "no mask", fill=(128, 128, 128))
            else:
                canvas.paste(t, (x, y))
        draw.text((pad + 2, y + 2), image_id, fill=(255, 255, 0))
    y0 = header + len(rows) * (tile + pad) + pad
    for k, name in enumerate(["background", *class_names]):
        x = pad + (k % 4) * (width // 4)
        y = y0 + 18 * (k // 4)
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in pal[k]), outline=(0, 0, 0))
        draw.text((x + 16, y), name, fill=(0, 0, 0))
    return np.asarray(canvas)


# --------------------------------------------------------------------------- the stage


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictSegError("params key 'predict_seg.device' is cuda but no CUDA device is available "
                              "(use device: auto or cpu)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fingerprint(cfg: PredictSegConfig, segmenter_sha: str, ids: list[str], manifest: Path | None) -> str:
    params = {k: v for k, v in result_params(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    h = hashlib.sha256(json.dumps({"predict_seg": params, "segmenter": segmenter_sha, "ids": ids},
                                  sort_keys=True).encode())
    if manifest is not None and manifest.is_file():
        h.update(manifest.read_bytes())
    return h.hexdigest()[:16]


def _write_png_atomic(path: Path, mask: np.ndarray, palette: np.ndarray) -> None:
    from dataio.label_png import save_mask_png

    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_mask_png(mask, tmp, palette=palette)
    os.replace(tmp, path)


def run(cfg: PredictSegConfig, *, manifest: str | Path = MANIFEST,
        segmenter: str | Path = SEGMENTER, out_dir: str | Path = PREDICT_DIR,
        state_dir: str | Path = PREDICT_SEG_STATE, reader: SegImages | None = None,
        timings: str | Path | None = None, progress: bool = True) -> dict:
    """Predict every image of ``cfg.split``; returns the metadata written to ``meta.json`` and the
    run-dependent figures written to ``timings`` (:mod:`core.timings`)."""
    from dataio.label_png import voc_palette
    from method.crf import CRF_PRESETS
    from models.deeplab import load_segmenter

    manifest, out_dir, state_dir = Path(manifest), Path(out_dir), Path(state_dir)
    device = select_device(cfg.device)
    if reader is None:
        from dataio.manifest import open_dataset
        reader = open_dataset(manifest)
    cfg = sized(cfg, "predict_seg", reader)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))   # recorded as used
    model, meta = load_segmenter(segmenter, map_location=device)
    prepare_model(model, cfg.channels_last)
    if list(meta["class_names"]) != list(reader.class_names):
        raise PredictSegError(f"{segmenter} was trained for classes {meta['class_names']}, the dataset has "
                              f"{list(reader.class_names)}; rerun train_seg")
    ids = list(reader.ids(cfg.split))
    if not ids:
        raise PredictSegError(f"the dataset's {cfg.split} split is empty (params key 'predict_seg.split')")
    crf_params = CRF_PRESETS[cfg.crf_preset] if cfg.crf else None
    fp = fingerprint(cfg, meta["sha256"], ids, manifest)
    partial = state_dir / fp / "masks"
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".*.tmp.png"):
        stale.unlink()
    done = {p.stem for p in partial.glob("*.png")}
    todo = [i for i in ids if i not in done]
    palette = voc_palette()

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or _usable_cores())
    t0 = time.perf_counter()
    try:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"predict_seg {cfg.split}",
                       unit="img", dynamic_ncols=True, file=sys.stderr)
        for image_id in todo:
            image = np.asarray(reader.load_image(image_id))
            probs = predict_probs(model, image, cfg.scales, cfg.flip, device, cfg.precision, cfg.channels_last)
            _write_png_atomic(partial / f"{image_id}.png", label_map(probs, image, crf_params), palette)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0

    from artifacts.pseudo_masks import PngMasks
    preds = PngMasks(partial)
    rows = []
    for image_id in ids[:cfg.report_images]:
        rows.append((image_id, np.asarray(reader.load_image(image_id)), reader.load_mask(image_id),
                     preds.mask(image_id)))
    timing = {"predicted_this_run": len(todo), "seconds_this_run": round(seconds, 3),
              "sec_per_image": seconds / len(todo) if todo else None, "device": str(device)}
    result = {"split": cfg.split, "images": len(ids), "segmenter": str(segmenter), "segmenter_sha256": meta["sha256"],
              "segmenter_mask_source": meta.get("mask_source"), "head": meta["head"],
              "backbone": meta["backbone"], "predict_seg": result_params(cfg), "fingerprint": fp}
    with atomic_path(out_dir, is_dir=True) as tmp:
        if rows:
            from PIL import Image
            Image.fromarray(report_image(rows, list(reader.class_names))).save(tmp / "report.png")
        (tmp / "meta.json").write_text(json.dumps(result, indent=1))
        shutil.move(str(partial), str(tmp / "masks"))  # a rename on one filesystem
    shutil.rmtree(state_dir / fp, ignore_errors=True)
    write_timings(timings, {"timing": timing})  # they vary run to run: never in data/predict_seg
    return dict(result, timing=timing)


def main(argv: list[str] | None = None) -> int:
    paths = {"--manifest": MANIFEST, "--segmenter": SEGMENTER, "--out": PREDICT_DIR,
             "--state-dir": (PREDICT_SEG_STATE, "partial predictions (resume)")}

    def body(args, params) -> str:
        result = run(params.predict_seg, manifest=args.manifest, segmenter=args.segmenter,
                     out_dir=args.out, state_dir=args.state_dir, timings=args.timings)
        return f"{result['images']} masks in {Path(args.out) / 'masks'}"

    return stage_main("predict_seg", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
