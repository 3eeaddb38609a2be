"""float32 against channels-last and bfloat16 inference: speed ratios and what they do to the masks.

    python bench/bench_precision.py                  # the embedded project's trained networks (dvc repro first)
    python bench/bench_precision.py --limit 100 --resnet38-size 256

Speed: the forward pass of ResNet-38 (random weights: the speed does not depend on them) and of the
default backbone's classifier (``data/train_cls/classifier.pt``), one batch, median of ``--repeat`` runs
after warm-up, in each mode: fp32, channels_last, bf16, bf16 + channels_last.

Quality: ``infer_cam`` (params.yaml's scales and flip) on the first ``--limit`` train images, masks by
``export_masks`` (params.yaml's rule, saliency from ``data/saliency_rescued``), mIoU against the ground truth;
``predict_seg`` (``data/train_seg/segmenter.pt``) on the first ``--limit`` val images, mIoU;
``refine_masks`` (``data/train_affinity``'s AffinityNet walking ``data/pseudo_masks.h5``) on the train
images, mIoU. Each mode's mIoU is printed with its change from fp32 and its images/s; a stage's
``precision: auto`` picks bf16 only where this keeps its mIoU within 0.005 (the rule in the README).
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from artifacts.saliency_maps import load_saliency  # noqa: E402
from core.config import load_params  # noqa: E402
from core.paths import CLASSIFIER, MANIFEST, RESCUED_SALIENCY_DIR, SEGMENTER  # noqa: E402
from core.sizing import sized  # noqa: E402
from method.metrics import SegEvaluator  # noqa: E402
from models.classifier import build_classifier, load_classifier  # noqa: E402
from models.precision import prepare_model, run_model  # noqa: E402
from tasks.export_masks import make_mask  # noqa: E402
from tasks.infer_cam import infer_images  # noqa: E402

MODES = {"fp32": ("fp32", False), "channels_last": ("fp32", True), "bf16": ("bf16", False),
         "bf16+channels_last": ("bf16", True)}
CPU = torch.device("cpu")


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, precision: str, channels_last: bool,
                    repeat: int) -> float:
    prepare_model(model, channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeat + 2):          # two warm-up passes
            t0 = time.perf_counter()
            run_model(model, x, CPU, precision, channels_last)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    prepare_model(model, False)
    return statistics.median(times)


def speed_table(name: str, model: torch.nn.Module, x: torch.Tensor, repeat: int) -> None:
    base = None
    for mode, (precision, cl) in MODES.items():
        s = forward_seconds(model, x, precision, cl, repeat)
        base = base or s
        print(f"  {name:<22} {mode:<20} {s * 1000:8.1f} ms  {base / s:5.2f}x of fp32", flush=True)


def pseudo_mask_miou(params, ds, ids: list[str], model, meta, mode: str) -> tuple[float, float]:
    precision, cl = MODES[mode]
    cfg = params.infer_cam.__class__(**{**params.infer_cam.__dict__, "precision": precision, "channels_last": cl})
    prepare_model(model, cl)
    ev = SegEvaluator(ds.num_classes, ds.context_class)
    seconds = 0.0
    for start in range(0, len(ids), cfg.batch_images):
        chunk = ids[start:start + cfg.batch_images]
        imgs = [ds.load_image(i) for i in chunk]
        t0 = time.perf_counter()
        recs = infer_images(model, meta["method"], imgs, [ds.labels(i) for i in chunk], cfg, CPU)
        seconds += time.perf_counter() - t0
        for image_id, img, rec in zip(chunk, imgs, recs):
            sal = load_saliency(REPO / RESCUED_SALIENCY_DIR, image_id, img.shape[:2])
            ev.add(ds.load_mask(image_id), make_mask(rec, params.export_masks, img, sal), ds.load_context(image_id))
    prepare_model(model, False)
    return float(np.nanmean(ev.summary()["standard"]["iou"])), len(ids) / seconds


def segmenter_miou(params, ds, ids: list[str], model, mode: str) -> tuple[float, float]:
    from tasks.predict_seg import label_map, predict_probs

    precision, cl = MODES[mode]
    cfg = sized(params.predict_seg, "predict_seg", ds)
    prepare_model(model, cl)
    ev = SegEvaluator(ds.num_classes)
    seconds = 0.0
    with torch.inference_mode():
        for image_id in ids:
            img = ds.load_image(image_id)
            t0 = time.perf_counter()
            probs = predict_probs(model, img, cfg.scales, cfg.flip, CPU, precision, cl)
            seconds += time.perf_counter() - t0
            ev.add(ds.load_mask(image_id), label_map(probs))
    prepare_model(model, False)
    return float(np.nanmean(ev.summary()["standard"]["iou"])), len(ids) / seconds


def refined_miou(params, ds, ids: list[str], mode: str) -> tuple[float, float]:
    """AffinityNet's walk (``refine_masks``, params.yaml) on the pseudo-masks of ``ids``."""
    import dataclasses

    from core.paths import AFFINITY_NET, PSEUDO_MASKS
    from method.mask_scores import MaskScores
    from models.affinity import load_affinity_net
    from tasks.refine_masks import refine_one

    precision, cl = MODES[mode]
    cfg = dataclasses.replace(params.refine_masks, precision=precision, channels_last=cl)
    model, meta = load_affinity_net(REPO / AFFINITY_NET)
    prepare_model(model, cl)
    scores = MaskScores(REPO / PSEUDO_MASKS, REPO / RESCUED_SALIENCY_DIR)
    ev = SegEvaluator(ds.num_classes, ds.context_class)
    seconds = 0.0
    try:
        for image_id in ids:
            s, values, _ = scores.scores(image_id)
            image = ds.load_image(image_id)
            t0 = time.perf_counter()
            mask = refine_one(model, image, s, values, cfg, int(meta.get("radius", 5)), CPU)
            seconds += time.perf_counter() - t0
            ev.add(ds.load_mask(image_id), mask, ds.load_context(image_id))
    finally:
        scores.close()
    return float(np.nanmean(ev.summary()["standard"]["iou"])), len(ids) / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--limit", type=int, default=200, help="images per quality check (0 = the whole split)")
    ap.add_argument("--repeat", type=int, default=7, help="timed forward passes per mode (median)")
    ap.add_argument("--resnet38-size", type=int, default=320, help="ResNet-38 input side (VOC crops: 448)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-quality", action="store_true", help="speed only (no trained networks needed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, bf16 kernels: {torch.backends.mkldnn.is_available()}")
    params = load_params(args.params)

    print("forward pass (one batch), median of", args.repeat)
    r38 = build_classifier("eps", "resnet38d", 20, output_stride=8, pretrained=False).eval()
    speed_table(f"resnet38d 1x{args.resnet38_size}^2", r38,
                torch.rand(1, 3, args.resnet38_size, args.resnet38_size), args.repeat)
    del r38
    if args.skip_quality:
        return 0
    cls, meta = load_classifier(REPO / CLASSIFIER)
    cls.eval()
    speed_table(f"{meta['backbone']} 8x128^2", cls, torch.rand(8, 3, 128, 128), args.repeat)

    from dataio.manifest import open_dataset
    ds = open_dataset(REPO / MANIFEST)
    train = ds.ids("train")[:args.limit or None]
    val = ds.ids("val")[:args.limit or None]
    from models.deeplab import load_segmenter
    seg, _ = load_segmenter(REPO / SEGMENTER, map_location=CPU)
    print(f"masks: pseudo-masks of {len(train)} train images (infer_cam + export_masks as params.yaml), "
          f"segmenter on {len(val)} val images (predict_seg)")
    checks = {"infer_cam": lambda mode: pseudo_mask_miou(params, ds, train, cls, meta, mode),
              "predict_seg": lambda mode: segmenter_miou(params, ds, val, seg, mode),
              "refine_masks": lambda mode: refined_miou(params, ds, train, mode)}
    print("stage            mode                  mIoU (change)      img/s (ratio)")
    for stage, check in checks.items():
        base = None
        for mode in MODES:
            miou, rate = check(mode)
            base = base or (miou, rate)
            print(f"  {stage:<14} {mode:<20} {miou:.4f} ({miou - base[0]:+.4f})  {rate:6.1f} ({rate / base[1]:.2f}x)",
                  flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
