"""Throughput and memory of CAM inference and of the dense CRF; prints figures, asserts nothing.

    python bench/bench_infer.py                         # random-weight efficientnet_lite0 eps classifier
    python bench/bench_infer.py --checkpoint data/train_cls/classifier.pt --manifest data/prepared/dataset.json

Inference: ``tasks.infer_cam.infer_images`` (all scales x flip, as the stage runs it) on
``--images`` images (from the dataset when ``--manifest`` is given, else random RGB of
``--size``), for every ``--batch-images`` value; images/s after one warm-up chunk, and the
peak resident memory of the process. CRF: ``method.crf.crf_argmax`` on the same images with
both presets, one process (multiply by export_masks.workers for the stage's rate on idle cores).

Pseudo-mask table (the stage code end to end, on finished ``infer_cam`` outputs)::

    python bench/bench_infer.py --table eps=data/cams cam=/tmp/cams_cam --manifest data/prepared/dataset.json

exports every CAM folder without and with the CRF (params.yaml's ``export_masks``, CRF switched
on/off) into a temporary folder, evaluates each (``evaluate``), and prints a markdown table:
mIoU, boundary F1, the co-occurrence confusion ratios, inference and export images/s.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import InferCamConfig  # noqa: E402
from core.paths import MANIFEST, SALIENCY_DIR
from method.crf import CRF_PRESETS, crf_argmax  # noqa: E402
from method.mask_rule import mask_scores  # noqa: E402
from tasks.infer_cam import infer_images, select_device  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    if args.manifest:
        from dataio.manifest import open_dataset
        ds = open_dataset(args.manifest)
        ids = ds.ids(args.split)[:args.images]
        return [ds.load_image(i) for i in ids], [ds.labels(i) for i in ids], list(ds.class_names)
    rng = np.random.default_rng(0)
    c = args.classes
    imgs = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    labs = []
    for _ in range(args.images):
        v = np.zeros(c, np.float32)
        v[rng.choice(c, size=rng.integers(1, 3), replace=False)] = 1
        labs.append(v)
    return imgs, labs, [f"class{i}" for i in range(c)]


def pseudo_mask_table(entries: list[str], manifest: str, params_path: str, saliency_dir: str,
                      workdir: str | None) -> None:
    """Export + evaluate each ``name=cams_dir`` without and with the CRF; print a markdown table."""
    import dataclasses
    import tempfile

    from core.config import load_params
    from tasks.evaluate import run as evaluate_run
    from tasks.export_masks import run as export_run

    params = load_params(params_path)
    work = Path(workdir or tempfile.mkdtemp(prefix="pseudo_table_"))
    rows = []
    pair_names: list[str] = []
    for entry in entries:
        name, _, cams = entry.partition("=")
        for crf in (False, True):
            tag = f"{name}{'_crf' if crf else ''}"
            cfg = dataclasses.replace(params.export_masks, crf=crf)
            attrs = export_run(cfg, cams_dir=cams, manifest=manifest, out_path=work / f"{tag}.h5", metrics_path=None,
                               progress=False)
            m = evaluate_run(params.evaluate, predictions=work / f"{tag}.h5", manifest=manifest, cams_dir=cams,
                             saliency_dir=saliency_dir or None, out_dir=work / f"eval_{tag}",
                             metrics_path=work / f"{tag}.json", plots_path=work / f"{tag}_sweep.csv",
                             progress=False)
            pairs = m["cooccurrence"]["pairs"]
            pair_names = pair_names or list(pairs)
            rows.append((tag, m, attrs["timing"], pairs))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    head = ["masks", "mIoU", "mIoU (authors' mode)", "boundary F1", "mean m_k,c"] + \
        [f"m {p}" for p in pair_names] + ["export img/s (workers)"]
    print(f"\nresults in {work}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for tag, m, timing, pairs in rows:
        cells = [tag, fmt(m["miou"]), fmt(m["miou_ignore_pred_255"]), fmt(m["boundary"]["f1"]),
                 fmt(m["cooccurrence"]["mean_ratio"])] + [fmt(pairs[p]["ratio"]) for p in pair_names] + \
            [f"{fmt(timing.get('images_per_s'))} ({timing.get('workers')})"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="", help="classifier file; empty = random-weight classifier")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the random classifier")
    ap.add_argument("--method", default="eps", choices=("eps", "cam"))
    ap.add_argument("--manifest", default="", help="dataset manifest; empty = random images")
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="side of the random images")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--batch-images", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-batch-pixels", type=int, default=262_144)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--crf-images", type=int, default=8)
    ap.add_argument("--table", nargs="+", metavar="NAME=CAMS_DIR",
                    help="print the pseudo-mask table for these infer_cam outputs instead of timing inference")
    ap.add_argument("--params", default="params.yaml", help="--table: export_masks / evaluate params")
    ap.add_argument("--saliency-dir", default=SALIENCY_DIR, help="--table: saliency for report.png")
    ap.add_argument("--workdir", default="", help="--table: where the exports go (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.table:
        pseudo_mask_table(args.table, args.manifest or MANIFEST, args.params,
                          args.saliency_dir, args.workdir or None)
        return 0

    imgs, labs, names = _inputs(args)
    if args.checkpoint:
        from models.classifier import load_classifier
        model, meta = load_classifier(args.checkpoint)
    else:
        from models.classifier import build_classifier
        torch.manual_seed(0)
        stride = 8 if args.backbone == "resnet38d" else 16   # resnet38d: stride 8 by design
        model = build_classifier(args.method, args.backbone, len(names), output_stride=stride, pretrained=False).eval()
        meta = {"method": args.method, "backbone": args.backbone}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    model = model.to(device).eval()
    sizes = sorted({f"{i.shape[1]}x{i.shape[0]}" for i in imgs})
    print(f"device {device}, torch threads {torch.get_num_threads()}, {meta['method']} {meta['backbone']}, "
          f"{len(imgs)} images {','.join(sizes)}, scales {args.scales} x flip")
    recs = None
    for bi in args.batch_images:
        cfg = InferCamConfig(scales=args.scales, flip=True, batch_images=bi, max_batch_pixels=args.max_batch_pixels)
        infer_images(model, meta["method"], imgs[:bi], labs[:bi], cfg, device)           # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        recs = []
        for s in range(0, len(imgs), bi):
            recs += infer_images(model, meta["method"], imgs[s:s + bi], labs[s:s + bi], cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        extra = (f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                 if device.type == "cuda" else "")
        print(f"infer  batch_images={bi:<3d}: {len(imgs) / dt:7.2f} images/s  ({dt / len(imgs) * 1000:.1f} ms/image), "
              f"peak RSS {_peak_rss_mib():.0f} MiB{extra}")
    n = min(args.crf_images, len(imgs))
    for preset, params in CRF_PRESETS.items() if n else ():
        t0 = time.perf_counter()
        for img, rec in zip(imgs[:n], recs[:n]):
            scores, _ = mask_scores(rec, "threshold", 0.2)
            crf_argmax(img, scores, params)
        dt = time.perf_counter() - t0
        print(f"crf    {preset:<6s} ({params.iterations} it.): {n / dt:7.2f} images/s per process "
              f"({dt / n * 1000:.1f} ms/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
