"""Where an EPS classifier's class maps sit, and how many present classes pass the map selection.

    python bench/diagnose_selection.py                                  # data/train_cls/classifier.pt
    python bench/diagnose_selection.py --checkpoint /tmp/x/classifier.pt --images 200

For each present class of the first ``--images`` images of ``--split`` (one forward pass at scale 1,
softmax over the C+1 maps, as L_sal sees them): the overlap ratio ``|B_i ∩ B_s| / |B_i|`` with the
image's saliency map at map size (:func:`models.losses.overlap_ratio`), whether ``B_i`` is empty, and
-- upsampled to the image -- the share of the class's confident pixels (p > 0.5) on the object, on
the class's own context (datasets with context maps: the embedded one) and elsewhere. Prints the
share of classes that would join the foreground (overlap > tau) and the mean shares per class. A
classifier whose maps sit on their contexts is caught by the adaptive selection's trap (README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.saliency_maps import load_saliency  # noqa: E402
from core.paths import CLASSIFIER, MANIFEST, SALIENCY_DIR
from dataio.manifest import open_dataset  # noqa: E402
from models.classifier import load_classifier  # noqa: E402
from models.losses import overlap_ratio, resize_saliency  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=CLASSIFIER)
    ap.add_argument("--manifest", default=MANIFEST)
    ap.add_argument("--saliency-dir", default=SALIENCY_DIR)
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--tau", type=float, default=0.4)
    args = ap.parse_args(argv)
    model, meta = load_classifier(args.checkpoint)
    if meta["method"] != "eps":
        raise SystemExit(f"{args.checkpoint} is a {meta['method']} classifier; the selection needs an eps model")
    ds = open_dataset(args.manifest)
    has_context = bool(ds.context_names)
    rows = []  # class, overlap, empty, on object, on context
    for image_id in ds.ids(args.split)[:args.images]:
        image = ds.load_image(image_id)
        labels = np.asarray(ds.labels(image_id))
        sal = load_saliency(args.saliency_dir, image_id, image.shape[:2])
        gt = ds.load_mask(image_id)
        if gt is None:
            raise SystemExit(f"image '{image_id}' has no mask; --split must have ground truth")
        context = ds.load_context(image_id) if has_context else None
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)
        c_count = len(labels)
        sal_small = resize_saliency(torch.from_numpy(sal)[None, None], tuple(probs.shape[-2:]))[:, 0]
        overlap = overlap_ratio(probs[:, :c_count], sal_small)[0].numpy()
        up = F.interpolate(probs, size=image.shape[:2], mode="bilinear", align_corners=False)[0].numpy()
        for c in np.flatnonzero(labels > 0.5):
            confident = up[c] > 0.5
            n = max(int(confident.sum()), 1)
            own = [k for k, cls in ds.context_class.items() if cls == c]  # the class's context ids
            on_ctx = float((confident & np.isin(context, own)).sum()) / n if context is not None else float("nan")
            rows.append((c, overlap[c], bool((probs[0, c] > 0.5).sum() == 0),
                         float((confident & (gt == c + 1)).sum()) / n, on_ctx))
    if not rows:
        raise SystemExit("no present class in the images looked at")
    a = np.array(rows, dtype=float)
    names = meta["class_names"]
    print(f"{args.checkpoint}: {len(a)} present classes in {min(args.images, len(ds.ids(args.split)))} "
          f"{args.split} images (scale 1)")
    print(f"overlap > tau={args.tau}: {np.mean(a[:, 1] > args.tau):.3f}   no pixel > 0.5: {np.mean(a[:, 2]):.3f}")
    print(f"confident pixels per class (empty = 0): on the object {a[:, 3].mean():.3f}, on its context "
          f"{np.nanmean(a[:, 4]) if has_context else float('nan'):.3f}")
    print(f"{'class':<12}{'n':>5}{'fg':>7}{'object':>8}{'context':>9}")
    for c, name in enumerate(names):
        m = a[:, 0] == c
        if m.any():
            print(f"{name:<12}{int(m.sum()):>5}{np.mean(a[m, 1] > args.tau):>7.2f}{a[m, 3].mean():>8.2f}"
                  f"{np.nanmean(a[m, 4]) if has_context else float('nan'):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
