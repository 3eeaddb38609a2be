"""Stage ``train_affinity``: AffinityNet (psa; the paper's Table 4 refinement) on the sure regions of the
pseudo-masks.

``python -m tasks.train_affinity`` reads ``data/prepared/dataset.json``, ``data/pseudo_masks.h5``
(its CAMs and background rule; :mod:`method.mask_scores`) and, for the saliency background rules,
``data/saliency_rescued/``, and writes ``data/train_affinity/affinity.pt`` (:func:`models.affinity.load_affinity_net`)
and dvclive curves in ``data/train_affinity/live/``.

Labels (psa's scheme, :func:`method.mask_rule.sure_labels`): a pixel is a sure class where that class
wins against the background score raised by ``conf_fg_margin``, sure background where the background
wins lowered by ``conf_bg_margin``, ignored in between. Augmentation is DeepLab's (rescale, flip,
crop; :func:`core.training.augment_pair`); the labels are then read at the centre of every cell of
the ``feature_stride`` grid, and every pair of cells closer than ``radius`` whose labels are both sure
is a positive (same label: background or foreground pair) or negative (different labels) example of
psa's balanced loss (:func:`models.affinity.affinity_loss`).

Resume (:mod:`core.trainer`): a checkpoint every ``checkpoint_every`` iterations in
``.state/train_affinity/<fingerprint>/``. The data order and each sample's augmentation are pure
functions of (seed, iteration, position) and the torch generator (the backbone's drop-connect) is
reseeded from (seed, iteration, rank) at every iteration, so a rerun after a kill ends with the same
weights as an uninterrupted run. Several processes: ``torchrun --nproc_per_node=N -m
tasks.train_affinity`` (DDP; ``batch_size`` is the global batch).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from artifacts.cams import PseudoMaskError
from core import training
from core.config import TrainAffinityConfig, result_params
from core.hashing import file_sha256
from core.paths import MANIFEST, PSEUDO_MASKS, RESCUED_SALIENCY_DIR, TRAIN_AFFINITY_DIR, TRAIN_AFFINITY_STATE
from core.sizing import sized
from core.stage_cli import stage_main
from core.trainer import TrainingLoop, training_process
from core.training import DistContext, ResumableBatchSampler, augment_pair, launch_processes, sample_rng
from dataio.dataset import SegImages
from method.mask_rule import sure_labels
from method.mask_scores import MaskScores
from models.affinity import (
    IGNORE,
    AffinityNet,
    affinity_labels,
    affinity_loss,
    build_affinity_net,
    pair_affinities,
    pair_offsets,
    save_affinity_net,
)
from models.precision import prepare_model, run_model, training_precision

_STREAM = 20  # random-stream salt of this stage (core.training)
CKPT_FORMAT = "eps-wsss-train-affinity-ckpt/1"  # core.trainer's layout


class TrainAffinityError(ValueError):
    """Bad input for the train_affinity stage; the message names the file, id or params key."""


def grid_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """The label at the centre pixel of every ``stride`` x ``stride`` cell (psa reads its labels at the
    feature grid by nearest sampling); the grid is ``ceil(H / stride)`` x ``ceil(W / stride)`` as the
    features, cells past the image edge are ignored."""
    h, w = labels.shape
    padded = np.pad(labels, ((0, (-h) % stride), (0, (-w) % stride)), constant_values=IGNORE)
    return np.ascontiguousarray(padded[stride // 2::stride, stride // 2::stride])


class AffinitySamples(Dataset):
    """Training pairs (image, grid labels): the sure labels of an image, augmented with it."""

    def __init__(self, reader: SegImages, ids: list[str], scores: MaskScores, cfg: TrainAffinityConfig,
                 pad_value: tuple[float, float, float]):
        self.reader, self.ids, self.scores, self.cfg = reader, list(ids), scores, cfg
        self.pad_value = np.asarray(pad_value, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, image_id: str) -> np.ndarray:
        scores, values, _ = self.scores.scores(image_id)
        return sure_labels(scores, values, self.cfg.conf_fg_margin, self.cfg.conf_bg_margin, IGNORE)

    def __getitem__(self, key):
        index, (seed, epoch, position) = key
        image_id = self.ids[index]
        image = np.asarray(self.reader.load_image(image_id))
        labels = self.labels(image_id)
        if labels.shape != image.shape[:2]:
            raise TrainAffinityError(f"the CAMs of '{image_id}' in {self.scores.h5_path} are {labels.shape}, the "
                                     f"image is {image.shape[:2]}; rerun infer_cam and export_masks")
        cfg = self.cfg
        image, labels = augment_pair(image, labels, sample_rng(seed, _STREAM, epoch, position), cfg.crop_size,
                                     tuple(cfg.scale_range), cfg.flip, self.pad_value)
        return {"image": torch.from_numpy(image).permute(2, 0, 1),
                "labels": torch.from_numpy(grid_labels(labels, cfg.feature_stride).astype(np.int64))}


def check_inputs(cfg: TrainAffinityConfig, reader: SegImages, masks_path: Path, saliency_dir: Path | None,
                 manifest: Path | None = None) -> tuple[list[str], MaskScores, str]:
    """Everything that can be checked before training; returns the train ids, the score source and the
    data fingerprint (manifest, pseudo-mask file, and the saliency maps the labels read)."""
    train_ids = list(reader.ids("train"))
    if not train_ids:
        raise TrainAffinityError("the dataset's train split is empty")
    if cfg.batch_size > len(train_ids):
        raise TrainAffinityError(f"params key 'train_affinity.batch_size' ({cfg.batch_size}) exceeds the number "
                                 f"of training images ({len(train_ids)})")
    if cfg.pretrained and cfg.weights_path and not Path(cfg.weights_path).is_file():
        raise TrainAffinityError(f"params key 'train_affinity.weights_path': file not found: {cfg.weights_path}")
    try:
        scores = MaskScores(masks_path, saliency_dir)
    except PseudoMaskError as e:
        raise TrainAffinityError(str(e)) from None
    if scores.class_names[1:] != list(reader.class_names):
        raise TrainAffinityError(f"{masks_path} was exported for classes {scores.class_names[1:]}, the dataset has "
                                 f"{list(reader.class_names)}; rerun export_masks")
    known = set(scores.ids)
    missing = [i for i in train_ids if i not in known]
    if missing:
        raise TrainAffinityError(f"{masks_path} has no pseudo-mask for {len(missing)} training images, e.g. "
                                 f"'{missing[0]}' (export_masks must cover the train split)")
    h = hashlib.sha256(json.dumps({"classes": scores.class_names, "train": train_ids}).encode())
    if manifest is not None and Path(manifest).is_file():
        h.update(Path(manifest).read_bytes())
    h.update(file_sha256(masks_path).encode())
    try:
        scores.hash_saliency(train_ids, h, "train_affinity")
    except PseudoMaskError as e:
        raise TrainAffinityError(str(e)) from None
    return train_ids, scores, h.hexdigest()


def run_fingerprint(cfg: TrainAffinityConfig, seed: int, world_size: int, data_fp: str) -> str:
    """Identity of a training run: what a resume checkpoint must match."""
    return training.run_fingerprint("train_affinity", result_params(cfg), seed, world_size, data_fp,
                                    training.code_fingerprint("train_affinity"))


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed of the torch generator (the backbone's drop-connect) for one iteration of one process."""
    return int(np.random.SeedSequence([seed, _STREAM + 2, iteration, rank]).generate_state(1, np.uint64)[0] >> 1)


