"""How a trained network runs at inference: float32 or bfloat16 autocast, NCHW or channels-last memory.

Both change the arithmetic, not the network: bfloat16 keeps float32's range with 8 bits of mantissa,
so class maps move by about 1e-2 of their peak; channels-last only reorders memory (the convolutions
pick other kernels, outputs differ by float32 rounding). On a CPU with AVX-512 BF16 or AMX, and on
GPUs, both are much faster (``bench/bench_precision.py`` prints the ratios and the mask-mIoU change).
The stage params ``precision`` and ``channels_last`` (infer_cam, predict_seg, refine_masks) choose them;
outputs are always returned as float32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("fp32", "bf16")


def prepare_model(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``model`` in the memory format its inputs will have (in place, returned for chaining)."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-d input batch in the memory format of :func:`prepare_model`."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast on ``device`` for ``precision == "bf16"``, nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def run_model(model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str,
              channels_last: bool) -> torch.Tensor:
    """``model(x)`` in the chosen arithmetic, returned as a float32 tensor in the default layout."""
    with autocast(device, precision):
        y = model(prepare_input(x, channels_last))
    return y.float().contiguous()
