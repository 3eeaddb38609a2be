"""Training-step and inference speed of a params file's three trainers on this machine, in each arithmetic.

    python bench/bench_train_step.py --params configs/voc12.yaml --device cuda     # the paper's recipe on a GPU
    python bench/bench_train_step.py --params params.yaml --device cpu             # the embedded defaults

For train_cls (the EPS classifier: L_cls + L_sal), train_affinity (AffinityNet's pair loss) and train_seg
(DeepLab's cross-entropy), as the params file sets them (backbone, output stride, crop, batch): one SGD
step (forward, loss, backward, update) on a random batch, ``--repeat`` timed steps after ``--warmup``
(median), in fp32, channels_last, bf16 autocast and both (the trainers' ``precision`` and
``channels_last`` params). Weights are random (``pretrained`` is switched off: speed does not depend on
them, and no weight file is needed). Printed per network and mode: seconds per iteration, training
images per second, and the projected wall time of the stage at the file's ``iterations`` on this one
device (divide by the DDP processes for several), plus the forward pass alone in inference mode as
images per second at the crop size. The figures for the README's GPU table come from this script.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# before torch loads: the stages' OpenMP wait policy (tasks/__init__.py), so a step times as in a stage
importlib.import_module("tasks")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.config import load_params  # noqa: E402
from core.sizing import resolve  # noqa: E402
from models.affinity import affinity_labels, affinity_loss, build_affinity_net, pair_affinities, pair_offsets  # noqa: E402
from models.classifier import build_classifier  # noqa: E402
from models.deeplab import build_deeplab  # noqa: E402
from models.losses import classification_loss, saliency_loss  # noqa: E402
from models.precision import prepare_model, run_model  # noqa: E402

MODES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def networks(params, classes: int, long_side: float) -> dict:
    """name -> (model builder, batch maker, loss, batch size, crop, iterations); ``auto`` knobs resolved for
    images of median long side ``long_side`` (core.sizing)."""
    cls, aff, seg = (resolve(getattr(params, n), n, long_side) for n in ("train_cls", "train_affinity", "train_seg"))
    c_crop, a_crop, s_crop = cls.crop_size, aff.crop_size, seg.crop_size
    offsets = pair_offsets(aff.radius)
    a_stride = aff.feature_stride

    def cls_batch(b):
        labels = torch.zeros(b, classes)
        labels[:, 0] = 1
        return torch.rand(b, 3, c_crop, c_crop), (labels, torch.rand(b, 1, c_crop, c_crop))

    def cls_loss(maps, target):
        labels, sal = target
        loss = classification_loss(maps, labels)
        if cls.method == "eps":
            loss = loss + cls.sal_weight * saliency_loss(maps, sal, labels, cls.map_selection, cls.tau, cls.lam)
        return loss

    def aff_batch(b):
        g = -(-a_crop // a_stride)
        return torch.rand(b, 3, a_crop, a_crop), torch.randint(0, classes + 1, (b, g, g))

    def aff_loss(feats, labels):
        return affinity_loss(pair_affinities(feats, offsets), *affinity_labels(labels, offsets))[0]

    def seg_batch(b):
        return torch.rand(b, 3, s_crop, s_crop), torch.randint(0, classes + 1, (b, s_crop, s_crop))

    def seg_loss(logits, mask):
        return F.cross_entropy(F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False), mask)

    return {
        "train_cls": (lambda: build_classifier(cls.method, cls.backbone, classes, output_stride=cls.output_stride,
                                               pretrained=False), cls_batch, cls_loss, cls.batch_size, c_crop, cls.iterations),
        "train_affinity": (lambda: build_affinity_net(aff.backbone, a_stride, output_stride=aff.output_stride,
                                                      pretrained=False), aff_batch, aff_loss, aff.batch_size, a_crop,
                           aff.iterations),
        "train_seg": (lambda: build_deeplab(seg.head, seg.backbone, classes, output_stride=seg.output_stride,
                                            pretrained=False, aspp_rates=seg.aspp_rates), seg_batch, seg_loss,
                      seg.batch_size, s_crop, seg.iterations),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(build, make_batch, loss_fn, batch: int, device: torch.device, precision: str, channels_last: bool,
              warmup: int, repeat: int) -> tuple[float, float]:
    """(median s per training step, median s per inference forward) of one network in one mode."""
    torch.manual_seed(0)
    model = prepare_model(build().to(device), channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, target = make_batch(batch)
    x = x.to(device)
    target = tuple(t.to(device) for t in target) if isinstance(target, tuple) else target.to(device)
    steps = []
    for i in range(warmup + repeat):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(run_model(model, x, device, precision, channels_last), target).backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            steps.append(time.perf_counter() - t0)
    model.eval()
    forwards = []
    with torch.inference_mode():
        for i in range(warmup + repeat):
            _sync(device)
            t0 = time.perf_counter()
            run_model(model, x, device, precision, channels_last)
            _sync(device)
            if i >= warmup:
                forwards.append(time.perf_counter() - t0)
    return statistics.median(steps), statistics.median(forwards)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(REPO / "configs" / "voc12.yaml"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--classes", type=int, default=20, help="foreground classes (VOC: 20, COCO: 80)")
    ap.add_argument("--long-side", type=float, default=500,
                    help="median long side of the images, for the params' auto knobs (VOC: 500; embedded: 128)")
    ap.add_argument("--stages", nargs="+", default=["train_cls", "train_affinity", "train_seg"])
    ap.add_argument("--batch", type=int, default=0, help="override the params' batch sizes (0 = as set)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as the trainers (core.trainer.training_process)
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads")
    params = load_params(args.params)
    nets = networks(params, args.classes, args.long_side)
    print(f"{'stage':15s} {'backbone/crop/batch':28s} {'mode':20s} {'s/iter':>8s} {'train img/s':>11s} "
          f"{'stage wall':>11s} {'infer img/s':>11s}")
    for name in args.stages:
        build, make_batch, loss_fn, batch, crop, iterations = nets[name]
        batch = args.batch or batch
        section = getattr(params, name)
        for precision, cl in MODES:
            try:
                step, fwd = time_mode(build, make_batch, loss_fn, batch, device, precision, cl, args.warmup, args.repeat)
            except RuntimeError as e:   # e.g. out of memory at this batch
                print(f"{name:15s} {precision}{' + channels_last' if cl else ''}: failed ({str(e).splitlines()[0][:120]})")
                continue
            mode = precision + (" + channels_last" if cl else "")
            print(f"{name:15s} {f'{section.backbone}/{crop}/{batch}':28s} {mode:20s} {step:8.3f} {batch / step:11.1f} "
                  f"{_hours(step * iterations):>11s} {batch / fwd:11.1f}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
