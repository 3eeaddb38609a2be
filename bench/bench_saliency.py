"""Saliency backends on a dataset: images/s and quality (MAE, max F, IoU@0.5) per backend.

    python bench/bench_saliency.py                                   # the embedded dataset (data/prepared)
    python bench/bench_saliency.py --voc-real                        # the 4 real VOC photos (.state/fixtures)
    python bench/bench_saliency.py --limit 40 --isnet-sizes 1024 512 320 256 --variants medium small

Each backend runs in this process, one image at a time, with ``--threads`` onnxruntime/OpenCV
threads (the stage runs ``saliency.workers`` such processes side by side). Timings exclude model
loading and the first image (warm-up). Both the wall-clock rate and the CPU seconds per image are
printed, with the load average: on a shared machine the wall rate drops with the load, the CPU
time much less. Quality is scored against the ground-truth foreground as the stage does
(:func:`artifacts.saliency_maps.saliency_scores`).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

from artifacts.saliency_maps import map_histograms, saliency_scores  # noqa: E402
from assets import isnet_model  # noqa: E402
from core.paths import MANIFEST  # noqa: E402
from dataio.manifest import open_dataset  # noqa: E402
from dataio.voc import VOCDataset  # noqa: E402
from tasks.saliency import OnnxSaliency, OpenCVSaliency, onnx_providers  # noqa: E402


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_backend(name: str, backend, dataset, ids: list[str]) -> dict:
    images = [dataset.load_image(i) for i in ids]
    masks = [dataset.load_mask(i) for i in ids]
    backend(images[0])  # warm-up (first-run allocations)
    hists = []
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    for img, mask in zip(images, masks):
        sal = backend(img)
        assert sal.shape == img.shape[:2] and sal.dtype.name == "uint8"
        if mask is not None:
            hists.append(map_histograms(sal, mask))
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    scores = saliency_scores(hists) if hists else {}
    return {"backend": name, "n": len(ids), "img_s": len(ids) / wall, "cpu_s_img": cpu / len(ids), **scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--manifest", default=MANIFEST, help="dataset manifest (default embedded)")
    src.add_argument("--voc-real", action="store_true", help="the 4 real VOC photos (python tests/voc_fixture.py)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=40, help="images of the split (0 = all)")
    ap.add_argument("--isnet-sizes", type=int, nargs="*", default=[1024, 512, 320])
    ap.add_argument("--variants", nargs="*", default=["medium"], choices=sorted(isnet_model.VARIANTS))
    ap.add_argument("--opencv", nargs="*", default=["spectral_residual", "fine_grained"])
    ap.add_argument("--output-scaling", default="clip", choices=("clip", "minmax"))
    ap.add_argument("--threads", type=int, default=1, help="threads per backend (one worker)")
    args = ap.parse_args(argv)

    if args.voc_real:
        from voc_fixture import fetch_voc_fixture
        dataset, label = VOCDataset(fetch_voc_fixture()), "voc_real (4 photos)"
    else:
        dataset, label = open_dataset(args.manifest), args.manifest
    ids = dataset.ids(args.split)
    ids = ids[:args.limit] if args.limit else ids
    cv2.setNumThreads(args.threads)
    providers = onnx_providers("auto")
    print(f"dataset {label}, split {args.split}: {len(ids)} images; {args.threads} thread(s); {providers[0]}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for kind in args.opencv:
        rows.append(bench_backend(kind, OpenCVSaliency(kind), dataset, ids))
        print(_fmt(rows[-1]), flush=True)
    for variant in args.variants:
        path = isnet_model.fetch_isnet(variant)
        for size in args.isnet_sizes:
            backend = OnnxSaliency(path, input_size=size, mean=isnet_model.MEAN, std=isnet_model.STD,
                                   output_scaling=args.output_scaling, threads=args.threads, providers=providers)
            rows.append(bench_backend(f"isnet-{variant}@{size}", backend, dataset, ids))
            print(_fmt(rows[-1]), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def _fmt(r: dict) -> str:
    q = (f"MAE {r['mae']:.3f}  max-F {r['max_f']:.3f}  IoU {r['iou']:.3f}" if "mae" in r else "no masks")
    return (f"{r['backend']:<24} {r['n']:>4} img  {r['img_s']:7.2f} img/s  {r['cpu_s_img']:7.3f} CPU-s/img  {q}")


if __name__ == "__main__":
    sys.exit(main())
