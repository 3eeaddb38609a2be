"""Stage ``train_cls``: train the EPS classifier (or the plain CAM baseline).

``python -m tasks.train_cls [--params params.yaml]`` reads ``data/prepared/dataset.json`` and
``data/saliency/`` and writes ``data/train_cls/classifier.pt`` (read by
:func:`models.classifier.load_classifier`) and dvclive metrics/plots in ``data/train_cls/live/``.
Several processes: ``torchrun --nproc_per_node=N -m tasks.train_cls`` (DDP; gloo on CPU,
nccl on CUDA); ``train_cls.batch_size`` is the global batch, split over the processes.

Optimiser. SGD with momentum 0.9, weight decay 5e-4, poly learning rate (power 0.9), the head at
10x the backbone rate. The authors' code (psa/EPS ``PolyOptimizer``) calls
``torch.optim.SGD.__init__(params, lr, weight_decay)``: SGD's third positional argument is
``momentum``, so their runs had momentum = 5e-4 and weight decay only in the parameter groups.
We use the momentum the paper and psa intend (0.9); set ``train_cls.momentum: 0.0005`` to
reproduce the authors' code exactly.

Resume (:mod:`core.trainer`). Every ``checkpoint_every`` iterations a checkpoint is written to
``.state/train_cls/<fingerprint>/ckpt.pt`` (outside the DVC output, which DVC deletes before a
rerun), with the torch/numpy/python RNG states of every process: dropout and drop-connect draw from
them. The data order is a pure function of (seed, iteration): epoch ``e`` visits the images in a
permutation drawn from a generator seeded by (seed, e), and every sample's augmentation uses a
generator seeded by (seed, e, position). A rerun after a kill therefore continues with the same
batches and random numbers, and on CPU ends with bit-identical weights. The fingerprint covers the
params that change the result, the seed, the number of processes, the data (manifest, labels,
saliency listing) and the code of ``models/``, the training loop and this file; the checkpoint is
removed once the classifier is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core import training
from core.config import TrainClsConfig, result_params
from core.paths import MANIFEST, SALIENCY_DIR, TRAIN_CLS_DIR, TRAIN_CLS_STATE
from core.sizing import sized
from core.stage_cli import stage_main
from core.trainer import Step, TrainingLoop, training_process
from core.training import DistContext, ResumableBatchSampler, crop_window, launch_processes, sample_rng
from dataio.dataset import SegImages
from models.classifier import MapClassifier, build_classifier, save_classifier
from models.losses import classification_loss, image_logits, saliency_loss
from models.precision import prepare_model, run_model, training_precision

REPO = Path(__file__).resolve().parents[1]
_STREAM = 0  # random-stream salt of this stage (core.training)
CKPT_FORMAT = "eps-wsss-train-cls-ckpt/2"  # core.trainer's layout


class TrainClsError(ValueError):
    """Bad input for the train_cls stage; the message names the file, id or params key."""


SaliencyFn = Callable[[str, tuple[int, int]], np.ndarray]


# --------------------------------------------------------------------------- data


def _saliency_from_dir(saliency_dir: str, image_id: str, hw: tuple[int, int]) -> np.ndarray:
    from artifacts.saliency_maps import load_saliency
    return load_saliency(saliency_dir, image_id, expected_hw=hw)


class AugmentedImages(Dataset):
    """Training samples: image, saliency and labels with the paper's augmentations.

    Random rescale of the long side, horizontal flip, colour jitter (image only), and a random
    crop that pads when the image is smaller than the crop (psa's ``RandomCrop``); the geometric
    steps are applied identically to image and saliency. Padding is the backbone's mean colour
    (0 after normalisation) for the image and 0 (background) for the saliency.
    """

    def __init__(self, reader: SegImages, ids: list[str], cfg: TrainClsConfig,
                 saliency_fn: SaliencyFn | None, pad_value: tuple[float, float, float]):
        self.reader, self.ids, self.cfg, self.saliency_fn = reader, list(ids), cfg, saliency_fn
        self.pad_value = torch.tensor(pad_value, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        index, (seed, epoch, position) = key
        image_id = self.ids[index]
        rng = sample_rng(seed, _STREAM, epoch, position)
        image = np.asarray(self.reader.load_image(image_id))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TrainClsError(f"image '{image_id}': expected HxWx3 uint8, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        sal = None
        if self.saliency_fn is not None:
            sal = np.asarray(self.saliency_fn(image_id, (h, w)), dtype=np.float32)
            if sal.shape != (h, w):
                raise TrainClsError(f"saliency map of '{image_id}' is {sal.shape}, image is {(h, w)}")
        image, sal = self._augment(image, sal, rng)
        labels = torch.as_tensor(np.asarray(self.reader.labels(image_id), dtype=np.float32))
        return {"image": image, "saliency": sal if sal is not None else torch.zeros(1, 1, 1),
                "labels": labels}

    def _augment(self, image: np.ndarray, sal: np.ndarray | None, rng: np.random.Generator):
        cfg = self.cfg
        h, w = image.shape[:2]
        target = int(rng.integers(cfg.resize_long[0], cfg.resize_long[1] + 1))
        if target != max(h, w):
            scale = target / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            if sal is not None:
                sal = cv2.resize(sal, size, interpolation=cv2.INTER_LINEAR)
        if cfg.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            if sal is not None:
                sal = sal[:, ::-1]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        img = _color_jitter(img, cfg.color_jitter, rng).float().div_(255.0)
        sal_t = torch.from_numpy(np.ascontiguousarray(sal))[None].clamp_(0, 1) if sal is not None else None
        return _random_crop(img, sal_t, cfg.crop_size, rng, self.pad_value)


def _color_jitter(img: torch.Tensor, strength: list[float], rng: np.random.Generator) -> torch.Tensor:
    """torchvision-style ColorJitter on a uint8 CHW tensor, with factors drawn from ``rng``."""
    from torchvision.transforms.v2 import functional as TF

    b, c, s, hue = strength

    def factor(strength: float) -> float:
        return float(rng.uniform(max(0.0, 1 - strength), 1 + strength))

    ops = []
    if b > 0:
        ops.append(functools.partial(TF.adjust_brightness, brightness_factor=factor(b)))
    if c > 0:
        ops.append(functools.partial(TF.adjust_contrast, contrast_factor=factor(c)))
    if s > 0:
        ops.append(functools.partial(TF.adjust_saturation, saturation_factor=factor(s)))
    if hue > 0:
        ops.append(functools.partial(TF.adjust_hue, hue_factor=float(rng.uniform(-hue, hue))))
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def _random_crop(img: torch.Tensor, sal: torch.Tensor | None, crop: int, rng: np.random.Generator,
                 pad_value: torch.Tensor):
    """psa's RandomCrop: a random ``crop`` window, padding where the image is smaller."""
    _, h, w = img.shape
    rows, cols, img_rows, img_cols = crop_window(h, w, crop, rng)
    out = pad_value.expand(3, crop, crop).clone()
    out[:, rows, cols] = img[:, img_rows, img_cols]
    out_sal = torch.zeros(1, crop, crop)
    if sal is not None:
        out_sal[:, rows, cols] = sal[:, img_rows, img_cols]
    return out, out_sal


# --------------------------------------------------------------------------- evaluation


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as sklearn's average_precision_score)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], targets[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@torch.no_grad()
def evaluate_map(model: torch.nn.Module, reader: SegImages, ids: list[str], device: torch.device,
                 num_classes: int, batch_size: int = 16) -> tuple[float, list[float]]:
    """Multi-label mAP of the GAP logits on whole images (mean over classes with a positive)."""
    was_training = model.training
    model.eval()
    scores, targets, pending = [], [], []

    def flush():
        x = torch.stack(pending).to(device, non_blocking=True)
        scores.append(torch.sigmoid(image_logits(model(x), num_classes)).float().cpu().numpy())
        pending.clear()

    for image_id in ids:
        img = torch.from_numpy(np.ascontiguousarray(reader.load_image(image_id))).permute(2, 0, 1)
        if pending and (img.shape != pending[0].shape or len(pending) == batch_size):
            flush()
        pending.append(img.float().div_(255.0))
        targets.append(np.asarray(reader.labels(image_id), dtype=np.float32))
    if pending:
        flush()
    model.train(was_training)
    scores_np, targets_np = np.concatenate(scores), np.stack(targets) > 0.5
    aps = [average_precision(scores_np[:, c], targets_np[:, c]) for c in range(num_classes)]
    present = [a for a in aps if not math.isnan(a)]
    return (float(np.mean(present)) if present else float("nan")), aps


# --------------------------------------------------------------------------- helpers


def _data_fingerprint(reader: SegImages, train_ids: list[str], manifest: Path | None,
                      saliency_dir: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(reader.class_names)).encode())
    for image_id in train_ids:
        h.update(image_id.encode())
        h.update(np.asarray(reader.labels(image_id), dtype=np.float32).tobytes())
    if manifest is not None and manifest.is_file():
        h.update(manifest.read_bytes())
    if saliency_dir is not None and saliency_dir.is_dir():
        for entry in sorted(os.scandir(saliency_dir), key=lambda e: e.name):
            h.update(f"{entry.name}:{entry.stat().st_size}".encode())
    return h.hexdigest()


