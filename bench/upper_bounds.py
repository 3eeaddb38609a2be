"""Component upper bounds of the pseudo-masks: what each part of the pipeline allows at best.

    python bench/upper_bounds.py                      # the embedded run in data/ (its rescued maps)
    python bench/upper_bounds.py --saliency-dir data/saliency --json /tmp/bounds.json   # the detector's maps

Every bound uses the ground truth (oracles: information for the README, never used by the pipeline),
on the ``--split`` images:

* **resolution**: the ground truth as the classifier's grid would carry it. For each inference scale
  ``s`` the one-hot ground truth is area-averaged to the map size of that view (image size x ``s`` /
  output stride, as infer_cam sees it), upsampled back bilinearly as infer_cam does, summed over the
  scales; argmax. What perfect class maps at that resolution could give.
* **saliency > 0.5 as the foreground**: a salient pixel (saliency > 0.5) keeps its true class (a salient
  background pixel is given the largest class present: a perfect class assignment can only pick a
  present class there), a non-salient pixel is background. What perfect class maps can give when the
  saliency decides the background (``export_masks.background: saliency``).
* **saliency > 0.5 as the foreground, a salient context taken by its class**: as above, but a salient
  context pixel goes to the class it co-occurs with when that class is present (sky to the plane), as
  class maps that cannot tell a context from its class would label it. What the saliency's extent allows
  when the classes cannot reject the contexts it marks; its m_kc per pair is the bar below which only a
  classifier that separates a context from its class can take a mask that trusts the saliency.
* **saliency alone**: IoU of the salient region with the true foreground (class-agnostic).
* **selection**: the share of present classes whose true region overlaps the saliency by more than
  ``train_cls.tau`` (|GT_c ∩ B_s| / |GT_c| > tau): the foreground share the adaptive selection would give
  if each class map were exactly its objects. Compare with ``train/fg_selected`` of a training run: a
  share far below it means classes the saliency does cover are trapped in the background.
* **present classes**: every object pixel labelled with its true class inside the true foreground but
  the background predicted everywhere else: 1.0 by definition; not printed.

The **saliency oracle** (ground-truth foreground given as saliency maps, training included) is a pipeline
variant: ``--write-gt-saliency DIR`` writes those maps so that
``bench/compare_variants.py --variant salo:saliency.backend=precomputed,saliency.precomputed_dir=DIR``
trains with them (``bench/embedded_benchmark.py`` does it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.saliency_maps import load_saliency, write_map_atomic  # noqa: E402
from core.config import load_params  # noqa: E402
from core.paths import MANIFEST, RESCUED_SALIENCY_DIR
from core.sizing import sized  # noqa: E402
from dataio.manifest import open_dataset  # noqa: E402
from method.metrics import SegEvaluator  # noqa: E402


def resolution_oracle(gt: np.ndarray, num_labels: int, scales: list[float], stride: int) -> np.ndarray:
    """Argmax of the ground truth pooled to each view's map grid and upsampled back, summed over scales."""
    h, w = gt.shape
    valid = np.where(gt == 255, 0, gt)
    onehot = torch.from_numpy(np.eye(num_labels, dtype=np.float32)[valid]).permute(2, 0, 1)[None]
    total = torch.zeros_like(onehot)
    for s in scales:
        size = (max(1, int(np.ceil(round(h * s) / stride))), max(1, int(np.ceil(round(w * s) / stride))))
        small = F.adaptive_avg_pool2d(onehot, size)
        total += F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return total[0].argmax(0).numpy().astype(np.uint8)


