"""Stage ``train_seg``: train DeepLab (v1 LargeFOV or v2 ASPP) on the pseudo-masks.

``python -m tasks.train_seg [--params params.yaml]`` reads ``data/prepared/dataset.json`` and
``data/pseudo_masks.h5`` (``train_seg.mask_source: pseudo``), ``data/refined_masks.h5`` (``refined``: the
AffinityNet refinement) or the dataset's own masks (``ground_truth``, the fully supervised upper bound),
and writes ``data/train_seg/segmenter.pt`` (read by :func:`models.deeplab.load_segmenter`) and dvclive
metrics/plots in ``data/train_seg/live/``. Several processes: ``torchrun --nproc_per_node=N -m tasks.train_seg``
(DDP; gloo on CPU, nccl on CUDA); ``train_seg.batch_size`` is the global batch.

Training follows DeepLab-v2: SGD with momentum, poly learning rate, the head at ``head_lr_mult``
times the backbone rate, random rescale (a factor in ``scale_range``), horizontal flip and a random
``crop_size`` crop padded with the mean colour (image) and 255 (mask). Pixels labelled 255 (padding,
or pixels a pseudo-mask left undecided) are ignored by the cross-entropy; with ``conf_fg_margin`` /
``conf_bg_margin`` (``mask_source: pseudo``) so are the pixels outside the pseudo-masks' sure regions,
computed from the CAMs the file stores as ``train_affinity`` does (:func:`keep_sure`). The HDF5 file is opened
lazily in each data-loader process (an h5py handle must not cross a fork).

Resume (:mod:`core.trainer`). Every ``checkpoint_every`` iterations a checkpoint is written to
``.state/train_seg/<fingerprint>/ckpt.pt`` (outside the DVC output, which DVC deletes before a
rerun). The data order and every augmentation are pure functions of (seed, iteration, position) and
the torch generator (dropout) is reseeded from (seed, iteration, rank) at every iteration, so the
checkpoint needs no RNG state: a rerun after a kill continues with the same batches and random
numbers and, on CPU, ends with bit-identical weights. The fingerprint covers the params that change
the result, the seed, the number of processes, the data (manifest, train ids, the pseudo-mask file's
checksum) and the code of ``models/``, the training loop and this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from artifacts.cams import PseudoMaskError
from core import training
from core.config import TrainSegConfig, result_params
from core.hashing import file_sha256
from core.paths import (
    MANIFEST,
    PSEUDO_MASKS,
    REFINED_MASKS,
    RESCUED_SALIENCY_DIR,
    TRAIN_SEG_DIR,
    TRAIN_SEG_METRICS,
    TRAIN_SEG_STATE,
)
from core.sizing import sized
from core.stage_cli import stage_main
from core.trainer import TrainingLoop, training_process
from core.training import DistContext, ResumableBatchSampler, launch_processes, sample_rng
from core.training import augment_pair as augment
from dataio.dataset import SegImages
from method.mask_rule import sure_labels
from method.mask_scores import MaskScores
from models.deeplab import DeepLab, build_deeplab, save_segmenter
from models.precision import prepare_model, run_model, training_precision

REPO = Path(__file__).resolve().parents[1]
IGNORE = 255
_STREAM = 10  # random-stream salt of this stage (core.training)
CKPT_FORMAT = "eps-wsss-train-seg-ckpt/2"  # core.trainer's layout


class TrainSegError(ValueError):
    """Bad input for the train_seg stage; the message names the file, id or params key."""


# --------------------------------------------------------------------------- masks


class MaskSource:
    """Training masks by image id: a pseudo-mask HDF5 file (raw or refined) or the dataset's ground truth.

    Picklable and fork-safe: the HDF5 file is (re)opened lazily in whichever process reads it.
    """

    def __init__(self, kind: str, reader: SegImages, h5_path: str | Path | None = None,
                 scores: MaskScores | None = None, margins: tuple[float, float] = (0.0, 0.0)):
        if kind not in ("pseudo", "refined", "ground_truth"):
            raise TrainSegError(f"params key 'train_seg.mask_source' = {kind!r} is not pseudo, refined or "
                                f"ground_truth")
        self.kind, self.reader = kind, reader
        self.h5_path = Path(h5_path) if h5_path is not None else None
        self.scores, self.margins = scores, margins
        self._h5 = None
        self._pid = None

    def _file(self):
        if self._h5 is None or self._pid != os.getpid():
            from artifacts.pseudo_masks import PseudoMasks
            self._h5, self._pid = PseudoMasks(self.h5_path), os.getpid()
        return self._h5

    def where(self, image_id: str) -> str:
        if self.kind != "ground_truth":
            return f"{self.h5_path} (masks/{image_id})"
        path = getattr(self.reader, "mask_path", lambda _i: None)(image_id)
        return str(path) if path is not None else f"ground-truth mask of '{image_id}'"

    def load(self, image_id: str) -> np.ndarray:
        if self.kind != "ground_truth":
            mask = self._file().mask(image_id)
            if self.scores is not None:
                scores, values, _ = self.scores.scores(image_id)
                mask = keep_sure(np.asarray(mask), scores, values, *self.margins)
        else:
            mask = self.reader.load_mask(image_id)
            if mask is None:
                raise TrainSegError(f"image '{image_id}' has no ground-truth mask "
                                    f"(train_seg.mask_source: ground_truth needs masks for the train split)")
        return np.asarray(mask)

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        if self.scores is not None:
            self.scores.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state


def keep_sure(mask: np.ndarray, scores: np.ndarray, values: np.ndarray, fg_margin: float,
              bg_margin: float) -> np.ndarray:
    """The exported mask with :data:`IGNORE` wherever the pixel is not sure (:func:`method.mask_rule.sure_labels`:
    its class wins by less than ``fg_margin``, or the background by less than ``bg_margin``) or where the
    sure label is not the exported one (a CRF moved it): a segmenter learns less noise from fewer pixels."""
    sure = sure_labels(scores, values, fg_margin, bg_margin, IGNORE)
    return np.where(sure == mask, mask, IGNORE).astype(np.uint8)


def sure_scores(cfg: TrainSegConfig, masks_path: Path, saliency_dir: Path | None) -> MaskScores | None:
    """The score source of ``train_seg.conf_*_margin`` (None: every exported pixel trains)."""
    if cfg.mask_source != "pseudo" or (cfg.conf_fg_margin == 0 and cfg.conf_bg_margin == 0):
        return None
    try:
        return MaskScores(masks_path, saliency_dir)
    except PseudoMaskError as e:
        raise TrainSegError(f"params keys 'train_seg.conf_fg_margin' / 'conf_bg_margin' ignore the unsure pixels of "
                            f"the pseudo-masks, which needs their scores: {e}; or set both to 0") from None


# --------------------------------------------------------------------------- data


class SegTrainSamples(Dataset):
    """Training pairs (image, mask) with DeepLab's augmentation.

    Random rescale by a factor in ``scale_range`` (bilinear image, nearest mask), horizontal
    flip, and a random ``crop`` window that pads where the image is smaller: the image with
    ``pad_value`` (the backbone's mean colour, 0 after normalisation), the mask with 255.
    Returns ``image`` float32 (3, crop, crop) in [0, 1] and ``mask`` int64 (crop, crop).
    """

    def __init__(self, reader: SegImages, ids: list[str], masks: MaskSource, crop: int,
                 scale_range: tuple[float, float], flip: bool, pad_value: tuple[float, float, float]):
        self.reader, self.ids, self.masks = reader, list(ids), masks
        self.num_classes = int(reader.num_classes)
        self.crop, self.scale_range, self.flip = crop, tuple(scale_range), flip
        self.pad_value = np.asarray(pad_value, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        index, (seed, epoch, position) = key
        image_id = self.ids[index]
        image = np.asarray(self.reader.load_image(image_id))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TrainSegError(f"image '{image_id}': expected HxWx3 uint8, got {image.shape} {image.dtype}")
        mask = self.masks.load(image_id)
        if mask.shape != image.shape[:2]:
            raise TrainSegError(f"mask {self.masks.where(image_id)} is {mask.shape}, image "
                                f"'{image_id}' is {image.shape[:2]}; re-export the masks for this dataset")
        bad = (mask > self.num_classes) & (mask != IGNORE)
        if bad.any():
            raise TrainSegError(f"mask {self.masks.where(image_id)} holds label {int(mask[bad][0])}; allowed "
                                f"0..{self.num_classes} and {IGNORE} (ignore)")
        image, mask = augment(image, mask, sample_rng(seed, _STREAM, epoch, position), self.crop,
                              self.scale_range, self.flip, self.pad_value)
        return {"image": torch.from_numpy(image).permute(2, 0, 1),
                "mask": torch.from_numpy(mask.astype(np.int64))}


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy of logits upsampled to the mask size; 255 is ignored.

    A batch whose pixels are all ignored contributes a zero loss (not NaN).
    """
    logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, mask, ignore_index=IGNORE, reduction="sum")
    return total / (mask != IGNORE).sum().clamp_min(1)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def quick_val_miou(model: torch.nn.Module, reader: SegImages, ids: list[str], device: torch.device,
                   num_classes: int) -> float:
    """Single-scale val mIoU (no flip, no CRF) for the training curves; predict_seg does the rest."""
    from method.metrics import confusion_matrix, scores_from_confusion

    was_training = model.training
    model.eval()
    conf = np.zeros((num_classes + 1, num_classes + 2), dtype=np.int64)
    for image_id in ids:
        gt = reader.load_mask(image_id)
        if gt is None:
            continue
        x = torch.from_numpy(np.ascontiguousarray(reader.load_image(image_id))).permute(2, 0, 1)
        x = x[None].float().div_(255.0).to(device)
        logits = F.interpolate(model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        conf += confusion_matrix(gt, pred, num_classes + 1)
    model.train(was_training)
    return float(scores_from_confusion(conf)["miou"])


# --------------------------------------------------------------------------- helpers


def run_fingerprint(cfg: TrainSegConfig, seed: int, world_size: int, data_fp: str) -> str:
    """Identity of a training run: what a resume checkpoint must match."""
    params = result_params(cfg)  # operational knobs (threads, logging, ...) let a run resume
    return training.run_fingerprint("train_seg", params, seed, world_size, data_fp, training.code_fingerprint("train_seg"))


def _init_loader_worker(worker_id: int) -> None:
    # one OpenCV thread per loader process: the processes already run in parallel
    cv2.setNumThreads(1)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed of the torch generator (dropout) for one iteration of one process."""
    return int(np.random.SeedSequence([seed, 12, iteration, rank]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- input checks


def check_inputs(cfg: TrainSegConfig, reader: SegImages, masks_path: Path,
                 manifest: Path | None = None, progress: bool = False,
                 saliency_dir: Path | None = None) -> tuple[list[str], list[str], str]:
    """Everything that can be checked before training starts; returns train ids, val ids and
    the data fingerprint. Every training mask is read once: present, of its image's size, labels
    in ``0..C`` or 255. Errors name the file, id or params key."""
    names = list(reader.class_names)
    if len(names) != reader.num_classes:
        raise TrainSegError(f"dataset lists {len(names)} class names for {reader.num_classes} classes")
    train_ids, val_ids = list(reader.ids("train")), list(reader.ids("val"))
    if not train_ids:
        raise TrainSegError("the dataset's train split is empty")
    if cfg.batch_size > len(train_ids):
        raise TrainSegError(f"params key 'train_seg.batch_size' ({cfg.batch_size}) exceeds the number of "
                            f"training images ({len(train_ids)})")
    if cfg.pretrained and cfg.weights_path and not Path(cfg.weights_path).is_file():
        raise TrainSegError(f"params key 'train_seg.weights_path': file not found: {cfg.weights_path}")
    h = hashlib.sha256(json.dumps({"classes": names, "train": train_ids, "source": cfg.mask_source}).encode())
    if manifest is not None and Path(manifest).is_file():
        h.update(Path(manifest).read_bytes())
    scores = sure_scores(cfg, masks_path, saliency_dir)
    masks = MaskSource(cfg.mask_source, reader, masks_path, scores, (cfg.conf_fg_margin, cfg.conf_bg_margin))
    if scores is not None:
        try:
            scores.hash_saliency(train_ids, h, "train_seg.conf_*_margin")
        except PseudoMaskError as e:
            raise TrainSegError(str(e)) from None
    if cfg.mask_source != "ground_truth":
        from artifacts.pseudo_masks import PseudoMasks
        with PseudoMasks(masks_path) as pm:
            if pm.class_names[1:] != names:
                raise TrainSegError(f"{masks_path} was exported for classes {pm.class_names[1:]}, the dataset "
                                    f"has {names}; rerun export_masks")
            missing = [i for i in train_ids if i not in pm]
            if missing:
                raise TrainSegError(f"{masks_path} has no pseudo-mask for {len(missing)} training images, "
                                    f"e.g. '{missing[0]}' (export_masks must cover the train split)")
        h.update(file_sha256(masks_path).encode())
    elif not reader.has_masks("train"):
        raise TrainSegError("params key 'train_seg.mask_source' is ground_truth but the dataset's train "
                            "split has no masks")
    image_size = getattr(reader, "image_size", None)
    ids = train_ids
    if progress:
        from tqdm import tqdm
        ids = tqdm(train_ids, desc=f"train_seg: checking {cfg.mask_source} masks", unit="mask",
                   dynamic_ncols=True, file=sys.stderr, leave=False)
    try:
        for image_id in ids:
            mask = masks.load(image_id)
            if mask.ndim != 2:
                raise TrainSegError(f"mask {masks.where(image_id)} has shape {mask.shape}; masks are HxW label maps")
            if callable(image_size) and tuple(mask.shape) != tuple(image_size(image_id)):
                raise TrainSegError(f"mask {masks.where(image_id)} is {tuple(mask.shape)}, the image is "
                                    f"{tuple(image_size(image_id))}"
                                    + ("; rerun export_masks" if cfg.mask_source != "ground_truth" else ""))
            bad = (mask > reader.num_classes) & (mask != IGNORE)
            if bad.any():
                raise TrainSegError(f"mask {masks.where(image_id)} holds label {int(mask[bad][0])}; allowed "
                                    f"0..{reader.num_classes} and {IGNORE} (ignore)")
            if cfg.mask_source == "ground_truth":
                h.update(image_id.encode())
                h.update(hashlib.sha256(np.ascontiguousarray(mask).tobytes()).digest())
    finally:
        masks.close()
    return train_ids, val_ids, h.hexdigest()


# --------------------------------------------------------------------------- the stage


def run(cfg: TrainSegConfig, *, seed: int = 0, manifest: str | Path = MANIFEST,
        masks_path: str | Path = PSEUDO_MASKS, refined_path: str | Path = REFINED_MASKS,
        saliency_dir: str | Path | None = RESCUED_SALIENCY_DIR, out_dir: str | Path = TRAIN_SEG_DIR,
        state_dir: str | Path = TRAIN_SEG_STATE, metrics_path: str | Path | None = TRAIN_SEG_METRICS,
        reader: SegImages | None = None, on_iteration: Callable[[int], None] | None = None,
        progress: bool = True, timings: str | Path | None = None) -> dict:
    """Train the segmenter; returns the summary written to ``<out_dir>/live/metrics.json``; its results
    go to ``metrics_path`` (a DVC metric), its ``perf`` figures to ``timings`` (:mod:`core.timings`).

    ``reader`` defaults to ``open_dataset(manifest)``. ``on_iteration(i)`` is called after
    iteration ``i`` (1-based) and its checkpoint, if any.
    """
    with training_process(cfg.device, cfg.threads, key="train_seg", error=TrainSegError) as dctx:
        if cfg.mask_source == "refined":
            masks_path = refined_path
        return _train(cfg, seed, Path(manifest), Path(masks_path), Path(saliency_dir) if saliency_dir else None,
                      Path(out_dir), Path(state_dir), Path(metrics_path) if metrics_path else None, reader,
                      on_iteration, progress, dctx, timings)


def _build_model(cfg: TrainSegConfig, num_classes: int, seed: int,
                 device: torch.device) -> tuple[DeepLab, torch.optim.Optimizer]:
    torch.manual_seed(seed)  # the same initial head in every process (DDP also broadcasts rank 0's)
    model = build_deeplab(cfg.head, cfg.backbone, num_classes, output_stride=cfg.output_stride,
                          pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                          largefov_rate=cfg.largefov_rate, largefov_channels=cfg.largefov_channels,
                          dropout=cfg.dropout, aspp_rates=cfg.aspp_rates)
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    prepare_model(model.to(device), cfg.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.head_lr_mult, cfg.weight_decay),
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, optimizer


def _write_outputs(cfg: TrainSegConfig, seed: int, model: DeepLab, reader: SegImages, fingerprint: str,
                   masks_path: Path, out_dir: Path, metrics_path: Path | None, results: dict) -> None:
    meta = {"head": cfg.head, "backbone": cfg.backbone, "num_classes": reader.num_classes,
            "class_names": list(reader.class_names), "output_stride": model.output_stride,
            "largefov_rate": cfg.largefov_rate, "largefov_channels": cfg.largefov_channels,
            "dropout": cfg.dropout, "aspp_rates": list(cfg.aspp_rates),
            "mask_source": cfg.mask_source, "seed": seed, "train_seg": result_params(cfg),
            "fingerprint": fingerprint}
    if cfg.mask_source != "ground_truth":
        meta["pseudo_masks_sha256"] = file_sha256(masks_path)
    save_segmenter(out_dir / "segmenter.pt", model, meta)
    if metrics_path is not None:
        from core.atomic import write_text_atomic
        write_text_atomic(metrics_path, json.dumps(
            {"mask_source": cfg.mask_source, "head": cfg.head, "backbone": cfg.backbone,
             "iterations": cfg.iterations, **results}, indent=2) + "\n")


def _train(cfg: TrainSegConfig, seed: int, manifest: Path, masks_path: Path, saliency_dir: Path | None,
           out_dir: Path, state_dir: Path, metrics_path: Path | None, reader: SegImages | None, on_iteration,
           progress: bool, dctx: DistContext, timings: str | Path | None = None) -> dict:
    if reader is None:
        from dataio.manifest import open_dataset
        reader = open_dataset(manifest)
    cfg = sized(cfg, "train_seg", reader)
    train_ids, val_ids, data_fp = check_inputs(cfg, reader, masks_path, manifest, progress and dctx.rank == 0,
                                               saliency_dir)
    num_classes = reader.num_classes
    fingerprint = run_fingerprint(cfg, seed, dctx.world_size, data_fp)
    loop = TrainingLoop("train_seg", cfg, dctx, ckpt_format=CKPT_FORMAT, fingerprint=fingerprint,
                        state_dir=state_dir, error=TrainSegError, grad_clip=cfg.grad_clip)
    model, optimizer = _build_model(cfg, num_classes, seed, dctx.device)
    net = loop.prepare(model, optimizer)

    masks = MaskSource(cfg.mask_source, reader, masks_path, sure_scores(cfg, masks_path, saliency_dir),
                       (cfg.conf_fg_margin, cfg.conf_bg_margin))
    dataset = SegTrainSamples(reader, train_ids, masks, cfg.crop_size, tuple(cfg.scale_range), cfg.flip,
                              model.backbone.input_mean)
    sampler = ResumableBatchSampler(len(train_ids), cfg.batch_size, seed, loop.start, cfg.iterations,
                                    dctx.rank, dctx.world_size, stream=_STREAM, key="train_seg", error=TrainSegError)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=dctx.device.type == "cuda", worker_init_fn=_init_loader_worker,
                        generator=torch.Generator().manual_seed(seed))

    precision = training_precision(cfg.precision, dctx.device)

    def step(batch: dict, it: int) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(iteration_seed(seed, it, dctx.rank))  # dropout: a function of the iteration
        images = batch["image"].to(dctx.device, non_blocking=True)
        target = batch["mask"].to(dctx.device, non_blocking=True)
        loss = segmentation_loss(run_model(net, images, dctx.device, precision, cfg.channels_last), target)
        return loss, {"train/loss": loss.item()}

    def evaluate() -> tuple[dict[str, float] | None, float | None]:
        if not (val_ids and reader.has_masks("val")):
            return None, None
        miou = quick_val_miou(model, reader, val_ids, dctx.device, num_classes)
        return {"val/mIoU_single_scale": miou}, miou

    val_miou = loop.train(loader, step, evaluate,
                          logged=["train/loss", "train/lr"] + (["train/grad_norm"] if cfg.grad_clip > 0 else []),
                          live_dir=out_dir / "live", on_iteration=on_iteration, progress=progress,
                          desc=f"train_seg {cfg.head} ({cfg.mask_source})")
    masks.close()
    results: dict = {}
    if loop.is_main:
        results = {"val/mIoU_single_scale": val_miou}
        _write_outputs(cfg, seed, model, reader, fingerprint, masks_path, out_dir, metrics_path, results)
    headline = f"val mIoU (single scale) {val_miou:.4f}" if val_miou is not None else "no val masks to score"
    return loop.finish(results, output=out_dir / "segmenter.pt", headline=headline, timings=timings,
                       perf={"workers": cfg.workers})


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    paths = {"--manifest": MANIFEST, "--masks": (PSEUDO_MASKS, "pseudo-mask HDF5 file (mask_source: pseudo)"),
             "--refined": (REFINED_MASKS, "refined-mask HDF5 file (mask_source: refined)"),
             "--saliency-dir": (RESCUED_SALIENCY_DIR, "saliency maps (conf_*_margin with a saliency background rule)"),
             "--out": TRAIN_SEG_DIR, "--state-dir": (TRAIN_SEG_STATE, "resume checkpoints (outside DVC outputs)"),
             "--metrics": (TRAIN_SEG_METRICS, "summary metrics ('' = none)")}

    def body(args, params) -> str | None:
        if launch_processes("train_seg", params.train_seg.processes, argv, error=TrainSegError):
            return f"trained by {params.train_seg.processes} DDP processes"
        run(params.train_seg, seed=params.seed, manifest=args.manifest, masks_path=args.masks, refined_path=args.refined,
            saliency_dir=args.saliency_dir or None, out_dir=args.out, state_dir=args.state_dir,
            metrics_path=args.metrics or None, timings=args.timings)

    return stage_main("train_seg", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