def _build_model(cfg: TrainAffinityConfig, seed: int, device: torch.device
                 ) -> tuple[AffinityNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)  # the same new layers in every process (DDP also broadcasts rank 0's)
    model = build_affinity_net(cfg.backbone, cfg.feature_stride, output_stride=cfg.output_stride,
                               pretrained=cfg.pretrained, weights_path=cfg.weights_path)
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    prepare_model(model.to(device), cfg.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.head_lr_mult, cfg.weight_decay),
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, optimizer


def run(cfg: TrainAffinityConfig, *, seed: int = 0, manifest: str | Path = MANIFEST,
        masks_path: str | Path = PSEUDO_MASKS, saliency_dir: str | Path | None = RESCUED_SALIENCY_DIR,
        out_dir: str | Path = TRAIN_AFFINITY_DIR, state_dir: str | Path = TRAIN_AFFINITY_STATE,
        reader: SegImages | None = None, on_iteration: Callable[[int], None] | None = None,
        progress: bool = True, timings: str | Path | None = None) -> dict:
    """Train the affinity network; returns the summary written to ``<out_dir>/live/metrics.json``
    (``perf`` figures to ``timings``). ``on_iteration(i)`` is called after iteration ``i`` (1-based)."""
    with training_process(cfg.device, cfg.threads, key="train_affinity", error=TrainAffinityError) as dctx:
        return _train(cfg, seed, Path(manifest), Path(masks_path), Path(saliency_dir) if saliency_dir else None,
                      Path(out_dir), Path(state_dir), reader, on_iteration, progress, dctx, timings)