def run_fingerprint(cfg: TrainClsConfig, seed: int, world_size: int, data_fp: str) -> str:
    """Identity of a training run: what a resume checkpoint must match."""
    params = result_params(cfg)  # operational knobs (threads, logging, ...) let a run resume
    return training.run_fingerprint("train_cls", params, seed, world_size, data_fp, training.code_fingerprint("train_cls"))


def _seed_worker(worker_id: int) -> None:
    # augmentation draws from per-sample generators; this only keeps third-party global RNGs tidy
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- the stage


def run(cfg: TrainClsConfig, *, seed: int = 0, manifest: str | Path = MANIFEST,
        saliency_dir: str | Path = SALIENCY_DIR, out_dir: str | Path = TRAIN_CLS_DIR,
        state_dir: str | Path = TRAIN_CLS_STATE, reader: SegImages | None = None,
        saliency_fn: SaliencyFn | None = None, on_iteration: Callable[[int], None] | None = None,
        progress: bool = True, timings: str | Path | None = None) -> dict:
    """Train the classifier; returns the summary: ``val`` is written to ``<out_dir>/live/metrics.json``,
    ``perf`` (run-dependent) to ``timings`` (:mod:`core.timings`).

    ``reader`` (default: ``open_dataset(manifest)``) and ``saliency_fn(image_id, (h, w))``
    (default: ``load_saliency(saliency_dir, ...)``) can be injected. ``on_iteration(i)`` is called
    after iteration ``i`` (1-based) and its checkpoint, if any.
    """
    with training_process(cfg.device, cfg.threads, key="train_cls", error=TrainClsError) as dctx:
        return _train(cfg, seed, Path(manifest), Path(saliency_dir), Path(out_dir), Path(state_dir),
                      reader, saliency_fn, on_iteration, progress, dctx, timings)


