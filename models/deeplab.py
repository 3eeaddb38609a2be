"""DeepLab segmentation networks on the project's backbones.

Two heads, after the networks the EPS paper trains on its pseudo-masks:

* ``largefov`` -- DeepLab-v1 LargeFOV (Chen et al., ICLR 2015): ``fc6`` a 3x3 convolution
  with dilation ``largefov_rate`` to ``largefov_channels``, ``fc7`` a 1x1 convolution, both
  followed by ReLU and dropout, and ``fc8`` a 1x1 classifier.
* ``aspp`` -- DeepLab-v2 ASPP (Chen et al., TPAMI 2017, the ResNet-101 variant): parallel
  3x3 classifiers with dilations ``aspp_rates`` whose score maps are summed.

``model(x)``: ``x`` float32 ``(B, 3, H, W)`` RGB in [0, 1]; the model normalises it the way
its backbone was pre-trained and returns logits ``(B, C + 1, h, w)`` at the feature
resolution (``h = ceil(H / output_stride)``); index 0 is the background, ``c + 1`` class
``c`` -- the mask convention. :func:`upsampled_logits` brings them to the input size.

Files written by :func:`save_segmenter` hold weights and the metadata needed to rebuild
the network; :func:`load_segmenter` reads them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Backbone, build_backbone
from models.frozen_bn import FrozenBatchNormModule
from models.model_file import load_weights, read_model_file, save_model_file

HEADS = ("largefov", "aspp")
FILE_FORMAT = "eps-wsss-segmenter/1"


class SegmenterError(ValueError):
    """A segmenter file is missing, corrupt, or not one of ours; the message names it."""


class LargeFOVHead(nn.Module):
    """DeepLab-v1 LargeFOV: fc6 (3x3, dilated) -> fc7 (1x1) -> fc8 (1x1 classifier)."""

    def __init__(self, in_channels: int, num_labels: int, rate: int = 12, channels: int = 1024,
                 dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(channels, channels, 1)
        self.fc8 = nn.Conv2d(channels, num_labels, 1)
        self.drop6 = nn.Dropout2d(dropout)
        self.drop7 = nn.Dropout2d(dropout)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)  # as the DeepLab prototxt
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop6(F.relu(self.fc6(x), inplace=True))
        x = self.drop7(F.relu(self.fc7(x), inplace=True))
        return self.fc8(x)


class ASPPHead(nn.Module):
    """DeepLab-v2 ASPP: the sum of parallel dilated 3x3 classifiers (ResNet-101 variant)."""

    def __init__(self, in_channels: int, num_labels: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        if not rates:
            raise ValueError("ASPP needs at least one dilation rate")
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_labels, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLab(FrozenBatchNormModule):
    """Backbone + LargeFOV or ASPP head; logits for ``C + 1`` labels (background first)."""

    def __init__(self, backbone: Backbone, head: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_labels = num_labels
        self.register_buffer("mean", torch.tensor(backbone.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.input_std).view(1, 3, 1, 1), persistent=False)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))


    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """SGD groups: backbone at ``lr``, head at ``lr * head_lr_mult`` (DeepLab: 10x).

        Each group keeps its base rate in ``initial_lr`` so the poly schedule can scale it.
        """
        groups = []
        for params, mult in ((self.backbone.parameters(), 1.0), (self.head.parameters(), head_lr_mult)):
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": lr * mult, "initial_lr": lr * mult,
                               "weight_decay": weight_decay})
        return groups


def build_head(head: str, in_channels: int, num_labels: int, *, largefov_rate: int = 12,
               largefov_channels: int = 1024, dropout: float = 0.5,
               aspp_rates: tuple[int, ...] | list[int] = (6, 12, 18, 24)) -> nn.Module:
    if head == "largefov":
        return LargeFOVHead(in_channels, num_labels, largefov_rate, largefov_channels, dropout)
    if head == "aspp":
        return ASPPHead(in_channels, num_labels, tuple(aspp_rates))
    raise ValueError(f"unknown segmentation head '{head}'; choose one of {', '.join(HEADS)}")


def build_deeplab(head: str, backbone: str, num_classes: int, *, output_stride: int = 8,
                  pretrained: bool = True, weights_path: str | Path = "", largefov_rate: int = 12,
                  largefov_channels: int = 1024, dropout: float = 0.5,
                  aspp_rates: tuple[int, ...] | list[int] = (6, 12, 18, 24)) -> DeepLab:
    """DeepLab with ``head`` (largefov | aspp) on ``backbone`` for ``C = num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    net = build_backbone(backbone, output_stride, pretrained, weights_path)
    return DeepLab(net, build_head(head, net.out_channels, num_classes + 1,
                                   largefov_rate=largefov_rate, largefov_channels=largefov_channels,
                                   dropout=dropout, aspp_rates=aspp_rates),
                   num_classes + 1)


def upsampled_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits bilinearly resized to the input's ``(H, W)``."""
    logits = model(x)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- files

_ARCH_KEYS = ("head", "backbone", "num_classes", "class_names", "output_stride",
              "largefov_rate", "largefov_channels", "dropout", "aspp_rates")


def save_segmenter(path: str | Path, model: DeepLab, meta: dict) -> None:
    """Write weights + metadata atomically (``meta`` needs every architecture key:
    head, backbone, num_classes, class_names, output_stride, largefov_rate,
    largefov_channels, dropout, aspp_rates; anything else is kept for provenance)."""
    missing = [k for k in _ARCH_KEYS if k not in meta]
    if missing:
        raise ValueError(f"segmenter metadata lacks {', '.join(missing)}")
    save_model_file(path, model, dict(meta), FILE_FORMAT)


def load_segmenter(path: str | Path, map_location="cpu") -> tuple[DeepLab, dict]:
    """Rebuild a trained segmenter (eval mode) and its metadata from ``path``."""
    path = Path(path)
    obj = read_model_file(path, FILE_FORMAT, "segmenter", "train_seg", SegmenterError)
    meta = obj["meta"]
    model = build_deeplab(meta["head"], meta["backbone"], int(meta["num_classes"]),
                          output_stride=int(meta["output_stride"]), pretrained=False,
                          largefov_rate=int(meta["largefov_rate"]),
                          largefov_channels=int(meta["largefov_channels"]),
                          dropout=float(meta["dropout"]), aspp_rates=list(meta["aspp_rates"]))
    meta = load_weights(model, obj, path, f"{meta['head']} {meta['backbone']} segmenter", SegmenterError)
    return model.to(map_location).eval(), meta
