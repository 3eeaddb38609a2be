"""Stage ``evaluate``: quality of pseudo-masks (and, later, of segmentation predictions).

``python -m tasks.evaluate`` compares the masks of a prediction source -- the pseudo-mask
HDF5 file (default ``data/pseudo_masks.h5``) or a folder of VOC-style ``<id>.png`` label maps
(``--predictions DIR``) -- with the ground truth of ``evaluate.splits`` and writes:

* ``data/metrics/eval_pseudo.json`` (DVC metrics): mIoU with 255 ignored in the ground truth,
  and the authors' mode that also ignores 255 in predictions (``miou_ignore_pred_255``);
  boundary precision/recall/F1 (paper Table 1); the co-occurrence confusion ratio
  ``m_{k,c} = FP_{k,c} / TP_c`` of every (context, class) pair the dataset defines (Table 2);
  the inference and CRF throughput recorded by the earlier stages;
* ``data/eval/``: ``per_class.csv``, ``confusion.csv``, ``cooccurrence.csv``,
  ``threshold_sweep.csv`` and ``report.png`` (rows: image | saliency | CAM | pseudo-mask | GT);
* ``data/plots/eval_pseudo_threshold_sweep.csv`` (DVC plot): mIoU of the CAM argmax against a
  constant background threshold (no CRF). It is a curve for the reader; the threshold used is
  ``export_masks.bg_threshold`` and the sweep never changes it (its best point uses the ground
  truth, so it is an oracle, reported as such).

Metric definitions live in :mod:`method.metrics`.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from artifacts.cams import CamRecord, PseudoMaskError, cam_path, read_cam_file
from artifacts.pseudo_masks import PseudoMasks, open_predictions
from core.atomic import atomic_path, write_text_atomic
from core.config import EvaluateConfig
from core.parallel import parallel_map
from core.paths import (
    CAMS_DIR,
    EVAL_DIR,
    EVAL_PSEUDO_METRICS,
    MANIFEST,
    PSEUDO_MASKS,
    RESCUED_SALIENCY_DIR,
    THRESHOLD_SWEEP_PLOT,
)
from core.stage_cli import stage_main
from dataio.label_png import voc_palette
from method.metrics import (
    SegEvaluator,
    boundary_counts,
    confusion_matrix,
    context_pixels,
    cooccurrence_fp,
    scores_from_confusion,
)


class EvaluateError(ValueError):
    """Evaluation cannot run as asked (no ground truth, missing predictions, size mismatch)."""


# --------------------------------------------------------------------------- per image


def sweep_masks(rec: CamRecord, thresholds: Sequence[float]) -> list[np.ndarray]:
    """Argmax masks of ``[t, CAMs]`` for each constant background score ``t`` (ties -> background)."""
    h, w = rec.size
    if len(rec.classes) == 0:
        return [np.zeros((h, w), dtype=np.uint8) for _ in thresholds]
    top = rec.cams.max(0)
    label = (np.asarray(rec.classes)[rec.cams.argmax(0)] + 1).astype(np.uint8)
    return [np.where(top > t, label, 0).astype(np.uint8) for t in thresholds]


_WORKER: dict[str, Any] = {}


def _init_worker(dataset, source: str | None, num_classes: int, context_class: dict, tolerance: float,
                 thresholds: list[float], cams_dir: str | None, preds=None) -> None:
    _WORKER.clear()
    _WORKER.update(dataset=dataset, source=source, preds=preds, num_classes=num_classes,
                   context_class=context_class, tolerance=tolerance, thresholds=thresholds,
                   cams_dir=cams_dir)


def _preds():
    if _WORKER.get("preds") is None:
        _WORKER["preds"] = open_predictions(_WORKER["source"])
    return _WORKER["preds"]


def _cam_record(image_id: str) -> CamRecord | None:
    cams_dir = _WORKER["cams_dir"]
    if cams_dir == "h5":
        return _preds().cams(image_id)
    if cams_dir:
        return read_cam_file(cam_path(cams_dir, image_id))
    return None


def _evaluate_one(image_id: str) -> tuple:
    ds = _WORKER["dataset"]
    n = _WORKER["num_classes"] + 1
    gt = ds.load_mask(image_id)
    if gt is None:
        raise EvaluateError(f"no ground-truth mask for image {image_id}")
    pred = _preds().mask(image_id)
    if pred.shape != gt.shape:
        raise EvaluateError(f"prediction of {image_id} is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
                            f"is {gt.shape[1]}x{gt.shape[0]}")
    conf = confusion_matrix(gt, pred, n)
    bnd = boundary_counts(gt, pred, _WORKER["tolerance"])
    ctx_fp, ctx_px = {}, {}
    if _WORKER["context_class"]:
        ctx = ds.load_context(image_id)
        if ctx is None:
            raise EvaluateError(f"the dataset defines contexts but image {image_id} has no context map")
        ctx_fp = cooccurrence_fp(gt, pred, ctx, _WORKER["context_class"])
        ctx_px = context_pixels(gt, ctx, _WORKER["context_class"])
    sweep = None
    thresholds = _WORKER["thresholds"]
    if thresholds:
        rec = _cam_record(image_id)
        if rec is not None:
            if tuple(rec.size) != gt.shape:
                raise EvaluateError(f"CAMs of {image_id} are {rec.size[1]}x{rec.size[0]} but its ground truth is "
                                    f"{gt.shape[1]}x{gt.shape[0]}")
            masks = sweep_masks(rec, thresholds)
            ctx_sweep = [cooccurrence_fp(gt, m, ctx, _WORKER["context_class"]) for m in masks] if ctx_fp else None
            sweep = (np.stack([confusion_matrix(gt, m, n) for m in masks]), ctx_sweep)
    return conf, bnd, ctx_fp, ctx_px, sweep


# --------------------------------------------------------------------------- report image


def _text(tile: np.ndarray, text: str, scale: float = 0.4) -> np.ndarray:
    import cv2
    out = tile.copy()
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _fit(img: np.ndarray, tile: int, nearest: bool = False) -> np.ndarray:
    import cv2
    h, w = img.shape[:2]
    f = tile / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    canvas = np.full((tile, tile, 3), 255, dtype=np.uint8)
    y, x = (tile - img.shape[0]) // 2, (tile - img.shape[1]) // 2
    canvas[y:y + img.shape[0], x:x + img.shape[1]] = img
    return canvas


def _heat(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    import cv2
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.5 * image + 0.5 * heat).astype(np.uint8)


def _load_saliency(saliency_dir: str | None, image_id: str, hw: tuple[int, int]) -> np.ndarray | None:
    if not saliency_dir:
        return None
    try:
        from artifacts.saliency_maps import load_saliency
        return load_saliency(saliency_dir, image_id, expected_hw=hw)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"evaluate: report shows no saliency for {image_id}: {e}", file=sys.stderr)
        return None


def make_report(path: Path, dataset, preds, ids: Sequence[str], *, cams_source, saliency_dir: str | None,
                tile: int, class_names: Sequence[str]) -> None:
    """``report.png``: one row per id: image | saliency | CAM | pseudo-mask | ground truth."""
    from PIL import Image

    palette = voc_palette()
    header = ["image", "saliency", "CAM (max over labels)", "pseudo-mask", "ground truth"]
    rows = [np.concatenate([_text(np.full((18, tile, 3), 40, dtype=np.uint8), t) for t in header], axis=1)]
    blank = np.full((tile, tile, 3), 200, dtype=np.uint8)
    for image_id in ids:
        image = dataset.load_image(image_id)
        hw = image.shape[:2]
        sal = _load_saliency(saliency_dir, image_id, hw)
        rec = cams_source(image_id)
        pred = preds.mask(image_id)
        gt = dataset.load_mask(image_id)
        tiles = [_text(_fit(image, tile), image_id),
                 _fit(np.repeat((np.clip(sal, 0, 1) * 255).astype(np.uint8)[..., None], 3, 2), tile)
                 if sal is not None else _text(blank, "n/a")]
        if rec is not None and len(rec.classes):
            names = ", ".join(class_names[c] for c in rec.classes)
            tiles.append(_text(_fit(_heat(image, rec.cams.max(0)), tile), names))
        else:
            tiles.append(_text(blank, "n/a"))
        tiles.append(_fit(palette[pred], tile, nearest=True))
        tiles.append(_fit(palette[gt], tile, nearest=True) if gt is not None else _text(blank, "n/a"))
        rows.append(np.concatenate(tiles, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# --------------------------------------------------------------------------- the stage


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return None if not math.isfinite(v) else round(v, 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _eval_ids(cfg: EvaluateConfig, dataset, splits: Sequence[str], preds) -> list[str]:
    ids, seen = [], set()
    for split in splits:
        if not dataset.has_masks(split):
            raise EvaluateError(f"split '{split}' has no ground-truth masks; set params key 'evaluate.splits' "
                                f"to splits with masks")
        for i in dataset.ids(split):
            if i not in seen:
                seen.add(i)
                ids.append(i)
    if not ids:
        raise EvaluateError(f"splits {list(splits)} hold no images")
    missing = [i for i in ids if i not in preds]
    if missing:
        raise EvaluateError(f"{len(missing)} of {len(ids)} images of splits {list(splits)} have no prediction in "
                            f"{preds.path}, e.g. {missing[0]}; export them (or evaluate other splits)")
    return ids


def evaluate(cfg: EvaluateConfig, dataset, predictions: str | Path, *, out_dir: str | Path,
             metrics_path: str | Path, plots_path: str | Path | None = None,
             cams_dir: str | Path | None = None, saliency_dir: str | Path | None = None,
             splits: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Evaluate ``predictions`` (HDF5 or PNG folder) against ``dataset``; returns the metrics dict.

    ``cams_dir``: CAM files for the threshold sweep and the report's CAM column (default: the
    CAMs stored in the HDF5 file, if any; no sweep without CAMs).
    """
    splits = list(splits or cfg.splits)
    source = Path(predictions)
    preds = open_predictions(source)
    try:
        ids = _eval_ids(cfg, dataset, splits, preds)
        attrs = preds.attrs if isinstance(preds, PseudoMasks) else {}
        if isinstance(preds, PseudoMasks):
            expected = ["background", *dataset.class_names]
            if preds.class_names != expected:
                raise EvaluateError(f"{source} was made for classes {preds.class_names[1:]}, the dataset has "
                                    f"{list(dataset.class_names)}")
        cams_arg: str | None = None
        if cams_dir is not None and Path(cams_dir).is_dir() and (Path(cams_dir) / "meta.json").is_file():
            cams_arg = str(cams_dir)
        elif isinstance(preds, PseudoMasks) and preds.has_cams:
            cams_arg = "h5"
        thresholds = [float(t) for t in cfg.sweep_thresholds] if cams_arg else []
        context_class = dict(getattr(dataset, "context_class", {}) or {})
        n_labels = dataset.num_classes + 1
        acc = SegEvaluator(dataset.num_classes, context_class, cfg.boundary_tolerance)
        sweep_conf = np.zeros((len(thresholds), n_labels, n_labels + 1), dtype=np.int64)
        sweep_ctx = [dict.fromkeys(context_class, 0) for _ in thresholds]   # FP_kc at each threshold
        init = (dataset, str(source), dataset.num_classes, context_class, cfg.boundary_tolerance,
                thresholds, cams_arg)
        try:
            with parallel_map(_evaluate_one, ids, workers=cfg.workers, initializer=_init_worker, initargs=init,
                              local_initializer=functools.partial(_init_worker, *init, preds=preds),
                              chunksize=max(1, min(32, len(ids) // (4 * max(1, cfg.workers)))),
                              progress=progress, desc="evaluate") as results:
                for conf, bnd, ctx_fp, ctx_px, sweep in results:
                    acc.conf += conf
                    acc.boundary += bnd
                    for k, v in ctx_fp.items():
                        acc.context_fp[k] += v
                    for k, v in ctx_px.items():
                        acc.context_px[k] += v
                    acc.images += 1
                    if sweep is not None:
                        sweep_conf += sweep[0]
                        for acc_t, fp_t in zip(sweep_ctx, sweep[1] or []):
                            for k, v in fp_t.items():
                                acc_t[k] += v
        except PseudoMaskError as e:
            raise EvaluateError(str(e)) from None
        summary = acc.summary()
        names = ["background", *dataset.class_names]
        ctx_names = list(getattr(dataset, "context_names", []) or [])
        sweep_rows = []
        for t, conf, fps in zip(thresholds, sweep_conf, sweep_ctx):
            s = scores_from_confusion(conf)
            pairs = {k: fp / s["tp"][context_class[k] + 1] if s["tp"][context_class[k] + 1] > 0 else math.nan
                     for k, fp in fps.items()}
            sweep_rows.append({"threshold": t, "miou": s["miou"],
                               "mean_mkc": _finite_mean(pairs.values()),
                               "pairs": pairs, "mean_precision": s["mean_precision"],
                               "mean_recall": s["mean_recall"]})
        metrics = _metrics(summary, names, ctx_names, sweep_rows, attrs, cfg, context_class)
        _write_outputs(Path(out_dir), Path(metrics_path), Path(plots_path) if plots_path else None, summary,
                       names, ctx_names, sweep_rows, metrics, dataset, preds, ids, cams_arg, saliency_dir, cfg)
        return metrics
    finally:
        preds.close()


def _finite_mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _pair_name(context: int, context_class: dict, names: list[str], ctx_names: list[str]) -> str:
    """``rail->train``: a context and its class, as the co-occurrence table names them."""
    ctx = ctx_names[context - 1] if 0 < context <= len(ctx_names) else str(context)
    return f"{ctx}->{names[context_class[context] + 1]}"


def _metrics(summary: dict, names: list[str], ctx_names: list[str], sweep_rows: list[dict], attrs: dict,
             cfg: EvaluateConfig, context_class: dict | None = None) -> dict:
    std, authors, bnd = summary["standard"], summary["ignore_pred_255"], summary["boundary"]
    pairs = {}
    for p in summary["cooccurrence"]:
        key = f"{ctx_names[p['context'] - 1] if p['context'] - 1 < len(ctx_names) else p['context']}" \
              f"->{names[p['class'] + 1]}"
        pairs[key] = {"ratio": p["ratio"], "context_share": p["context_share"], "class_iou": p["class_iou"]}
    ratios = [p["ratio"] for p in summary["cooccurrence"] if not math.isnan(p["ratio"])]
    metrics: dict[str, Any] = {
        "images": summary["images"],
        "miou": std["miou"],
        "miou_ignore_pred_255": authors["miou"],
        "pixel_accuracy": std["pixel_accuracy"],
        "mean_precision": std["mean_precision"],
        "mean_recall": std["mean_recall"],
        "boundary": {**bnd, "tolerance_px": cfg.boundary_tolerance},
        "cooccurrence": {"mean_ratio": float(np.mean(ratios)) if ratios else math.nan, "pairs": pairs},
        "per_class_iou": {n: v for n, v in zip(names, std["iou"])},
    }
    if sweep_rows:
        best = max((r for r in sweep_rows if not math.isnan(r["miou"])), key=lambda r: r["miou"], default=None)
        # the best constant threshold against the ground truth: an oracle, information only
        metrics["threshold_sweep"] = {
            "oracle_threshold": best["threshold"] if best else math.nan,
            "oracle_miou": best["miou"] if best else math.nan,
            "oracle_mean_mkc": best["mean_mkc"] if best else math.nan,
            "oracle_pairs": ({_pair_name(k, context_class, names, ctx_names): v for k, v in best["pairs"].items()}
                             if best else {})}
    if attrs:
        metrics["source"] = {k: attrs.get(k) for k in ("method", "background", "bg_threshold", "class_activation")}
        crf = attrs.get("crf")
        metrics["source"]["crf"] = crf.get("preset") if isinstance(crf, dict) else "none"
    return _clean(metrics)


def _write_outputs(out_dir: Path, metrics_path: Path, plots_path: Path | None, summary: dict, names: list[str],
                   ctx_names: list[str], sweep_rows: list[dict], metrics: dict, dataset, preds, ids: list[str],
                   cams_arg: str | None, saliency_dir, cfg: EvaluateConfig) -> None:
    import pandas as pd

    std, authors = summary["standard"], summary["ignore_pred_255"]
    per_class = pd.DataFrame({
        "label": range(len(names)), "name": names,
        "iou": std["iou"], "precision": std["precision"], "recall": std["recall"],
        "iou_ignore_pred_255": authors["iou"],
        "gt_pixels": std["gt_pixels"].astype(np.int64), "pred_pixels": std["pred_pixels"].astype(np.int64),
        "tp_pixels": std["tp"].astype(np.int64)})
    conf = pd.DataFrame(summary["confusion"], index=[f"gt:{n}" for n in names],
                        columns=[f"pred:{n}" for n in names] + ["pred:other(255)"])
    cooc = pd.DataFrame([{"context": p["context"],
                          "context_name": ctx_names[p["context"] - 1] if p["context"] - 1 < len(ctx_names) else "",
                          "class": p["class"], "class_name": names[p["class"] + 1], "fp_pixels": p["fp"],
                          "tp_pixels": int(p["tp"]), "ratio": p["ratio"], "context_pixels": p["context_pixels"],
                          "context_share": p["context_share"], "class_iou": p["class_iou"]}
                         for p in summary["cooccurrence"]],
                        columns=["context", "context_name", "class", "class_name", "fp_pixels", "tp_pixels",
                                 "ratio", "context_pixels", "context_share", "class_iou"])
    sweep = pd.DataFrame(sweep_rows, columns=["threshold", "miou", "mean_mkc", "mean_precision", "mean_recall"])
    with atomic_path(out_dir, is_dir=True) as tmp:
        per_class.to_csv(tmp / "per_class.csv", index=False, float_format="%.6f")
        conf.to_csv(tmp / "confusion.csv")
        cooc.to_csv(tmp / "cooccurrence.csv", index=False, float_format="%.6f")
        sweep.to_csv(tmp / "threshold_sweep.csv", index=False, float_format="%.6f")
        if cfg.report_images > 0:
            k = min(cfg.report_images, len(ids))
            sample = [ids[int(i)] for i in np.unique(np.linspace(0, len(ids) - 1, k).round().astype(int))]
            make_report(tmp / "report.png", dataset, preds, sample, cams_source=_report_cams(cams_arg, preds),
                        saliency_dir=str(saliency_dir) if saliency_dir else None, tile=cfg.report_tile,
                        class_names=list(dataset.class_names))
    if plots_path is not None:
        with atomic_path(plots_path) as tmp:
            sweep.to_csv(tmp, index=False, float_format="%.6f")
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")


def _report_cams(cams_arg: str | None, preds):
    """CAM records for the report: from the CAM folder, the HDF5 file, or none."""
    def source(image_id: str) -> CamRecord | None:
        try:
            if cams_arg == "h5":
                return preds.cams(image_id)
            return read_cam_file(cam_path(cams_arg, image_id)) if cams_arg else None
        except PseudoMaskError as e:
            print(f"evaluate: report shows no CAM for {image_id}: {e}", file=sys.stderr)
            return None
    return source


def run(cfg: EvaluateConfig, *, predictions: str | Path = PSEUDO_MASKS,
        manifest: str | Path = MANIFEST, cams_dir: str | Path | None = CAMS_DIR,
        saliency_dir: str | Path | None = RESCUED_SALIENCY_DIR, out_dir: str | Path = EVAL_DIR,
        metrics_path: str | Path = EVAL_PSEUDO_METRICS,
        plots_path: str | Path | None = THRESHOLD_SWEEP_PLOT,
        splits: Sequence[str] | None = None, progress: bool = True) -> dict:
    """The stage: open the dataset and the predictions, evaluate, write the outputs."""
    from dataio.manifest import open_dataset

    dataset = open_dataset(manifest)
    return evaluate(cfg, dataset, predictions, out_dir=out_dir, metrics_path=metrics_path, plots_path=plots_path,
                    cams_dir=cams_dir, saliency_dir=saliency_dir, splits=splits, progress=progress)


def main(argv: list[str] | None = None) -> int:
    def arguments(ap):
        ap.add_argument("--splits", nargs="*", help="override evaluate.splits (e.g. val for segmentation predictions)")

    paths = {"--predictions": (PSEUDO_MASKS, "pseudo-mask/prediction HDF5 file, or a folder of <id>.png label maps"),
             "--manifest": MANIFEST, "--cams": (CAMS_DIR, "CAM folder for the sweep and report ('' = none)"),
             "--saliency-dir": (RESCUED_SALIENCY_DIR, "saliency maps for the report ('' = none)"), "--out": EVAL_DIR,
             "--metrics": EVAL_PSEUDO_METRICS, "--plots": THRESHOLD_SWEEP_PLOT}

    def body(args, params) -> str:
        m = run(params.evaluate, predictions=args.predictions, manifest=args.manifest, cams_dir=args.cams or None,
                saliency_dir=args.saliency_dir or None, out_dir=args.out, metrics_path=args.metrics,
                plots_path=args.plots or None, splits=args.splits or None)
        return (f"{m['images']} images: mIoU {m['miou']}, boundary F1 {m['boundary']['f1']}, "
                f"mean confusion ratio {m['cooccurrence']['mean_ratio']} -> {args.metrics}")

    return stage_main("evaluate", __doc__, argv, paths, body, add_arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())