def _check_inputs(cfg: TrainClsConfig, reader: SegImages, saliency_dir: Path,
                  custom_saliency: bool) -> tuple[list[str], list[str], torch.Tensor | None]:
    names = list(reader.class_names)
    if len(names) != reader.num_classes:
        raise TrainClsError(f"dataset lists {len(names)} class names for {reader.num_classes} classes")
    validate = getattr(reader, "validate", None)
    if callable(validate):
        validate(["train", "val"])
    train_ids, val_ids = list(reader.ids("train")), list(reader.ids("val"))
    if not train_ids:
        raise TrainClsError("the dataset's train split is empty")
    if not val_ids:
        raise TrainClsError("the dataset's val split is empty (needed for the val mAP)")
    for image_id in train_ids[:1] + val_ids[:1]:
        y = np.asarray(reader.labels(image_id))
        if y.shape != (reader.num_classes,):
            raise TrainClsError(f"labels of '{image_id}' have shape {y.shape}, expected ({reader.num_classes},)")
    predefined = None
    if cfg.method == "eps" and cfg.map_selection == "predefined":
        unknown = [n for n in cfg.predefined_background if n not in names]
        if unknown:
            raise TrainClsError(f"params key 'train_cls.predefined_background' names unknown classes "
                                f"{unknown}; the dataset's classes are {names}")
        predefined = torch.tensor([n in cfg.predefined_background for n in names])
    if cfg.method == "eps" and not custom_saliency:
        if not saliency_dir.is_dir():
            raise TrainClsError(f"saliency folder not found: {saliency_dir} (run the saliency stage first)")
        from artifacts.saliency_maps import saliency_path
        missing = [i for i in train_ids if not Path(saliency_path(saliency_dir, i)).is_file()]
        if missing:
            raise TrainClsError(f"{len(missing)} training images have no saliency map in {saliency_dir}, "
                                f"e.g. {saliency_path(saliency_dir, missing[0])} (rerun the saliency stage "
                                f"with the train split)")
    if cfg.pretrained and cfg.weights_path and not Path(cfg.weights_path).is_file():
        raise TrainClsError(f"params key 'train_cls.weights_path': file not found: {cfg.weights_path}")
    return train_ids, val_ids, predefined


