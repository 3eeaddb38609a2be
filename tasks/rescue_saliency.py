"""Stage ``rescue_saliency``: give the saliency back the labelled objects the detector missed.

EPS's pseudo-masks take a pixel for a class only where the saliency marks it (``export_masks.background:
saliency``: the background score is one minus the saliency), so an object the detector missed altogether
is background in the masks, and so in everything trained on them. A salient-object detector misses an
object that does not stand out in the whole image (a cow on grass under a busy background); in a crop
around it, where it fills the view, it usually does not. The image labels and the classifier say where
to look: for each present class of an image, its confident region B (normalised CAM > 0.5, the B of the
paper's adaptive selection) is found from ``data/cams``; when at most ``rescue_saliency.overlap`` of B is
salient (> 0.5), the detector missed that object, and it is run again on B's bounding box widened by
``margin`` on each side, at ``rescue_saliency.input_size``; the map there becomes the maximum of the two.
``input_size: auto`` is the saliency stage's size rule applied to the crops instead of the whole images:
4x the median long side of the crops, within [320, 1024] ([320, 512] for U²-Net-p): a 70-px crop of a
128-px image is not blown up to the 512 px the whole image gets (README, "Choices that differ").
Classifier training is not affected (it runs before the CAMs exist and keeps Table 3's rule: a class the
saliency misses trains as background); the masks, AffinityNet and the segmenter's sure regions read the
rescued maps.

``python -m tasks.rescue_saliency`` writes ``data/saliency_rescued/<id>.png`` for every map of
``data/saliency`` (a map with nothing to rescue, or every map with ``enabled: false``, is copied
byte for byte) and ``data/metrics/rescue_saliency.json``: present and missed classes (per class), the
salient share of the missed regions before and after. Maps go to ``data/saliency_rescued.partial/``
under a fingerprint of the inputs and params, so a killed run resumes; the folder is renamed when
complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from artifacts.cams import CamRecord, PseudoMaskError, cam_path, read_cam_file, read_cams_meta
from artifacts.saliency_maps import (
    FINGERPRINT_FILE,
    prepare_partial,
    read_map_u8,
    saliency_path,
    write_map_atomic,
)
from assets import isnet_model
from core.atomic import replace_path, write_text_atomic
from core.config import AUTO, RescueSaliencyConfig, SaliencyConfig, result_params
from core.parallel import parallel_map
from core.paths import CAMS_DIR, MANIFEST, RESCUE_SALIENCY_METRICS, RESCUED_SALIENCY_DIR, SALIENCY_DIR
from core.sizing import saliency_input_size
from core.stage_cli import stage_main

FINGERPRINT_FORMAT = 1
CONFIDENT = 0.5     # B: normalised CAM above this (the paper's B_i); salient: map above this


class RescueError(ValueError):
    """The rescue cannot run as asked; the message names the file or params key."""


# --------------------------------------------------------------------------- the rule


class Missed(NamedTuple):
    """A present class the detector missed: its index in the CAM record, its class, the salient share
    of its confident region B, the crop box ``(y0, y1, x0, x1)``."""

    index: int
    cls: int
    share: float
    box: tuple[int, int, int, int]


def salient(saliency_u8: np.ndarray) -> np.ndarray:
    return saliency_u8.astype(np.float32) / 255.0 > CONFIDENT


def confident_region(rec: CamRecord, index: int) -> np.ndarray:
    return np.asarray(rec.cams[index], dtype=np.float32) > CONFIDENT


def missed_boxes(rec: CamRecord, saliency_u8: np.ndarray, overlap: float, margin: float) -> list[Missed]:
    """The present classes whose confident region B has at most ``overlap`` of its pixels salient: the
    objects the detector missed, each with B's bounding box widened by ``margin`` of its size per side."""
    sal = salient(saliency_u8)
    h, w = sal.shape
    boxes = []
    for j, c in enumerate(rec.classes):
        region = confident_region(rec, j)
        if not region.any():
            continue
        share = float(sal[region].mean())
        if share > overlap:
            continue
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        my, mx = int(round(margin * (y1 - y0))), int(round(margin * (x1 - x0)))
        boxes.append(Missed(j, int(c), share, (max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx))))
    return boxes


