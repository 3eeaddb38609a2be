"""What the two training stages (train_cls, train_seg) share: processes, order, schedule, identity.

Exact resume rests on three things kept here: the visiting order is a pure function of
(seed, epoch) (:func:`epoch_permutation`), each sample's augmentation draws from its own
generator (:func:`sample_rng`), and a run's identity (:func:`run_fingerprint`) covers every
param and code file that changes the weights, so a checkpoint of another run is never resumed.
Each stage passes its own ``stream`` salt so the classifier and the segmenter never share draws.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from core.hashing import files_fingerprint


def sample_rng(seed: int, stream: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one sample's augmentation: position ``position`` of epoch ``epoch``."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream + 1, epoch, position]))


def epoch_permutation(seed: int, stream: int, epoch: int, num_items: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a pure function of (seed, stream, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, epoch])).permutation(num_items)


class ResumableBatchSampler(Sampler):
    """Yields, for iterations ``start..end-1``, this process's share of the global batch.

    Items are ``(index, (seed, epoch, position))`` so the dataset can seed the sample's
    augmentation; everything depends only on (seed, iteration), which makes resume exact.
    ``key`` (e.g. ``train_cls``) names the params section in errors; ``error`` is the stage's
    exception type.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, end: int,
                 rank: int = 0, world_size: int = 1, *, stream: int = 0, key: str = "train",
                 error: type[Exception] = ValueError):
        self.check(num_items, batch_size, world_size, key=key, error=error)
        self.num_items, self.batch_size, self.seed, self.stream = num_items, batch_size, seed, stream
        self.start, self.end, self.rank, self.world_size = start, end, rank, world_size
        self.per_epoch = num_items // batch_size  # incomplete last batch dropped

    @staticmethod
    def check(num_items: int, batch_size: int, world_size: int, *, key: str = "train",
              error: type[Exception] = ValueError) -> None:
        if batch_size % world_size:
            raise error(f"params key '{key}.batch_size' ({batch_size}) must be divisible by the "
                        f"number of processes ({world_size})")
        if num_items < batch_size:
            raise error(f"params key '{key}.batch_size' ({batch_size}) exceeds the number of "
                        f"training images ({num_items})")

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list]:
        local = self.batch_size // self.world_size
        perm_epoch, perm = -1, None
        for it in range(self.start, self.end):
            epoch, b = divmod(it, self.per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(self.seed, self.stream, epoch, self.num_items)
            first = b * self.batch_size + self.rank * local
            yield [(int(perm[p]), (self.seed, epoch, p)) for p in range(first, first + local)]


@dataclasses.dataclass
class DistContext:
    """Where this process trains: its rank among ``world_size`` processes and its device."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_group: bool


def setup_distributed(device: str, *, key: str, error: type[Exception] = ValueError) -> DistContext:
    """Read torchrun's environment; pick CPU or this process's GPU; start gloo/nccl when several processes.

    ``device`` is the params value (auto | cpu | cuda) of section ``key``, named in the error when
    CUDA is asked for and absent.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "cuda" and not torch.cuda.is_available():
        raise error(f"params key '{key}.device' is cuda but no CUDA device is available (use device: auto or cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistContext(rank, world, local_rank, local_world, dev, owns)


def launch_processes(stage: str, processes: int, argv: Sequence[str] | None, *,
                     error: type[Exception] = ValueError) -> bool:
    """Run ``python -m tasks.<stage> argv`` as ``processes`` DDP workers under torchrun (``--standalone``:
    this machine) and wait for them; ``False`` (run here) when one process is asked for or this process
    already is a torchrun worker (a multi-node run, started by the user's own ``torchrun --nnodes ...``).

    So ``dvc repro`` and the Prefect flow train with DDP from ``<stage>.processes`` alone. SIGINT and
    SIGTERM are passed on to torchrun, which stops its workers; they keep their resume checkpoints.
    """
    if processes <= 1 or "LOCAL_RANK" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", f"tasks.{stage}", *(sys.argv[1:] if argv is None else argv)]
    print(f"{stage}: starting {processes} DDP processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    proc = subprocess.Popen(cmd)
    forwarded = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, lambda sig, _frame: proc.send_signal(sig)) for s in forwarded} if main_thread else {}
    try:
        code = proc.wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if code:
        raise error(f"the {processes} DDP processes of {stage} failed (torchrun exit status {code}; their output "
                    f"is above); rerun to resume from the last checkpoint, or set '{stage}.processes: 1'")
    return True


def default_threads(local_world_size: int) -> int:
    """Torch threads per process: the usable cores shared by the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    """Learning rate at (0-based) iteration ``it`` of ``total``: ``base * (1 - it/total)^power``."""
    return base * (1.0 - it / total) ** power


def run_fingerprint(section: str, params: dict[str, Any], seed: int, world_size: int, data_fp: str,
                    code_fp: str) -> str:
    """Identity of a training run: what a resume checkpoint must match."""
    blob = json.dumps({section: params, "seed": seed, "world_size": world_size, "data": data_fp,
                       "code": code_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cpu_seconds() -> float:
    """CPU time of this process, all threads (data-loader worker processes not included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def code_fingerprint(stage: str) -> str:
    """sha256 of the code a stage's result depends on: its import closure (:func:`core.stage_deps.code_deps`,
    the same files dvc.yaml lists), so a resume checkpoint of other code is never continued."""
    from core.stage_deps import REPO, code_deps

    return files_fingerprint(REPO / path for path in code_deps(stage))


def crop_window(h: int, w: int, crop: int, rng: np.random.Generator) -> tuple[slice, slice, slice, slice]:
    """psa's RandomCrop window for an ``h`` x ``w`` image: ``(canvas rows, canvas cols, image rows,
    image cols)``; where the image is smaller than ``crop`` it lands at a random place on the canvas.
    Rows are drawn before columns (both trainers' resume depends on this order)."""
    def offsets(size: int) -> tuple[int, int]:
        space = size - crop
        if space > 0:
            return 0, int(rng.integers(0, space + 1))   # canvas offset, image offset
        return int(rng.integers(0, -space + 1)), 0

    cy, iy = offsets(h)
    cx, ix = offsets(w)
    ch, cw = min(crop, h), min(crop, w)
    return slice(cy, cy + ch), slice(cx, cx + cw), slice(iy, iy + ch), slice(ix, ix + cw)


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: int,
            scale_range: tuple[float, float], flip: bool, pad_value: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """DeepLab's augmentation of an (image, label map) pair: rescale by a factor drawn from ``scale_range``
    (bilinear image, nearest labels), flip, and a ``crop`` window padded with ``pad_value`` (image) and
    255 (labels); image float32 HxWx3 in [0, 1], labels uint8. The segmenter and AffinityNet share it."""
    import cv2

    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    h, w = mask.shape
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    rows, cols, img_rows, img_cols = crop_window(*mask.shape, crop, rng)
    out = np.empty((crop, crop, 3), dtype=np.float32)
    out[:] = pad_value
    out[rows, cols] = image[img_rows, img_cols].astype(np.float32) / 255.0
    out_mask = np.full((crop, crop), 255, dtype=np.uint8)  # ignored by the losses
    out_mask[rows, cols] = mask[img_rows, img_cols]
    return out, out_mask
