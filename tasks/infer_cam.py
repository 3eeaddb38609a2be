"""Stage ``infer_cam``: multi-scale + flip class activation maps of the trained classifier.

``python -m tasks.infer_cam`` reads ``data/prepared/dataset.json`` and
``data/train_cls/classifier.pt`` and writes ``data/cams/<id>.npz`` for every image of
``infer_cam.splits`` (format: :mod:`artifacts.pseudo_masks`) plus ``data/cams/meta.json``.

The maths, per image with labels ``y`` (psa/EPS ``infer.py``):

1. every scale ``s`` of ``infer_cam.scales`` resizes the image to ``round(s*H) x round(s*W)``
   (bicubic, antialiased like PIL's resize), and with ``flip`` its mirror image is added;
2. the classifier's raw maps ``(K, h, w)`` go through the class activation: ``relu`` (the
   authors' cam model: ``forward_cam`` ends in a ReLU) or ``softmax`` over the C+1 maps (the
   authors' eps inference); ``auto`` picks relu for cam models and softmax for eps models;
3. the maps of the present classes are upsampled bilinearly to ``H x W``, flipped back, and
   summed over all views; each is divided by its maximum (+1e-5), so its peak is ~1.
4. eps models only: the background map. We store the softmax probability of the background
   channel averaged over the views. That is the quantity EPS trains: ``L_sal`` compares
   ``1 - M_bg`` (softmax over the C+1 maps) with the saliency map, so the probability is
   calibrated against the normalised class maps in [0, 1]. The authors' code computes it and
   drops it; ``export_masks.background: bgmap`` uses it instead of the constant threshold.

Where the background comes from (constant threshold or this map) is decided by
``export_masks``, so changing it does not rerun inference.

Memory stays bounded on large images: views of equal size are batched across images up to
``max_batch_pixels`` input pixels, a view is never larger than ``max_side``, and only the maps
of present classes are upsampled. Runs on CPU threads or CUDA (``device``).

Resume: images are written one by one (atomically) into ``data/.cams.partial/`` together
with a fingerprint of everything that changes the result (checkpoint hash, scales, flip,
activation, ``max_side``, class names, labels, dataset manifest). A rerun with the same
fingerprint skips the images already there; a different fingerprint starts over. When all
images are done the folder is renamed to ``data/cams``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from artifacts.cams import CamRecord, cam_path, write_cam_file
from core.config import InferCamConfig, result_params
from core.paths import CAMS_DIR, CLASSIFIER, MANIFEST
from core.shards import adopt_shards, shard_arg, shard_dir, shard_items
from core.stage_cli import stage_main
from core.timings import write_timings
from dataio.dataset import SegImages
from models.precision import prepare_model, resolve_precision, run_model

FORMAT_VERSION = 1
EPS_NORM = 1e-5


class InferCamError(ValueError):
    """Inference cannot run as asked (bad checkpoint/dataset pairing, bad option)."""


# --------------------------------------------------------------------------- the maths


def resolve_activation(activation: str, method: str) -> str:
    """``auto`` -> ``relu`` for cam models, ``softmax`` for eps models (as the authors' code)."""
    if method not in ("eps", "cam"):
        raise InferCamError(f"classifier method must be eps or cam, got {method!r}")
    if activation == "auto":
        return "softmax" if method == "eps" else "relu"
    if activation not in ("relu", "softmax"):
        raise InferCamError(f"params key 'infer_cam.class_activation' = {activation!r} is not auto, relu "
                            f"or softmax")
    return activation


def scaled_size(h: int, w: int, scale: float, max_side: int) -> tuple[int, int, bool]:
    """``(round(s*h), round(s*w), capped)``; a view longer than ``max_side`` is shrunk to it."""
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    if max(sh, sw) > max_side:
        f = max_side / max(sh, sw)
        return max(1, round(sh * f)), max(1, round(sw * f)), True
    return sh, sw, False


def split_maps(maps: torch.Tensor, method: str, activation: str,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class scores ``(B, C, h, w)`` and, for eps, the background probability ``(B, 1, h, w)``."""
    k = maps.shape[1]
    expected = num_classes + 1 if method == "eps" else num_classes
    if k != expected:
        raise InferCamError(f"the classifier returned {k} maps; a {method} model of {num_classes} classes "
                            f"must return {expected}")
    prob = torch.softmax(maps, dim=1) if (activation == "softmax" or method == "eps") else None
    fg = prob[:, :num_classes] if activation == "softmax" else F.relu(maps[:, :num_classes])
    bg = prob[:, num_classes:] if method == "eps" else None
    return fg, bg


class CamAccumulator:
    """Sums the upsampled, flipped-back views of one image; :meth:`result` normalises."""

    def __init__(self, classes: np.ndarray, size: tuple[int, int], device: torch.device, with_bg: bool):
        self.classes = np.asarray(classes, dtype=np.int64)
        self.size = (int(size[0]), int(size[1]))
        self._index = torch.as_tensor(self.classes, device=device)
        self.fg = torch.zeros((len(self.classes), *self.size), dtype=torch.float32, device=device)
        self.bg = torch.zeros(self.size, dtype=torch.float32, device=device) if with_bg else None
        self.views = 0

    def add(self, fg: torch.Tensor, bg: torch.Tensor | None, flipped: bool) -> None:
        """``fg``: ``(C, h, w)`` scores of one view; ``bg``: ``(1, h, w)`` or ``None``."""
        if len(self.classes):
            up = F.interpolate(fg.index_select(0, self._index)[None].float(), size=self.size,
                               mode="bilinear", align_corners=False)[0]
            self.fg += up.flip(-1) if flipped else up
        if self.bg is not None:
            if bg is None:
                raise InferCamError("background map expected but the view has none")
            up = F.interpolate(bg[None].float(), size=self.size, mode="bilinear", align_corners=False)[0, 0]
            self.bg += up.flip(-1) if flipped else up
        self.views += 1

    def result(self) -> CamRecord:
        if self.views == 0:
            raise InferCamError("no view was added")
        peak = self.fg.amax(dim=(1, 2), keepdim=True) if len(self.classes) else self.fg
        cams = (self.fg / (peak + EPS_NORM)).cpu().numpy()
        bg = (self.bg / self.views).cpu().numpy() if self.bg is not None else None
        return CamRecord(cams=cams, classes=self.classes.copy(), bg=bg, size=self.size)


@dataclass
class _View:
    image: int          # index in the chunk
    scale: float
    flipped: bool


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


def infer_images(model: torch.nn.Module, method: str, images: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray], cfg: InferCamConfig, device: torch.device,
                 activation: str | None = None, on_capped=None) -> list[CamRecord]:
    """CAM records of a chunk of images (``uint8 HxWx3`` RGB, ``(C,)`` multi-hot labels).

    Views of equal size share forward passes of at most ``cfg.max_batch_pixels`` input
    pixels (a single view larger than that runs alone).
    """
    activation = resolve_activation(activation or cfg.class_activation, method)
    num_classes = len(labels[0]) if len(labels) else 0
    accs = []
    tensors = []
    for img, lab in zip(images, labels):
        if img.ndim != 3 or img.shape[2] != 3:
            raise InferCamError(f"images must be HxWx3 RGB, got shape {img.shape}")
        classes = np.flatnonzero(np.asarray(lab) > 1e-5)
        accs.append(CamAccumulator(classes, img.shape[:2], device, with_bg=(method == "eps")))
        tensors.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None])
    groups: dict[tuple[int, int], list[_View]] = {}
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        for s in cfg.scales:
            sh, sw, capped = scaled_size(h, w, s, cfg.max_side)
            if capped and on_capped is not None:
                on_capped(i, s, (sh, sw))
            for flipped in ((False, True) if cfg.flip else (False,)):
                groups.setdefault((sh, sw), []).append(_View(i, s, flipped))
    with torch.inference_mode():
        for size, views in groups.items():
            per_batch = max(1, cfg.max_batch_pixels // (size[0] * size[1]))
            last_key, last = None, None
            for start in range(0, len(views), per_batch):
                batch = views[start:start + per_batch]
                x = []
                for v in batch:
                    if (v.image, v.scale) != last_key:  # a view and its mirror are adjacent
                        img = tensors[v.image].to(device=device, dtype=torch.float32).div_(255.0)
                        last_key, last = (v.image, v.scale), _resize(img, size)
                    x.append(last.flip(-1) if v.flipped else last)
                maps = run_model(model, torch.cat(x), device, cfg.precision, cfg.channels_last)
                fg, bg = split_maps(maps, method, activation, num_classes)
                for j, v in enumerate(batch):
                    accs[v.image].add(fg[j], bg[j] if bg is not None else None, flipped=v.flipped)
    return [a.result() for a in accs]


# --------------------------------------------------------------------------- the stage


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InferCamError("params key 'infer_cam.device' is cuda but no CUDA device is available; "
                                "use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_ids(dataset: SegImages, splits: Sequence[str]) -> list[str]:
    """Ids of the splits in order, each once."""
    seen, out = set(), []
    for split in splits:
        for i in dataset.ids(split):
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out


def fingerprint(cfg: InferCamConfig, meta: dict, activation: str, dataset: SegImages,
                ids: Sequence[str], manifest: Path | None) -> str:
    """Identity of an inference result: what resumed files must match."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "checkpoint": meta.get("sha256"), "method": meta["method"],
                         "scales": list(cfg.scales), "flip": cfg.flip, "activation": activation,
                         "max_side": cfg.max_side, "class_names": list(dataset.class_names)},
                        sort_keys=True).encode())
    for image_id in ids:
        h.update(image_id.encode())
        h.update(np.asarray(dataset.labels(image_id), dtype=np.float32).tobytes())
    if manifest is not None and manifest.is_file():
        h.update(manifest.read_bytes())
    return h.hexdigest()[:16]


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _fingerprint_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "fingerprint.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _prepare_partial(out_dir: Path, fp: str, shard: tuple[int, int] | None = None) -> Path:
    """The resume folder for fingerprint ``fp`` (reusing finished or half-done work); with ``shard``,
    that shard's own folder (:mod:`core.shards`)."""
    partial = _partial_dir(out_dir) if shard is None else shard_dir(_partial_dir(out_dir), shard)
    fp_file = partial / "fingerprint.json"
    if partial.is_dir() and _fingerprint_of(partial) != fp:
        shutil.rmtree(partial)
    if shard is None and not partial.is_dir() and out_dir.is_dir():
        try:
            same = json.loads((out_dir / "meta.json").read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if same:  # a finished result of the same inference: resume from it
            os.replace(out_dir, partial)
            (partial / "meta.json").unlink(missing_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".*.tmp"):
        stale.unlink()
    fp_file.write_text(json.dumps({"fingerprint": fp}))
    return partial


def _finish(partial: Path, out_dir: Path) -> None:
    (partial / "fingerprint.json").unlink(missing_ok=True)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)


