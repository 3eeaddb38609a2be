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


def test_a_trainer_computes_in_bf16_only_on_a_gpu_unless_asked(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx512f", "avx512_bf16"])   # even a bf16 CPU
    assert precision.training_precision("auto", CPU) == "fp32"
    assert precision.training_precision("bf16", CPU) == "bf16" and precision.training_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(precision, "has_fast_bf16", lambda device: device.type == "cuda")
    assert precision.training_precision("auto", torch.device("cuda")) == "bf16"


def test_a_bf16_channels_last_training_step_gives_float32_gradients_close_to_fp32():
    torch.manual_seed(0)
    x, target = torch.rand(2, 3, 16, 16), torch.randint(0, 4, (2, 8, 8))
    grads = {}
    for mode, cl in (("fp32", False), ("bf16", True)):
        torch.manual_seed(1)
        net = prepare_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 4, 3, stride=2, padding=1)), cl)
        loss = nn.functional.cross_entropy(run_model(net, x, CPU, mode, cl), target)
        loss.backward()
        grads[mode] = [p.grad for p in net.parameters()]
        assert all(g.dtype == torch.float32 for g in grads[mode])         # the weights stay float32
    for a, b in zip(grads["fp32"], grads["bf16"]):
        assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-6