def _train(cfg: TrainAffinityConfig, seed: int, manifest: Path, masks_path: Path, saliency_dir: Path | None,
           out_dir: Path, state_dir: Path, reader: SegImages | None, on_iteration, progress: bool,
           dctx: DistContext, timings: str | Path | None) -> dict:
    if reader is None:
        from dataio.manifest import open_dataset
        reader = open_dataset(manifest)
    cfg = sized(cfg, "train_affinity", reader)
    train_ids, scores, data_fp = check_inputs(cfg, reader, masks_path, saliency_dir, manifest)
    fingerprint = run_fingerprint(cfg, seed, dctx.world_size, data_fp)
    loop = TrainingLoop("train_affinity", cfg, dctx, ckpt_format=CKPT_FORMAT, fingerprint=fingerprint,
                        state_dir=state_dir, error=TrainAffinityError)
    model, optimizer = _build_model(cfg, seed, dctx.device)
    net = loop.prepare(model, optimizer)
    offsets = pair_offsets(cfg.radius)

    dataset = AffinitySamples(reader, train_ids, scores, cfg, model.backbone.input_mean)
    sampler = ResumableBatchSampler(len(train_ids), cfg.batch_size, seed, loop.start, cfg.iterations,
                                    dctx.rank, dctx.world_size, stream=_STREAM, key="train_affinity",
                                    error=TrainAffinityError)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=dctx.device.type == "cuda", generator=torch.Generator().manual_seed(seed))

    precision = training_precision(cfg.precision, dctx.device)

    def step(batch: dict, it: int) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(iteration_seed(seed, it, dctx.rank))  # drop-connect: a function of the iteration
        images = batch["image"].to(dctx.device, non_blocking=True)
        labels = batch["labels"].to(dctx.device, non_blocking=True)
        aff = pair_affinities(run_model(net, images, dctx.device, precision, cfg.channels_last), offsets)
        bg_pos, fg_pos, neg = affinity_labels(labels, offsets)
        loss, parts = affinity_loss(aff, bg_pos, fg_pos, neg)
        sure = (labels != IGNORE).float().mean().item()  # share of grid cells that teach (the margins' effect)
        return loss, {"train/loss": loss.item(), "train/bg_pos_loss": parts["bg_pos"],
                      "train/fg_pos_loss": parts["fg_pos"], "train/neg_loss": parts["neg"], "train/sure_share": sure}

    def evaluate() -> tuple[None, None]:  # nothing to validate against without ground truth
        return None, None

    loop.train(loader, step, evaluate,
               logged=["train/loss", "train/bg_pos_loss", "train/fg_pos_loss", "train/neg_loss", "train/sure_share",
                       "train/lr"],
               live_dir=out_dir / "live", on_iteration=on_iteration, progress=progress, desc="train_affinity")
    scores.close()
    results: dict = {}
    if loop.is_main:
        last = next((row["metrics"] for row in reversed(loop.history) if "train/loss" in row["metrics"]), {})
        results = {k: last[k] for k in ("train/loss", "train/bg_pos_loss", "train/fg_pos_loss", "train/neg_loss")
                   if k in last}
        save_affinity_net(out_dir / "affinity.pt", model, {
            "backbone": cfg.backbone, "output_stride": cfg.output_stride, "feature_stride": cfg.feature_stride,
            "radius": cfg.radius, "class_names": scores.class_names[1:], "seed": seed,
            "train_affinity": result_params(cfg), "fingerprint": fingerprint,
            "pseudo_masks_sha256": file_sha256(masks_path)})
    headline = f"final loss {results.get('train/loss', float('nan')):.4f}" if results else "trained"
    return loop.finish(results, output=out_dir / "affinity.pt", headline=headline, timings=timings,
                       perf={"workers": cfg.workers})


def main(argv: list[str] | None = None) -> int:
    paths = {"--manifest": MANIFEST, "--masks": (PSEUDO_MASKS, "pseudo-mask HDF5 file with CAMs (export_masks)"),
             "--saliency-dir": (RESCUED_SALIENCY_DIR, "saliency maps (saliency background rules)"),
             "--out": TRAIN_AFFINITY_DIR,
             "--state-dir": (TRAIN_AFFINITY_STATE, "resume checkpoints (outside DVC outputs)")}

    def body(args, params) -> str | None:
        if launch_processes("train_affinity", params.train_affinity.processes, argv, error=TrainAffinityError):
            return f"trained by {params.train_affinity.processes} DDP processes"
        run(params.train_affinity, seed=params.seed, manifest=args.manifest, masks_path=args.masks,
            saliency_dir=args.saliency_dir or None, out_dir=args.out, state_dir=args.state_dir,
            timings=args.timings)

    return stage_main("train_affinity", __doc__, argv, paths, body, timings=True)


if __name__ == "__main__":
    sys.exit(main())