def _chunks(items: Sequence[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield list(items[i:i + n])


def _checked_ids(cfg: InferCamConfig, dataset: SegImages, meta: dict, out_dir: Path) -> list[str]:
    """The ids to infer, after checking that the classifier was trained for this dataset's classes."""
    if int(meta.get("num_classes", -1)) != dataset.num_classes:
        raise InferCamError(f"the classifier has {meta.get('num_classes')} classes but the dataset has "
                            f"{dataset.num_classes}; retrain train_cls on this dataset")
    names = meta.get("class_names")
    if names and list(names) != list(dataset.class_names):
        raise InferCamError(f"the classifier's classes {list(names)} differ from the dataset's "
                            f"{list(dataset.class_names)}; retrain train_cls on this dataset")
    ids = split_ids(dataset, cfg.splits)
    if not ids:
        raise InferCamError(f"params key 'infer_cam.splits' = {list(cfg.splits)} holds no images")
    for image_id in ids:
        if "/" in image_id or image_id.startswith("."):
            raise InferCamError(f"image id {image_id!r} cannot be a file name under {out_dir}")
    return ids


def _infer_into(partial: Path, todo: list[str], total: int, cfg: InferCamConfig, dataset: SegImages,
                model: torch.nn.Module, method: str, activation: str, device: torch.device,
                progress: bool, on_chunk) -> list[str]:
    """Infer ``todo`` chunk by chunk into ``partial`` (the next chunk loads while one is inferred);
    returns the views shrunk to ``max_side``."""
    capped: list[str] = []

    def load(image_id: str) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(dataset.labels(image_id), dtype=np.float32)
        if lab.shape != (dataset.num_classes,):
            raise InferCamError(f"labels of {image_id} have shape {lab.shape}, expected ({dataset.num_classes},)")
        return dataset.load_image(image_id), lab

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=total - len(todo), desc="infer_cam", unit="img")
    pool = ThreadPoolExecutor(max_workers=cfg.loader_threads) if cfg.loader_threads > 0 else None
    try:
        chunks = list(_chunks(todo, cfg.batch_images))

        def submit(chunk: list[str]) -> list[Future] | list[tuple]:
            if pool is None:
                return [load(i) for i in chunk]
            return [pool.submit(load, i) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        written = 0
        for ci, chunk in enumerate(chunks):
            loaded = [f.result() if isinstance(f, Future) else f for f in pending]
            pending = submit(chunks[ci + 1]) if ci + 1 < len(chunks) else []
            recs = infer_images(model, method, [x[0] for x in loaded], [x[1] for x in loaded], cfg, device,
                                activation,
                                on_capped=lambda i, s, hw, c=chunk: capped.append(f"{c[i]}@{s}->{hw[0]}x{hw[1]}"))
            for image_id, rec in zip(chunk, recs):
                write_cam_file(cam_path(partial, image_id), rec)
            written += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            if on_chunk is not None:
                on_chunk(written)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return capped


def infer_dataset(cfg: InferCamConfig, dataset: SegImages, model: torch.nn.Module, meta: dict,
                  out_dir: str | Path, *, manifest: str | Path | None = None, progress: bool = True,
                  device: torch.device | None = None, on_chunk=None, shard: tuple[int, int] | None = None) -> dict:
    """Infer every image of ``cfg.splits`` into ``out_dir``; returns the written ``meta.json``.

    ``on_chunk(n_done)`` is called after each chunk is written (tests use it to interrupt).
    ``shard=(K, N)``: infer only shard K's images into its own folder, publish nothing, return its
    timing (:mod:`core.shards`); the next run without ``shard`` adopts them.
    """
    out_dir = Path(out_dir)
    method = meta.get("method")
    activation = resolve_activation(cfg.class_activation, method)
    device = device or select_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))   # recorded as used
    ids = _checked_ids(cfg, dataset, meta, out_dir)
    manifest = Path(manifest) if manifest else None
    fp = fingerprint(cfg, meta, activation, dataset, ids, manifest)
    partial = _prepare_partial(out_dir, fp, shard)
    if shard is None:
        adopted = adopt_shards(partial, lambda d: _fingerprint_of(d) == fp, "*.npz")
        if adopted:
            print(f"infer_cam: {adopted} CAM files taken from shards run elsewhere (core.shards)", file=sys.stderr)
    done = {p.stem for p in partial.glob("*.npz")}
    todo = [i for i in (ids if shard is None else shard_items(ids, shard)) if i not in done]
    model = prepare_model(model.to(device).eval(), cfg.channels_last)
    t0 = time.perf_counter()
    capped = _infer_into(partial, todo, len(ids), cfg, dataset, model, method, activation, device, progress,
                         on_chunk)
    seconds = time.perf_counter() - t0
    timing = {"images": len(todo), "seconds": round(seconds, 3),
              "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
              "device": str(device), "threads": torch.get_num_threads(), "resumed_images": len(ids) - len(todo)}
    if shard is not None:
        return {"shard": list(shard), "folder": str(partial), "ids": shard_items(ids, shard), "timing": timing}
    if capped:
        print(f"infer_cam: {len(capped)} view(s) were shrunk to infer_cam.max_side={cfg.max_side}: "
              f"{', '.join(capped[:5])}{' ...' if len(capped) > 5 else ''}", file=sys.stderr)
    missing = [i for i in ids if not cam_path(partial, i).is_file()]
    if missing:
        raise InferCamError(f"{len(missing)} CAM file(s) missing in {partial} after inference, e.g. {missing[0]}")
    result = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "method": method,
        "backbone": meta.get("backbone"),
        "checkpoint_sha256": meta.get("sha256"),
        "class_names": list(dataset.class_names),
        "num_classes": dataset.num_classes,
        "class_activation": activation,
        "has_bgmap": method == "eps",
        "scales": list(cfg.scales),
        "flip": cfg.flip,
        "max_side": cfg.max_side,
        "splits": list(cfg.splits),
        "ids": ids,
        "views_capped": _capped_views(cfg, dataset, ids),
        "params": result_params(cfg),
    }
    (partial / "meta.json").write_text(json.dumps(result, indent=1))  # only what the CAMs depend on
    _finish(partial, out_dir)
    # timings vary run to run: returned (run() writes them to core.timings), never in data/cams
    return dict(result, timing=timing)