def _param_groups(model: MapClassifier, cfg: TrainClsConfig) -> list[dict]:
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    return [{"params": backbone, "lr": cfg.lr, "initial_lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": head, "lr": cfg.lr * cfg.head_lr_mult, "initial_lr": cfg.lr * cfg.head_lr_mult,
             "weight_decay": cfg.weight_decay}]


def _build_model(cfg: TrainClsConfig, num_classes: int, seed: int,
                 device: torch.device) -> tuple[MapClassifier, torch.optim.Optimizer]:
    torch.manual_seed(seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    model = build_classifier(cfg.method, cfg.backbone, num_classes, output_stride=cfg.output_stride,
                             pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                             head_dropout=cfg.head_dropout)
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    if cfg.freeze_stem:
        model.freeze_early_layers()
    prepare_model(model.to(device), cfg.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    return model, optimizer


def _loss_step(cfg: TrainClsConfig, net: torch.nn.Module, device: torch.device, num_classes: int,
               predefined: torch.Tensor | None, warn: bool) -> Step:
    """L_cls (+ L_sal for EPS) of one batch, and the values logged."""
    loss_size = (cfg.crop_size // cfg.loss_stride,) * 2 if cfg.loss_stride else None
    precision = training_precision(cfg.precision, device)
    warned = not warn

    def step(batch: dict, it: int) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal warned
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        if labels.shape[1] != num_classes:
            raise TrainClsError(f"labels have {labels.shape[1]} entries, the dataset has {num_classes} classes")
        maps = run_model(net, images, device, precision, cfg.channels_last)
        loss_cls = classification_loss(maps, labels)
        if cfg.method == "eps":
            sal = batch["saliency"].to(device, non_blocking=True)
            selection = "naive" if it < cfg.selection_warmup else cfg.map_selection
            loss_sal, fg_share = saliency_loss(maps, sal, labels, selection, cfg.tau, cfg.lam, predefined,
                                               cfg.empty_maps, return_selection=True, loss_size=loss_size,
                                               saliency_resize=cfg.saliency_resize)
        else:
            loss_sal = torch.zeros((), device=device)
        loss = loss_cls + cfg.sal_weight * loss_sal
        logits = image_logits(maps.detach(), num_classes)
        if not warned and logits.shape[0] > 1 and float(logits.std(dim=0).max()) < 1e-3:
            warned = True
            print(f"train_cls: warning: at iteration {it + 1} every image gets the same class scores (the "
                  f"backbone's features died, typically from a too high learning rate); lower "
                  f"train_cls.lr (now {cfg.lr})", file=sys.stderr)
        values = {"train/loss": loss.item(), "train/loss_cls": loss_cls.item()}
        if cfg.method == "eps":
            values["train/loss_sal"] = loss_sal.item()
            # the share of present classes that joined M_fg
            values["train/fg_selected"] = 0.0 if math.isnan(fg_share) else fg_share
        return loss, values

    return step


def _train(cfg, seed, manifest, saliency_dir, out_dir, state_dir, reader, saliency_fn, on_iteration,
           progress, dctx: DistContext, timings: str | Path | None = None) -> dict:
    if reader is None:
        from dataio.manifest import open_dataset
        reader = open_dataset(manifest)
    cfg = sized(cfg, "train_cls", reader)
    custom_saliency = saliency_fn is not None
    train_ids, val_ids, predefined = _check_inputs(cfg, reader, saliency_dir, custom_saliency)
    ResumableBatchSampler.check(len(train_ids), cfg.batch_size, dctx.world_size, key="train_cls",
                                error=TrainClsError)
    if cfg.method == "eps" and saliency_fn is None:
        saliency_fn = functools.partial(_saliency_from_dir, str(saliency_dir))
    num_classes = reader.num_classes
    fingerprint = run_fingerprint(cfg, seed, dctx.world_size, _data_fingerprint(
        reader, train_ids, manifest, None if custom_saliency else saliency_dir))
    loop = TrainingLoop("train_cls", cfg, dctx, ckpt_format=CKPT_FORMAT, fingerprint=fingerprint,
                        state_dir=state_dir, error=TrainClsError, rng_states=True)

    model, optimizer = _build_model(cfg, num_classes, seed, dctx.device)
    # dropout / drop-connect randomness differs per process, reproducibly
    torch.manual_seed(seed * 1_000_003 + 7919 * (dctx.rank + 1))
    np.random.seed(seed + dctx.rank)
    random.seed(seed + dctx.rank)
    net = loop.prepare(model, optimizer)
    if loop.is_main:
        print(f"train_cls: {cfg.method} on {cfg.backbone} (output stride {model.output_stride}), "
              f"{len(train_ids)} train / {len(val_ids)} val images, {cfg.iterations} iterations of batch "
              f"{cfg.batch_size} on {dctx.world_size} x {dctx.device} ({torch.get_num_threads()} threads each); "
              f"checkpoints in {loop.ckpt_path.parent}", file=sys.stderr)

    dataset = AugmentedImages(reader, train_ids, cfg, saliency_fn, model.backbone.input_mean)
    sampler = ResumableBatchSampler(len(train_ids), cfg.batch_size, seed, loop.start, cfg.iterations,
                                    dctx.rank, dctx.world_size, stream=_STREAM, key="train_cls", error=TrainClsError)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=dctx.device.type == "cuda", worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)

    def evaluate() -> tuple[dict[str, float], tuple[float, list[float]]]:
        val_map, aps = evaluate_map(model, reader, val_ids, dctx.device, num_classes)
        return {"val/mAP": val_map}, (val_map, aps)

    eps = cfg.method == "eps"
    result = loop.train(loader, _loss_step(cfg, net, dctx.device, num_classes, predefined, loop.is_main), evaluate,
                        logged=["train/loss", "train/loss_cls", "train/lr"]
                        + (["train/loss_sal", "train/fg_selected"] if eps else []),
                        live_dir=out_dir / "live", on_iteration=on_iteration, progress=progress,
                        desc=f"train_cls {cfg.method}", postfix={"fg": "train/fg_selected"} if eps else None)
    results, headline = {}, ""
    if loop.is_main:
        val_map, aps = result
        results = {"val": {"mAP": val_map,
                           "AP": {n: (None if math.isnan(a) else a) for n, a in zip(reader.class_names, aps)}}}
        meta = {"method": cfg.method, "backbone": cfg.backbone, "num_classes": num_classes,
                "class_names": list(reader.class_names), "output_stride": model.output_stride,
                "head_dropout": cfg.head_dropout, "seed": seed, "iterations": cfg.iterations,
                "train_cls": result_params(cfg), "val_mAP": val_map, "fingerprint": fingerprint}
        save_classifier(out_dir / "classifier.pt", model, meta)
        headline = f"val mAP {val_map:.4f}"
    return loop.finish(results, output=out_dir / "classifier.pt", headline=headline, timings=timings,
                       perf={"workers": cfg.workers})


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    paths = {"--manifest": MANIFEST, "--saliency-dir": SALIENCY_DIR, "--out": TRAIN_CLS_DIR,
             "--state-dir": (TRAIN_CLS_STATE, "resume checkpoints (outside DVC outputs)")}

    def body(args, params) -> str | None:
        if launch_processes("train_cls", params.train_cls.processes, argv, error=TrainClsError):
            return f"trained by {params.train_cls.processes} DDP processes"
        run(params.train_cls, seed=params.seed, manifest=args.manifest, saliency_dir=args.saliency_dir,
            out_dir=args.out, state_dir=args.state_dir, timings=args.timings)

    return stage_main("train_cls", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
