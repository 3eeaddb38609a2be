"""Segmentation quality and cost per mask source: train_seg -> predict_seg -> evaluate.

Trains the segmenter of ``params.yaml`` (with ``--set`` overrides) once per mask source, predicts
the val split (multi-scale + flip as ``predict_seg`` says) and scores it with ``tasks.evaluate``;
prints val mIoU, the single-scale mIoU, training and prediction time, and writes everything to
``<out>/bench_seg.json``.

    python bench/bench_seg.py --masks eps=data/pseudo_masks.h5 --masks cam=/tmp/cam_masks.h5 --gt
    python bench/bench_seg.py --gt --set train_seg.iterations=300 --set train_seg.head=largefov

Mask sources: ``NAME=FILE.h5`` (pseudo-masks written by export_masks) and ``--gt`` (the dataset's
own masks: the fully supervised upper bound, same code and params).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.config import Params, build, load_params, to_dict  # noqa: E402
from core.overrides import apply_overrides, parse_assignment  # noqa: E402
from core.paths import MANIFEST  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--manifest", default=str(REPO / MANIFEST))
    ap.add_argument("--masks", action="append", default=[], metavar="NAME=FILE.h5",
                    help="a pseudo-mask file to train on (repeatable)")
    ap.add_argument("--gt", action="store_true", help="also train on the ground-truth masks (upper bound)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a params key, e.g. train_seg.iterations=300 (repeatable)")
    ap.add_argument("--out", default=str(REPO / ".state/bench_seg"))
    args = ap.parse_args(argv)

    from core.config import EvaluateConfig
    from dataio.manifest import open_dataset
    from tasks import predict_seg, train_seg
    from tasks.evaluate import evaluate

    params = build(Params, apply_overrides(to_dict(load_params(args.params)), map(parse_assignment, args.set)))
    sources = []
    for item in args.masks:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--masks expects NAME=FILE.h5, got {item!r}")
        sources.append((name, "pseudo", Path(path)))
    if args.gt:
        sources.append(("ground_truth", "ground_truth", None))
    if not sources:
        raise SystemExit("nothing to do: give --masks NAME=FILE.h5 and/or --gt")

    out = Path(args.out)
    dataset = open_dataset(args.manifest)
    ecfg = getattr(params, "evaluate", None) or EvaluateConfig()
    ecfg = dataclasses.replace(ecfg, splits=[params.predict_seg.split], report_images=0)
    rows = []
    for name, kind, path in sources:
        cfg = dataclasses.replace(params.train_seg, mask_source=kind)
        work = out / name
        t0 = time.perf_counter()
        summary = train_seg.run(cfg, seed=params.seed, manifest=args.manifest,
                                masks_path=path if path else Path("unused.h5"), out_dir=work / "train",
                                state_dir=work / "state", metrics_path=None, reader=dataset)
        t1 = time.perf_counter()
        predict_seg.run(params.predict_seg, manifest=args.manifest, segmenter=work / "train" / "segmenter.pt",
                               out_dir=work / "pred", state_dir=work / "pred_state", reader=dataset)
        t2 = time.perf_counter()
        metrics = evaluate(ecfg, dataset, work / "pred" / "masks", out_dir=work / "eval",
                           metrics_path=work / "eval.json", splits=[params.predict_seg.split], progress=False)
        rows.append({"source": name, "masks": str(path) if path else "ground truth",
                     "val_miou": metrics["miou"], "val_miou_single_scale": summary["val/mIoU_single_scale"],
                     "per_class_iou": metrics["per_class_iou"],
                     "train_seconds": summary["perf"]["train_seconds"], "train_wall_seconds": t1 - t0,
                     "sec_per_iter": summary["perf"]["sec_per_iter"], "predict_seconds": t2 - t1,
                     "threads": summary["perf"]["threads"], "device": summary["perf"]["device"]})
    report = {"train_seg": to_dict(params.train_seg), "predict_seg": to_dict(params.predict_seg),
              "seed": params.seed, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_seg.json").write_text(json.dumps(report, indent=2))

    t = params.train_seg
    print(f"\nDeepLab {t.head} on {t.backbone} (OS {t.output_stride}), {t.iterations} iterations x batch "
          f"{t.batch_size}, crop {t.crop_size}; test scales {params.predict_seg.scales}, flip "
          f"{params.predict_seg.flip}, CRF {params.predict_seg.crf}")
    print(f"{'masks':<16}{'val mIoU':>10}{'1-scale':>10}{'train s':>10}{'s/iter':>9}{'predict s':>11}")
    for r in rows:
        print(f"{r['source']:<16}{100 * r['val_miou']:>9.1f}%{100 * r['val_miou_single_scale']:>9.1f}%"
              f"{r['train_seconds']:>10.0f}{r['sec_per_iter']:>9.2f}{r['predict_seconds']:>11.0f}")
    print(f"-> {out / 'bench_seg.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