def _capped_views(cfg: InferCamConfig, dataset: SegImages, ids: Sequence[str]) -> int | None:
    """(image, scale) views shrunk to ``max_side``, from the image sizes: the same whichever run (or
    shard) inferred them, so a resumed or sharded run writes the bytes of a serial one."""
    if not hasattr(dataset, "image_size"):
        return None
    return sum(scaled_size(h, w, s, cfg.max_side)[2] for h, w in map(dataset.image_size, ids) for s in cfg.scales)


def run(cfg: InferCamConfig, *, manifest: str | Path = MANIFEST,
        checkpoint: str | Path = CLASSIFIER, out_dir: str | Path = CAMS_DIR,
        timings: str | Path | None = None, progress: bool = True, shard: tuple[int, int] | None = None) -> dict:
    """The stage: open the dataset and classifier, check them, infer, write ``out_dir`` (and the
    run-dependent figures to ``timings``, :mod:`core.timings`); ``shard``: see :func:`infer_dataset`."""
    from dataio.manifest import open_dataset
    from models.classifier import load_classifier

    dataset = open_dataset(manifest)
    dataset.validate(cfg.splits, progress=progress)
    model, meta = load_classifier(checkpoint)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads or _usable_cores())
        result = infer_dataset(cfg, dataset, model, meta, out_dir, manifest=manifest, progress=progress, shard=shard)
        if shard is None:
            write_timings(timings, {"timing": result["timing"]})
        return result
    finally:
        torch.set_num_threads(threads_before)


def main(argv: list[str] | None = None) -> int:
    paths = {"--manifest": MANIFEST, "--checkpoint": CLASSIFIER, "--out": CAMS_DIR}

    def arguments(ap):
        ap.add_argument("--shard", type=shard_arg, default=None, metavar="K/N",
                        help="infer only shard K of N into its own folder, publish nothing (core.shards)")

    def body(args, params) -> str:
        meta = run(params.infer_cam, manifest=args.manifest, checkpoint=args.checkpoint, out_dir=args.out,
                   timings=args.timings, shard=args.shard)
        t = meta["timing"]
        if args.shard is not None:
            return (f"shard {args.shard[0]}/{args.shard[1]}: {len(meta['ids'])} images in {meta['folder']} "
                    f"({t['images']} inferred now); the stage's next run without --shard merges the shards")
        return (f"{len(meta['ids'])} images in {args.out} ({t['images']} inferred now"
                + (f", {t['images_per_s']:.2f} images/s on {t['device']}" if t["images_per_s"] else "") + ")")

    return stage_main("infer_cam", __doc__, argv, paths, body, timings=True, add_arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())