def saliency_background_oracle(gt: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """True classes on salient pixels, background elsewhere (salient background -> largest class present)."""
    salient = saliency > 0.5
    present, counts = np.unique(gt[(gt > 0) & (gt != 255)], return_counts=True)
    fill = int(present[np.argmax(counts)]) if len(present) else 0
    pred = np.where(salient, np.where((gt > 0) & (gt != 255), gt, fill), 0)
    return pred.astype(np.uint8)


def saliency_context_oracle(gt: np.ndarray, saliency: np.ndarray, context: np.ndarray,
                            context_class: dict[int, int]) -> np.ndarray:
    """:func:`saliency_background_oracle`, but a salient pixel of context ``k`` takes class
    ``context_class[k]`` (0-based) when that class is in the image (a label ``c + 1``)."""
    pred = saliency_background_oracle(gt, saliency)
    salient_bg = (saliency > 0.5) & (gt == 0)
    present = set(np.unique(gt).tolist())
    for k, c in context_class.items():
        if c + 1 in present:
            pred[salient_bg & (context == k)] = c + 1
    return pred


def selection_oracle(gt: np.ndarray, saliency: np.ndarray, tau: float) -> tuple[int, int]:
    """(present classes whose true region is salient by more than ``tau``, present classes) of one image."""
    salient = saliency > 0.5
    labels = [c for c in np.unique(gt) if 0 < c < 255]
    return sum(int(salient[gt == c].mean() > tau) for c in labels), len(labels)


def bound_row(acc: SegEvaluator, ctx_names: list[str], class_names: list[str]) -> dict:
    """mIoU, boundary F1, mean m_kc and (where the dataset has contexts) m_kc per pair of one bound."""
    s = acc.summary()
    ratios = [p["ratio"] for p in s["cooccurrence"] if not np.isnan(p["ratio"])]
    row = {"miou": s["standard"]["miou"], "boundary_f1": s["boundary"]["f1"],
           "mean_mkc": float(np.mean(ratios)) if ratios else None}
    if s["cooccurrence"]:
        row["pairs"] = {f"{ctx_names[p['context'] - 1]}->{class_names[p['class']]}": p["ratio"]
                        for p in s["cooccurrence"]}
    return row


def print_bounds(rows: dict) -> None:
    """The mIoU bounds as a markdown table, then the selection oracle."""
    print("| bound | mIoU | boundary F1 | mean m_kc |\n|---|---|---|---|")
    for name, r in rows.items():
        if "miou" in r:
            cells = [r.get(k) for k in ("miou", "boundary_f1", "mean_mkc")]
            print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    pairs = {name: r["pairs"] for name, r in rows.items() if r.get("pairs")}
    if pairs:
        names = list(next(iter(pairs.values())))
        print("\nm_kc per pair:\n| bound | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for name, p in pairs.items():
            print(f"| {name} | " + " | ".join(f"{p[n]:.2f}" for n in names) + " |")
    sel = rows.get("selection", {})
    if sel.get("foreground_share") is not None:
        print(f"\nselection oracle: {sel['foreground_share']:.3f} of the {sel['present']} present classes have their "
              f"true region salient by more than tau = {sel['tau']} (the foreground share of a perfect adaptive "
              "selection; compare train/fg_selected)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default=MANIFEST)
    ap.add_argument("--saliency-dir", default=RESCUED_SALIENCY_DIR,
                    help="the maps to bound (default: those the masks are made from, after rescue_saliency)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--json", default="", help="also write the bounds as JSON here")
    ap.add_argument("--write-gt-saliency", default="", metavar="DIR",
                    help="write the ground-truth foreground of every image as saliency maps into DIR and stop")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    ds = open_dataset(args.manifest)
    if args.write_gt_saliency:
        out = Path(args.write_gt_saliency)
        n = 0
        for split in ("train", "val"):
            for image_id in ds.ids(split):
                gt = ds.load_mask(image_id)
                if gt is None:
                    raise SystemExit(f"image '{image_id}' has no mask: the saliency oracle needs ground truth")
                write_map_atomic(out / f"{image_id}.png", (((gt > 0) & (gt != 255)) * 255).astype(np.uint8))
                n += 1
        print(f"wrote {n} ground-truth foreground maps to {out}")
        return 0
    stride = sized(params.train_cls, "train_cls", ds).output_stride
    scales = list(params.infer_cam.scales)
    ctx = dict(getattr(ds, "context_class", {}) or {})
    res = SegEvaluator(ds.num_classes, ctx)
    res1 = SegEvaluator(ds.num_classes, ctx)
    sal_bg = SegEvaluator(ds.num_classes, ctx)
    sal_ctx = SegEvaluator(ds.num_classes, ctx)
    inter = union = selected = present = 0
    ctx_names = list(getattr(ds, "context_names", []) or [])
    ctx_salient, ctx_total = np.zeros(len(ctx_names) + 1), np.zeros(len(ctx_names) + 1)
    ids = ds.ids(args.split)
    for image_id in ids:
        gt = ds.load_mask(image_id)
        if gt is None:
            raise SystemExit(f"image '{image_id}' has no mask; --split must have ground truth")
        context = ds.load_context(image_id) if ctx else None
        res.add(gt, resolution_oracle(gt, ds.num_classes + 1, scales, stride), context)
        res1.add(gt, resolution_oracle(gt, ds.num_classes + 1, [1.0], stride), context)
        sal = load_saliency(args.saliency_dir, image_id, gt.shape)
        sal_bg.add(gt, saliency_background_oracle(gt, sal), context)
        if context is not None:
            sal_ctx.add(gt, saliency_context_oracle(gt, sal, context, ctx), context)
        sel = selection_oracle(gt, sal, params.train_cls.tau)
        selected, present = selected + sel[0], present + sel[1]
        fg, salient = (gt > 0) & (gt != 255), (sal > 0.5) & (gt != 255)
        inter += int((fg & salient).sum())
        union += int((fg | salient).sum())
        if context is not None:   # visible context pixels (background in the ground truth) marked salient
            visible = gt == 0
            ctx_total += np.bincount(context[visible].ravel(), minlength=len(ctx_total))[:len(ctx_total)]
            ctx_salient += np.bincount(context[visible & salient].ravel(), minlength=len(ctx_total))[:len(ctx_total)]
    evaluators = [(f"resolution, scales {scales}, stride {stride}", res),
                  (f"resolution, scale 1, stride {stride}", res1),
                  ("saliency > 0.5 as the foreground (perfect classes)", sal_bg)]
    if ctx:
        evaluators.append(("saliency > 0.5 as the foreground, a salient context taken by its class", sal_ctx))
    rows = {name: bound_row(acc, ctx_names, ds.class_names) for name, acc in evaluators}
    rows["saliency alone (foreground IoU)"] = {"miou": inter / union if union else None}
    rows["selection"] = {"foreground_share": selected / present if present else None, "present": present,
                         "tau": params.train_cls.tau}
    print(f"component upper bounds on {len(ids)} {args.split} images (oracles: they use the ground truth)")
    print_bounds(rows)
    shares = {name: ctx_salient[k] / ctx_total[k] for k, name in enumerate(ctx_names, start=1) if ctx_total[k]}
    if shares:
        rows["salient share of each context (saliency > 0.5 on visible context pixels)"] = shares
        print("\nsalient share of the visible context pixels (what the saliency hands to the foreground):")
        print("| " + " | ".join(shares) + " |\n|" + "---|" * len(shares))
        print("| " + " | ".join(f"{v:.3f}" for v in shares.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
