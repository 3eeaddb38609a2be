"""Stage ``refine_masks``: the pseudo-masks refined by a random walk on AffinityNet's affinities (psa's
``infer_aff``; the paper's Table 4 "AffinityNet" column).

``python -m tasks.refine_masks`` reads ``data/train_affinity/affinity.pt``, ``data/pseudo_masks.h5``
(the CAMs and background rule of each image, :mod:`method.mask_scores`), the images and, for the
saliency rules, ``data/saliency_rescued/``, and writes ``data/refined_masks.h5``: the layout of the pseudo-mask
file (:mod:`artifacts.pseudo_masks`, masks only) with the source file's provenance and the refinement's
params in its attributes. ``train_seg.mask_source: refined`` trains the segmenter on it; the
``evaluate_refined`` stage scores it.

Per image: the affinities of every cell with its partners closer than the training radius
(:func:`models.affinity.pair_affinities`), raised to ``beta``; scores averaged over each cell of the
grid (psa: ``avg_pool2d`` over the padded image); ``2^logt`` random-walk steps
(:func:`models.affinity.random_walk`); bilinear upsampling to the image; argmax. ``background: psa``
walks ``[(1 - max CAM)^alpha, CAMs]`` as psa does; ``background: export`` walks the class maps only,
renormalised to max 1 as CAMs are, and keeps the export's background score at image resolution (a
saliency background is sharper than any grid). The whole file is written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from artifacts.cams import PseudoMaskError
from artifacts.pseudo_masks import PseudoMasks, PseudoMaskWriter
from core.atomic import atomic_path
from core.config import RefineMasksConfig, result_params
from core.hashing import file_sha256
from core.paths import AFFINITY_NET, MANIFEST, PSEUDO_MASKS, REFINED_MASKS, RESCUED_SALIENCY_DIR
from core.stage_cli import stage_main
from core.timings import write_timings
from core.training import default_threads
from method.mask_scores import MaskScores
from models.affinity import AffinityError, AffinityNet, load_affinity_net, pair_affinities, pair_offsets, random_walk
from models.precision import prepare_model, resolve_precision, run_model


class RefineMasksError(ValueError):
    """The refinement cannot run as asked; the message names the file or params key."""


def walk_scores(scores: np.ndarray, aff: torch.Tensor, offsets: list[tuple[int, int]], stride: int,
                beta: float, logt: int) -> np.ndarray:
    """``scores`` ``(C, H, W)`` averaged over each ``stride`` cell (zero-padded to whole cells), walked
    ``2^logt`` steps on the grid of ``aff`` ``(K, h, w)``, upsampled bilinearly to ``(C, H, W)``."""
    c, h, w = scores.shape
    x = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).to(aff.device)[None]
    x = F.pad(x, (0, (-w) % stride, 0, (-h) % stride))
    grid = F.avg_pool2d(x, stride, stride)[0]
    if grid.shape[-2:] != aff.shape[-2:]:
        raise RefineMasksError(f"score grid {tuple(grid.shape[-2:])} and affinity grid {tuple(aff.shape[-2:])} "
                               f"differ")
    walked = random_walk(grid, aff, offsets, beta, 2 ** logt)
    up = F.interpolate(walked[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, :, :h, :w]
    return up.cpu().numpy()


def refine_one(model: AffinityNet, image: np.ndarray, scores: np.ndarray, values: np.ndarray,
               cfg: RefineMasksConfig, radius: int, device: torch.device) -> np.ndarray:
    """The refined uint8 mask of one image from its candidate scores ``[background, CAMs]``."""
    offsets = pair_offsets(radius)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0).to(device)
    with torch.no_grad():
        aff = pair_affinities(run_model(model, x, device, cfg.precision, cfg.channels_last), offsets)[0]
        stride = model.feature_stride
        if cfg.background == "psa":
            cams = scores[1:]
            bg = (1.0 - (cams.max(0) if len(cams) else np.zeros(scores.shape[1:], np.float32))) ** cfg.alpha
            walked = walk_scores(np.concatenate([bg[None], cams]), aff, offsets, stride, cfg.beta, cfg.logt)
        else:
            cams = walk_scores(scores[1:], aff, offsets, stride, cfg.beta, cfg.logt) if len(scores) > 1 \
                else scores[1:]
            peak = cams.reshape(len(cams), -1).max(1) if len(cams) else np.zeros(0, np.float32)
            cams = cams / np.maximum(peak, 1e-5)[:, None, None]
            walked = np.concatenate([scores[:1], cams])
    return np.asarray(values, dtype=np.uint8)[np.argmax(walked, axis=0)]


def refine(cfg: RefineMasksConfig, model_path: str | Path, masks_path: str | Path, out_path: str | Path, *,
           dataset: Any, saliency_dir: str | Path | None = None, progress: bool = True, on_image=None) -> dict:
    """Write the refined-mask file; returns its attributes (with ``timing``, which is not in the file)."""
    masks_path, out_path = Path(masks_path), Path(out_path)
    try:
        scores = MaskScores(masks_path, saliency_dir)
        with PseudoMasks(masks_path) as pm:
            source_attrs = pm.attrs
    except PseudoMaskError as e:
        raise RefineMasksError(str(e)) from None
    try:
        model, meta = load_affinity_net(model_path)
    except AffinityError as e:
        raise RefineMasksError(str(e)) from None
    if list(meta.get("class_names", scores.class_names[1:])) != scores.class_names[1:]:
        raise RefineMasksError(f"{model_path} was trained for classes {meta.get('class_names')}, {masks_path} has "
                               f"{scores.class_names[1:]}; rerun train_affinity")
    ids = list(scores.ids)
    for image_id in ids:  # header reads only: a size mismatch stops the stage before it starts
        size = tuple(dataset.image_size(image_id)) if hasattr(dataset, "image_size") else None
        if size is not None and size != scores.size(image_id):
            raise RefineMasksError(f"image {image_id} is {size[1]}x{size[0]} but its CAMs in {masks_path} are not; "
                                   f"rerun infer_cam and export_masks")
    device = torch.device("cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RefineMasksError("params key 'refine_masks.device' is cuda but no CUDA device is available")
    prepare_model(model.to(device), cfg.channels_last)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))   # recorded as used
    attrs = {k: source_attrs[k] for k in ("method", "checkpoint_sha256", "scales", "flip", "class_activation",
                                          "background", "bg_threshold", "crf", "splits") if k in source_attrs}
    attrs["refinement"] = {"kind": "affinitynet_random_walk", "refine_masks": result_params(cfg),
                           "radius": int(meta.get("radius", 5)), "feature_stride": model.feature_stride,
                           "affinity_sha256": meta.get("sha256"), "pseudo_masks_sha256": file_sha256(masks_path)}
    attrs["params"] = {"source": source_attrs.get("params"), "refine_masks": result_params(cfg)}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads(1))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), desc="refine_masks", unit="img", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        with atomic_path(out_path) as tmp, \
                PseudoMaskWriter(tmp, scores.class_names[1:], attrs, compression=cfg.compression) as writer:
            for n, image_id in enumerate(ids, start=1):
                s, values, _ = scores.scores(image_id)
                image = np.asarray(dataset.load_image(image_id))
                writer.add(image_id, refine_one(model, image, s, values, cfg, int(meta.get("radius", 5)), device))
                if bar is not None:
                    bar.update(1)
                if on_image is not None:
                    on_image(n)
    except PseudoMaskError as e:
        raise RefineMasksError(str(e)) from None
    finally:
        torch.set_num_threads(threads_before)
        scores.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    return dict(attrs, timing={"images": len(ids), "seconds": round(wall, 3),
                               "images_per_s": round(len(ids) / wall, 3) if wall > 0 else None,
                               "device": str(device),
                               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)})


def run(cfg: RefineMasksConfig, *, model_path: str | Path = AFFINITY_NET, masks_path: str | Path = PSEUDO_MASKS,
        manifest: str | Path = MANIFEST, saliency_dir: str | Path | None = RESCUED_SALIENCY_DIR,
        out_path: str | Path = REFINED_MASKS, timings: str | Path | None = None, progress: bool = True) -> dict:
    """The stage: refine every image of the pseudo-mask file (timings to ``timings``: :mod:`core.timings`)."""
    from dataio.manifest import open_dataset

    attrs = refine(cfg, model_path, masks_path, out_path, dataset=open_dataset(manifest),
                   saliency_dir=saliency_dir, progress=progress)
    write_timings(timings, {"timing": attrs["timing"]})
    return attrs


def main(argv: list[str] | None = None) -> int:
    paths = {"--model": (AFFINITY_NET, "trained affinity network (train_affinity)"),
             "--masks": (PSEUDO_MASKS, "pseudo-mask HDF5 file with CAMs (export_masks)"),
             "--manifest": MANIFEST, "--saliency-dir": (RESCUED_SALIENCY_DIR, "saliency maps (saliency background rules)"),
             "--out": REFINED_MASKS}

    def body(args, params) -> str:
        t = run(params.refine_masks, model_path=args.model, masks_path=args.masks, manifest=args.manifest,
                saliency_dir=args.saliency_dir or None, out_path=args.out, timings=args.timings)["timing"]
        return f"{t['images']} refined masks in {args.out} ({t['images_per_s']} images/s on {t['device']})"

    return stage_main("refine_masks", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
