"""How a trained network runs at inference: float32 or bfloat16 autocast, NCHW or channels-last memory.

Both change the arithmetic, not the network: bfloat16 keeps float32's range with 8 bits of mantissa,
so class maps move by about 1e-2 of their peak; channels-last only reorders memory (the convolutions
pick other kernels, outputs differ by float32 rounding). On a CPU with AVX-512 BF16 or AMX, and on
GPUs, both are much faster (``bench/bench_precision.py`` prints the ratios and the mask-mIoU change).
The stage params ``precision`` and ``channels_last`` (infer_cam, predict_seg, refine_masks, and the
trainers' forward pass: :func:`training_precision`) choose them;
``precision: auto`` is bf16 where the device has bfloat16 arithmetic (a CPU with AVX512-BF16 or AMX, a
GPU that supports it) and fp32 elsewhere, where emulated bf16 would be slower; the stage records
the precision it used. Outputs are always returned as float32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from core.config import AUTO

PRECISIONS = ("fp32", "bf16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`has_fast_bf16`, else ``fp32``; explicit values stay."""
    if precision == AUTO:
        return "bf16" if has_fast_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


def training_precision(precision: str, device: torch.device) -> str:
    """A trainer's ``precision``: ``auto`` -> ``bf16`` on a GPU with bfloat16 arithmetic, ``fp32``
    elsewhere (on a CPU, even one with AVX512-BF16, a bf16 training step gains little:
    ``bench/bench_train_step.py``); explicit values stay."""
    if precision == AUTO:
        return "bf16" if device.type == "cuda" and has_fast_bf16(device) else "fp32"
    return resolve_precision(precision, device)


def prepare_model(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``model`` in the memory format its inputs will have (in place, returned for chaining)."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-d input batch in the memory format of :func:`prepare_model`."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast on ``device`` for ``precision == "bf16"`` (``auto``: :func:`resolve_precision`),
    nothing for ``fp32``."""
    if resolve_precision(precision, device) == "fp32":
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
