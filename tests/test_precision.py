"""Inference arithmetic (models/precision.py): which precision ``auto`` picks, and that the float32
channels-last path computes the same maps in the default layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import precision
from models.precision import has_fast_bf16, prepare_model, resolve_precision, run_model

CPU = torch.device("cpu")


def test_auto_is_bf16_only_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    assert has_fast_bf16(CPU) and resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx2", "amx_tile", "amx_bf16"])
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx2", "avx512f"])   # bf16 would be emulated: slower
    assert not has_fast_bf16(CPU) and resolve_precision("auto", CPU) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)


def test_channels_last_and_bf16_return_float32_maps_in_the_default_layout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).eval()
    x = torch.rand(2, 3, 20, 24)
    with torch.inference_mode():
        ref = run_model(net, x, CPU, "fp32", False)
        cl = run_model(prepare_model(net, True), x, CPU, "fp32", True)
        bf = run_model(net, x, CPU, "bf16", True)
    prepare_model(net, False)
    for y in (cl, bf):
        assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == (2, 4, 10, 12)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    # bfloat16 keeps 8 bits of mantissa: within a few percent of the map's range
    assert (bf - ref).abs().max() <= 0.03 * ref.abs().max()