def rescued_map(rgb: np.ndarray, saliency_u8: np.ndarray, boxes: Sequence[Missed],
                detector: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The map with each box's crop run through ``detector`` (RGB crop -> uint8 map of its size) and
    kept where it is higher; every crop is taken from the image, so the order of the boxes does not matter."""
    out = saliency_u8.copy()
    for (y0, y1, x0, x1) in (m.box for m in boxes):
        crop = detector(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
        if crop.shape != (y1 - y0, x1 - x0) or crop.dtype != np.uint8:
            raise RescueError(f"the saliency detector made a {crop.dtype} {crop.shape} map for a "
                              f"{y1 - y0}x{x1 - x0} crop; expected uint8 of the crop's size")
        np.maximum(out[y0:y1, x0:x1], crop, out=out[y0:y1, x0:x1])
    return out


# --------------------------------------------------------------------------- per image (in workers)


@dataclass
class _WorkerContext:
    cfg: RescueSaliencyConfig
    spec: Any                       # tasks.saliency.BackendSpec, or None when nothing is run
    dataset: Any
    cams_dir: Path
    saliency_dir: Path
    partial: Path
    cam_ids: frozenset[str]
    detector: Callable | None = None


_CONTEXT: list[_WorkerContext] = []   # one entry per worker process (empty in the parent)


def _init_worker(ctx: _WorkerContext) -> None:
    if ctx.spec is not None:
        import cv2
        cv2.setNumThreads(ctx.spec.threads)
        ctx.detector = ctx.spec.build()
    _CONTEXT[:] = [ctx]


@dataclass
class ImageResult:
    image_id: str
    present: list[int]
    missed: list[tuple[int, float, float]]   # (class, salient share of B before, after)
    computed: bool


def process_one(ctx: _WorkerContext, image_id: str) -> ImageResult:
    """Write (or keep, on a resumed run) the rescued map of one image; report what was missed."""
    src = saliency_path(ctx.saliency_dir, image_id)
    dst = saliency_path(ctx.partial, image_id)
    computed = not dst.is_file()
    if image_id not in ctx.cam_ids:   # no CAMs (e.g. a val map): nothing to look for
        if computed:
            _copy_atomic(src, dst)
        return ImageResult(image_id, [], [], computed)
    rec = read_cam_file(cam_path(ctx.cams_dir, image_id))
    sal = read_map_u8(src, tuple(rec.size))
    boxes = missed_boxes(rec, sal, ctx.cfg.overlap, ctx.cfg.margin)
    if not boxes or not ctx.cfg.enabled:
        if computed:
            _copy_atomic(src, dst)
        out = sal
    elif computed:
        out = rescued_map(ctx.dataset.load_image(image_id), sal, boxes, ctx.detector)
        write_map_atomic(dst, out)
    else:
        out = read_map_u8(dst, tuple(rec.size))
    now = salient(out)
    missed = [(m.cls, m.share, float(now[confident_region(rec, m.index)].mean())) for m in boxes]
    return ImageResult(image_id, [int(c) for c in rec.classes], missed, computed)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-copy")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _process(image_id: str) -> ImageResult:
    return process_one(_CONTEXT[0], image_id)


def crop_sides(ctx: _WorkerContext, image_id: str) -> list[int]:
    """The long sides of the crops the rescue would run the detector on in one image."""
    if image_id not in ctx.cam_ids:
        return []
    rec = read_cam_file(cam_path(ctx.cams_dir, image_id))
    sal = read_map_u8(saliency_path(ctx.saliency_dir, image_id), tuple(rec.size))
    return [max(y1 - y0, x1 - x0) for (y0, y1, x0, x1) in (m.box for m in
                                                           missed_boxes(rec, sal, ctx.cfg.overlap, ctx.cfg.margin))]


def _crop_sides(image_id: str) -> list[int]:
    return crop_sides(_CONTEXT[0], image_id)


def crop_input_size(cfg: RescueSaliencyConfig, backend: str, sides: Sequence[int], image_long_side: float) -> int:
    """``input_size`` as set, or for ``auto`` the saliency rule (:func:`core.sizing.saliency_input_size`)
    at the median long side of the crops (at the images' median long side when nothing was missed)."""
    if cfg.input_size != AUTO:
        return int(cfg.input_size)
    return saliency_input_size(float(np.median(sides)) if len(sides) else image_long_side, backend)


# --------------------------------------------------------------------------- the stage


def check_inputs(cfg: RescueSaliencyConfig, saliency_cfg: SaliencyConfig, cams_dir: Path,
                 saliency_dir: Path) -> tuple[list[str], frozenset[str], dict]:
    """Every map id, the ids with CAMs, the CAMs' meta; a clear error before any work."""
    if cfg.enabled and saliency_cfg.backend == "precomputed":
        raise RescueError("params key 'rescue_saliency.enabled' is true but 'saliency.backend' is precomputed: "
                          "there is no detector to run on the crops; set rescue_saliency.enabled: false")
    try:
        meta = read_cams_meta(cams_dir)
    except PseudoMaskError as e:
        raise RescueError(str(e)) from None
    if not saliency_dir.is_dir():
        raise RescueError(f"saliency folder {saliency_dir} not found; run the saliency stage first")
    map_ids = sorted(p.stem for p in saliency_dir.glob("*.png"))
    cam_ids = list(meta.get("ids") or [])
    absent = [i for i in cam_ids if not saliency_path(saliency_dir, i).is_file()]
    if absent:
        raise RescueError(f"{len(absent)} image(s) with CAMs have no saliency map, e.g. "
                          f"{saliency_path(saliency_dir, absent[0])}; run the saliency stage on these splits "
                          f"(params key 'saliency.splits')")
    missing = [i for i in cam_ids if not cam_path(cams_dir, i).is_file()]
    if missing:
        raise RescueError(f"{len(missing)} CAM file(s) listed in {cams_dir}/meta.json are missing, e.g. "
                          f"{cam_path(cams_dir, missing[0])}; rerun infer_cam")
    return map_ids, frozenset(cam_ids), meta


def fingerprint(cfg: RescueSaliencyConfig, spec: Any, meta: dict, saliency_dir: Path, dataset: Any,
                ids: Sequence[str]) -> dict:
    """What decides the maps: the params, the detector, the CAMs and every input map and image file."""
    h = hashlib.sha256()
    cam_ids = set(meta.get("ids") or [])
    for image_id in ids:
        paths = [saliency_path(saliency_dir, image_id)]
        if image_id in cam_ids:
            paths.append(dataset.image_path(image_id))
        for path in paths:
            st = path.stat()
            h.update(f"{image_id}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": FINGERPRINT_FORMAT, "params": result_params(cfg),
            "detector": spec.result_fields() if spec is not None else None,
            "cams": str(meta.get("fingerprint")), "maps": len(ids), "inputs_sha256": h.hexdigest()}


def summarise(cfg: RescueSaliencyConfig, results: list[ImageResult], class_names: Sequence[str]) -> dict:
    """The metrics file: how many present classes the detector missed (per class) and what the rescue gave back."""
    present = Counter(class_names[c] for r in results for c in r.present)
    missed = Counter(class_names[c] for r in results for c, _, _ in r.missed)
    before = [b for r in results for _, b, _ in r.missed]
    after = [a for r in results for _, _, a in r.missed]
    n_present = sum(present.values())
    return {
        "enabled": cfg.enabled,
        "images": sum(1 for r in results if r.present),
        "present_classes": n_present,
        "missed_classes": len(before),
        "missed_share": round(len(before) / n_present, 6) if n_present else None,
        "rescued_images": sum(1 for r in results if r.missed) if cfg.enabled else 0,
        "missed_region_salient_before": round(float(np.mean(before)), 6) if before else None,
        "missed_region_salient_after": round(float(np.mean(after)), 6) if after else None,
        "per_class": {n: {"present": present[n], "missed": missed[n]} for n in class_names if present[n]},
    }


def _input_size(ctx: _WorkerContext, ids: Sequence[str], backend: str, dataset, print_fn) -> dict:
    """``{"input_size": the crops' detector input, "median_crop_side": px (auto only)}``; ``auto`` first
    finds every crop (the CAMs and maps are read once more, in the workers)."""
    cfg = ctx.cfg
    if cfg.input_size != AUTO:
        return {"input_size": int(cfg.input_size)}
    try:
        with parallel_map(_crop_sides, ids, workers=cfg.workers, initializer=_init_worker, initargs=(ctx,),
                          chunksize=max(1, len(ids) // (max(1, cfg.workers) * 16))) as found:
            sides = [side for image_sides in found for side in image_sides]
    finally:
        _CONTEXT.clear()
    size = crop_input_size(cfg, backend, sides, dataset.median_long_side("train"))
    median = float(np.median(sides)) if sides else None
    found_text = f"{len(sides)} crops, median long side {median:g} px" if sides else "no missed object"
    print_fn(f"rescue_saliency: input_size auto -> {size} ({found_text})")
    return {"input_size": size, "median_crop_side": median}


def run(cfg: RescueSaliencyConfig, saliency_cfg: SaliencyConfig, dataset, *, cams_dir: str | Path = CAMS_DIR,
        saliency_dir: str | Path = SALIENCY_DIR, out_dir: str | Path = RESCUED_SALIENCY_DIR,
        metrics_path: str | Path | None = RESCUE_SALIENCY_METRICS, project_dir: str | Path = ".",
        state_dir: str | Path = isnet_model.STATE_DIR, progress: bool = True,
        print_fn: Callable[[str], None] = print) -> dict:
    """The stage: check the inputs, write every map to the resume folder, publish it, then the metrics."""
    from tasks.saliency import resolve_backend

    cams_dir, saliency_dir, out_dir = Path(cams_dir), Path(saliency_dir), Path(out_dir)
    ids, cam_ids, meta = check_inputs(cfg, saliency_cfg, cams_dir, saliency_dir)
    spec, sizes = None, {}
    partial = out_dir.with_name(out_dir.name + ".partial")
    ctx = _WorkerContext(cfg, None, dataset, cams_dir, saliency_dir, partial, cam_ids)
    start = time.perf_counter()
    if cfg.enabled:
        sizes = _input_size(ctx, ids, saliency_cfg.backend, dataset, print_fn)
        spec = resolve_backend(replace(saliency_cfg, input_size=sizes["input_size"]), project_dir=project_dir,
                               state_dir=state_dir)
        ctx.spec = spec
    fp = fingerprint(cfg, spec, meta, saliency_dir, dataset, ids)
    prepare_partial(partial, print_fn, fp)
    results: list[ImageResult] = []
    try:
        with parallel_map(_process, ids, workers=cfg.workers, initializer=_init_worker, initargs=(ctx,),
                          start_method="spawn", ordered=True, progress=progress,
                          chunksize=max(1, min(8, len(ids) // (max(1, cfg.workers) * 16))),
                          desc="rescue_saliency", mininterval=1.0) as maps:
            results.extend(maps)
    finally:
        _CONTEXT.clear()
    seconds = time.perf_counter() - start
    absent = [i for i in ids if not saliency_path(partial, i).is_file()]
    if absent:
        raise RescueError(f"{partial}: maps missing after the run for {', '.join(absent[:5])}; rerun the stage")
    (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
    replace_path(partial, out_dir)
    metrics = {**summarise(cfg, results, list(meta.get("class_names") or dataset.class_names)), **sizes}
    if metrics_path is not None:
        write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    computed = sum(r.computed for r in results)
    print_fn(f"rescue_saliency: {len(ids)} maps in {out_dir} in {seconds:.1f} s ({computed} written, "
             f"{len(ids) - computed} kept from an interrupted run); the detector missed "
             f"{metrics['missed_classes']} of {metrics['present_classes']} present classes"
             + (f", {metrics['rescued_images']} image(s) rescued" if cfg.enabled else " (rescue off: maps copied)"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    def arguments(ap):
        ap.add_argument("--no-progress", action="store_true")

    paths = {"--manifest": (MANIFEST, "dataset manifest from prepare"), "--cams": CAMS_DIR,
             "--saliency-dir": (SALIENCY_DIR, "the detector's maps"), "--out": RESCUED_SALIENCY_DIR,
             "--metrics": RESCUE_SALIENCY_METRICS}

    def body(args, params) -> None:
        from dataio.manifest import open_dataset

        run(params.rescue_saliency, params.saliency, open_dataset(args.manifest), cams_dir=args.cams,
            saliency_dir=args.saliency_dir, out_dir=args.out, metrics_path=args.metrics,
            progress=not args.no_progress)

    return stage_main("rescue_saliency", __doc__, argv, paths, body, add_arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())
