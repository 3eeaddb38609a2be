"""The EPS classifier (C+1 maps) and the plain CAM baseline (C maps).

``model(x)``: ``x`` float32 ``(B, 3, H, W)`` RGB in [0, 1]; the model normalises it the
way its backbone was pre-trained, runs the backbone and a 1x1 convolution without bias,
and returns the raw maps ``(B, K, h, w)``: K = C+1 for ``eps`` (background last, index C),
K = C for ``cam``. The image prediction is the global average of the C class maps
(:func:`models.losses.image_logits`).

Files written by :func:`save_classifier` hold the weights and the metadata needed to
rebuild the network; :func:`load_classifier` reads them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.backbones import Backbone, build_backbone
from models.frozen_bn import FrozenBatchNormModule
from models.model_file import load_weights, read_model_file, save_model_file

METHODS = ("eps", "cam")
FILE_FORMAT = "eps-wsss-classifier/1"


class ClassifierError(ValueError):
    """A classifier file is missing, corrupt, or not one of ours; the message names it."""


class MapClassifier(FrozenBatchNormModule):
    """Backbone + (optional dropout) + 1x1 conv without bias to ``num_maps`` maps."""

    def __init__(self, backbone: Backbone, num_maps: int, head_dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(backbone.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.input_std).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout2d(head_dropout) if head_dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(backbone.out_channels, num_maps, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)  # as fc8 in psa/EPS

    @property
    def num_maps(self) -> int:
        return self.head.out_channels

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.head(self.dropout(self.backbone(x)))

    def freeze_early_layers(self) -> None:
        """Fix the backbone's first stage (the authors freeze conv1a and b2 of ResNet-38)."""
        for layer in self.backbone.early_layers():
            for p in layer.parameters():
                p.requires_grad_(False)



def build_classifier(method: str, backbone: str, num_classes: int, *, output_stride: int = 8,
                     pretrained: bool = True, weights_path: str | Path = "",
                     head_dropout: float = 0.0) -> MapClassifier:
    """EPS (C+1 maps) or CAM (C maps) classifier on the named backbone."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    net = build_backbone(backbone, output_stride, pretrained, weights_path)
    return MapClassifier(net, num_classes + 1 if method == "eps" else num_classes, head_dropout)


def save_classifier(path: str | Path, model: MapClassifier, meta: dict) -> None:
    """Write weights + metadata atomically (``meta`` needs method, backbone, num_classes,
    class_names, output_stride; anything else is kept for provenance)."""
    for key in ("method", "backbone", "num_classes", "class_names", "output_stride"):
        if key not in meta:
            raise ValueError(f"classifier metadata lacks '{key}'")
    save_model_file(path, model, dict(meta, head_dropout=meta.get("head_dropout", 0.0)), FILE_FORMAT)


def load_classifier(checkpoint_path: str | Path, map_location="cpu") -> tuple[MapClassifier, dict]:
    """Rebuild a trained classifier (eval mode) and its metadata from ``checkpoint_path``.

    ``meta``: method (``eps``/``cam``), backbone, num_classes (C), class_names,
    output_stride, sha256 of the file, plus the training params it was made with.
    """
    path = Path(checkpoint_path)
    obj = read_model_file(path, FILE_FORMAT, "classifier", "train_cls", ClassifierError)
    meta = obj["meta"]
    model = build_classifier(meta["method"], meta["backbone"], int(meta["num_classes"]),
                             output_stride=int(meta["output_stride"]), pretrained=False,
                             head_dropout=float(meta.get("head_dropout", 0.0)))
    meta = load_weights(model, obj, path, f"{meta['method']} {meta['backbone']} classifier", ClassifierError)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), meta
