"""Stage ``export_masks``: pseudo-masks from the CAMs, optionally refined by a dense CRF.

``python -m tasks.export_masks`` reads ``data/cams/`` (``infer_cam``) and, for the CRF, the
images of ``data/prepared/dataset.json``, and writes ONE HDF5 file ``data/pseudo_masks.h5``
(layout in :mod:`artifacts.pseudo_masks`; read it with :class:`artifacts.pseudo_masks.PseudoMasks` or
plain h5py, export VOC PNGs with ``python -m artifacts.pseudo_masks png``).

Per image: scores ``[background, CAM of each present class]`` where the background score is
the constant ``bg_threshold`` (authors' ``--thr 0.20``), the eps model's background
probability (``background: bgmap``) or one minus the image's saliency map (``background:
saliency``, from ``data/saliency_rescued/``, :mod:`tasks.rescue_saliency`); the mask is their argmax (ties -> background), or the
argmax of the CRF posterior started from them (:mod:`method.crf`). Images are processed by
``workers`` processes; the main process writes the file to a temporary name and renames it
when complete, so a killed export leaves nothing at the final path.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.cams import PseudoMaskError, cam_path, read_cam_file, read_cams_meta
from artifacts.pseudo_masks import PseudoMaskWriter
from core.atomic import atomic_path
from core.config import ExportMasksConfig, result_params
from core.parallel import parallel_map
from core.paths import CAMS_DIR, MANIFEST, PSEUDO_MASKS, RESCUED_SALIENCY_DIR
from core.stage_cli import stage_main
from core.timings import write_timings
from method.crf import CRF_PRESETS, CrfParams, crf_argmax
from method.mask_rule import SALIENCY_MODES, argmax_mask, mask_scores


class ExportMasksError(ValueError):
    """The export cannot run as asked (missing CAMs, bgmap without a background map, ...)."""


def crf_params(cfg: ExportMasksConfig) -> CrfParams:
    """The CRF kernel of the configured preset (``custom``: the ``crf_*`` values)."""
    if cfg.crf_preset == "custom":
        return CrfParams(cfg.crf_bilateral_weight, cfg.crf_bilateral_xy, cfg.crf_bilateral_rgb,
                         cfg.crf_gaussian_weight, cfg.crf_gaussian_xy, cfg.crf_iterations)
    return CRF_PRESETS[cfg.crf_preset]


def make_mask(rec, cfg: ExportMasksConfig, image: np.ndarray | None = None,
              saliency: np.ndarray | None = None) -> np.ndarray:
    """The uint8 pseudo-mask of one CAM record (``image`` is needed for the CRF, ``saliency``
    for ``background: saliency``)."""
    scores, values = mask_scores(rec, cfg.background, cfg.bg_threshold, saliency)
    if not cfg.crf:
        return argmax_mask(scores, values)
    if image is None:
        raise ExportMasksError("the CRF needs the image")
    if image.shape[:2] != tuple(rec.size):
        raise ExportMasksError(f"image is {image.shape[1]}x{image.shape[0]} but its CAMs are "
                               f"{rec.size[1]}x{rec.size[0]}; rerun infer_cam")
    idx = crf_argmax(image, scores, crf_params(cfg), cfg.crf_unary, cfg.crf_gt_prob)
    return np.asarray(values, dtype=np.uint8)[idx]


# --------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: ExportMasksConfig, cams_dir: str, dataset: Any, manifest: str | None,
                 saliency_dir: str | None = None) -> None:
    _WORKER.clear()
    _WORKER.update(cfg=cfg, cams_dir=cams_dir, dataset=dataset, manifest=manifest, saliency_dir=saliency_dir)


def _dataset():
    if _WORKER.get("dataset") is None and _WORKER.get("manifest"):
        from dataio.manifest import open_dataset
        _WORKER["dataset"] = open_dataset(_WORKER["manifest"])
    return _WORKER.get("dataset")


def _process(image_id: str) -> tuple:
    cfg: ExportMasksConfig = _WORKER["cfg"]
    rec = read_cam_file(cam_path(_WORKER["cams_dir"], image_id))
    image = None
    t0 = time.perf_counter()
    if cfg.crf:
        image = _dataset().load_image(image_id)
    saliency = None
    if cfg.background in SALIENCY_MODES:
        from artifacts.saliency_maps import load_saliency
        saliency = load_saliency(_WORKER["saliency_dir"], image_id, tuple(rec.size))
    try:
        mask = make_mask(rec, cfg, image, saliency)
    except ExportMasksError as e:
        raise ExportMasksError(f"{image_id}: {e}") from None
    seconds = time.perf_counter() - t0
    cams = rec.cams.astype(np.float16) if cfg.store_cams else None
    bg = rec.bg.astype(np.float16) if (cfg.store_cams and rec.bg is not None) else None
    return image_id, mask, cams, rec.classes, bg, seconds


# --------------------------------------------------------------------------- the stage


def _read_cams_meta(cams_dir: Path) -> dict:
    try:
        return read_cams_meta(cams_dir)
    except PseudoMaskError as e:
        raise ExportMasksError(str(e)) from None


def resolve_background(cfg: ExportMasksConfig, cams_meta: dict) -> ExportMasksConfig:
    """``background: auto`` -> bgmap for CAMs with a background map (eps), threshold otherwise (cam)."""
    if cfg.background != "auto":
        return cfg
    return dataclasses.replace(cfg, background="bgmap" if cams_meta.get("has_bgmap") else "threshold")


def check_inputs(cfg: ExportMasksConfig, cams_meta: dict, cams_dir: Path,
                 saliency_dir: Path | None = None) -> list[str]:
    """Everything that can be checked before work starts; returns the ids to export."""
    if cfg.background in ("bgmap", "joint") and not cams_meta.get("has_bgmap"):
        raise ExportMasksError(
            f"params key 'export_masks.background' is {cfg.background} but the CAMs in {cams_dir} come from a "
            f"{cams_meta.get('method')} model, which has no background map; use background: "
            f"{'threshold' if cfg.background == 'bgmap' else 'saliency'} (or train an eps classifier)")
    ids = list(cams_meta.get("ids") or [])
    if not ids:
        raise ExportMasksError(f"{cams_dir}/meta.json lists no images; rerun infer_cam")
    missing = [i for i in ids if not cam_path(cams_dir, i).is_file()]
    if missing:
        raise ExportMasksError(f"{len(missing)} CAM file(s) listed in {cams_dir}/meta.json are missing, e.g. "
                               f"{cam_path(cams_dir, missing[0])}; rerun infer_cam")
    if cfg.background in SALIENCY_MODES:
        from artifacts.saliency_maps import saliency_path
        if saliency_dir is None or not Path(saliency_dir).is_dir():
            raise ExportMasksError(f"params key 'export_masks.background' is {cfg.background} but the saliency folder "
                                   f"{saliency_dir} does not exist; run the saliency and rescue_saliency stages first")
        missing = [i for i in ids if not Path(saliency_path(saliency_dir, i)).is_file()]
        if missing:
            raise ExportMasksError(f"{len(missing)} image(s) have no saliency map in {saliency_dir}, e.g. "
                                   f"{saliency_path(saliency_dir, missing[0])}; run the saliency (and rescue_saliency) "
                                   f"stages on these splits (params key 'saliency.splits')")
    return ids


def export(cfg: ExportMasksConfig, cams_dir: str | Path, out_path: str | Path, *, dataset: Any = None,
           manifest: str | Path | None = None, saliency_dir: str | Path | None = None, progress: bool = True,
           on_image=None) -> dict:
    """Write the pseudo-mask file; returns its root attributes.

    ``dataset`` (or ``manifest`` to open one) supplies images for the CRF. ``on_image(n)`` is
    called after the n-th image is written (tests use it to interrupt an export).
    """
    cams_dir = Path(cams_dir)
    out_path = Path(out_path)
    meta = _read_cams_meta(cams_dir)
    cfg = resolve_background(cfg, meta)
    ids = check_inputs(cfg, meta, cams_dir, Path(saliency_dir) if saliency_dir else None)
    if cfg.crf and dataset is None and manifest is None:
        raise ExportMasksError("the CRF needs the images: give the dataset manifest")
    if cfg.crf and dataset is not None and hasattr(dataset, "image_size"):
        for image_id in ids:  # header reads only: a mismatch stops the export before it starts
            size = tuple(dataset.image_size(image_id))
            with np.load(cam_path(cams_dir, image_id)) as z:
                cam_size = tuple(int(v) for v in z["size"])
            if size != cam_size:
                raise ExportMasksError(f"image {image_id} is {size[1]}x{size[0]} but its CAMs in {cams_dir} are "
                                       f"{cam_size[1]}x{cam_size[0]}; rerun infer_cam on this dataset")
    crf_info: Any = "none"
    if cfg.crf:
        crf_info = {"preset": cfg.crf_preset, "unary": cfg.crf_unary, **dataclasses.asdict(crf_params(cfg))}
        if cfg.crf_unary == "labels":
            crf_info["gt_prob"] = cfg.crf_gt_prob
    attrs = {
        "method": str(meta.get("method")),
        "checkpoint_sha256": str(meta.get("checkpoint_sha256")),
        "scales": list(meta.get("scales") or []),
        "flip": bool(meta.get("flip")),
        "class_activation": str(meta.get("class_activation")),
        "background": cfg.background,
        "bg_threshold": float(cfg.bg_threshold),
        "crf": crf_info,
        "splits": list(meta.get("splits") or []),
        "cams_fingerprint": str(meta.get("fingerprint")),
        "params": {"infer_cam": meta.get("params"), "export_masks": result_params(cfg)},
    }
    init_args = (cfg, str(cams_dir), dataset, str(manifest) if manifest else None,
                 str(saliency_dir) if saliency_dir else None)
    t0 = time.perf_counter()
    busy = 0.0
    try:
        with atomic_path(out_path) as tmp, \
                PseudoMaskWriter(tmp, list(meta["class_names"]), attrs, compression=cfg.compression) as writer, \
                parallel_map(_process, ids, workers=cfg.workers, initializer=_init_worker, initargs=init_args,
                             chunksize=max(1, min(16, len(ids) // (4 * max(1, cfg.workers)))), progress=progress,
                             desc="export_masks" + (" (crf)" if cfg.crf else "")) as results:
            for n, (image_id, mask, cams, classes, bg, seconds) in enumerate(results, start=1):
                writer.add(image_id, mask, cams=cams, classes=classes, bg=bg)
                busy += seconds
                if on_image is not None:
                    on_image(n)
            wall = time.perf_counter() - t0
            timing = {"images": len(ids), "seconds": round(wall, 3),
                      "images_per_s": round(len(ids) / wall, 3) if wall > 0 else None,
                      "workers": cfg.workers, "crf": bool(cfg.crf),
                      "mask_seconds_per_image": round(busy / len(ids), 5)}
            attrs = dict(attrs, timing=timing)  # returned, never in the file: its bytes depend on the inputs only
    except PseudoMaskError as e:
        raise ExportMasksError(str(e)) from None
    return attrs


def run(cfg: ExportMasksConfig, *, cams_dir: str | Path = CAMS_DIR,
        manifest: str | Path = MANIFEST, out_path: str | Path = PSEUDO_MASKS,
        saliency_dir: str | Path = RESCUED_SALIENCY_DIR, timings: str | Path | None = None,
        progress: bool = True) -> dict:
    """The stage: check the inputs, then write ``out_path`` (timings to ``timings``: :mod:`core.timings`)."""
    dataset = None
    if cfg.crf:
        from dataio.manifest import open_dataset
        dataset = open_dataset(manifest)
    attrs = export(cfg, cams_dir, out_path, dataset=dataset, manifest=manifest, saliency_dir=saliency_dir,
                   progress=progress)
    write_timings(timings, {"timing": attrs["timing"]})
    return attrs


def main(argv: list[str] | None = None) -> int:
    paths = {"--cams": CAMS_DIR, "--manifest": MANIFEST, "--out": PSEUDO_MASKS,
             "--saliency-dir": (RESCUED_SALIENCY_DIR, "saliency maps (background: saliency)")}

    def body(args, params) -> str:
        t = run(params.export_masks, cams_dir=args.cams, manifest=args.manifest, out_path=args.out,
                saliency_dir=args.saliency_dir, timings=args.timings)["timing"]
        return (f"{t['images']} masks in {args.out} ({t['images_per_s']} images/s, "
                f"crf: {'on' if t['crf'] else 'off'}, {t['workers']} worker(s))")

    return stage_main("export_masks", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
