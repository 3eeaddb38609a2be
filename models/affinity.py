"""AffinityNet (Ahn & Kwak, CVPR 2018, "psa"): pixel-pair affinities learnt from confident pseudo-mask
regions, and the random walk that propagates class scores along them (the paper's Table 4 refinement).

``AffinityNet(x)``: ``x`` float32 ``(B, 3, H, W)`` RGB in [0, 1] -> features ``(B, D, h, w)`` at
``feature_stride`` (``h = ceil(H / feature_stride)``). As psa: the backbone levels at that stride and
deeper each get a 1x1 convolution without bias (the deepest to 256 channels, each shallower one half
of the next: psa's 64/128/256 on ResNet-38's three stride-8 levels), ELU, concatenation at the
shallowest level's grid, a 1x1 convolution and ELU. The affinity of two cells is
``exp(-mean_d |f_i - f_j|)``.

Pairs are the psa neighbourhood: the offsets ``(dy, dx)`` with ``dx^2 + dy^2 < radius^2`` in one half
plane (:func:`pair_offsets`), each pair once. Everything is windowed -- ``(B, K, h, w)`` for ``K``
offsets -- never a dense ``hw x hw`` matrix, so memory grows with the image, not its square.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Backbone, build_backbone
from models.frozen_bn import FrozenBatchNormModule
from models.model_file import load_weights, read_model_file, save_model_file

FILE_FORMAT = "eps-wsss-affinity/1"
IGNORE = 255


class AffinityError(ValueError):
    """An affinity network file is missing, corrupt, or not one of ours; the message names it."""


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """psa's neighbourhood (``get_indices_of_pairs``): ``(0, 1..r-1)`` then, for ``dy`` in ``1..r-1``,
    every ``dx`` in ``-(r-1)..r-1`` with ``dx^2 + dy^2 < r^2``. Each unordered pair appears once."""
    if radius < 2:
        raise ValueError(f"the pair radius must be at least 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                offsets.append((dy, dx))
    return offsets


def _overlap(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The cells ``(y, x)`` whose partner ``(y + dy, x + dx)`` is inside an ``h x w`` grid, and those
    partners: ``(cells, partners)``, each a ``(rows, cols)`` pair of slices of the same shape."""
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    return (yd, xd), (ys, xs)


def _shifted(x: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` where in bounds, ``fill`` elsewhere."""
    (yd, xd), (ys, xs) = _overlap(*x.shape[-2:], dy, dx)
    out = torch.full_like(x, fill)
    out[..., yd, xd] = x[..., ys, xs]
    return out


def _in_bounds(h: int, w: int, offsets: list[tuple[int, int]], device=None) -> torch.Tensor:
    """``(K, h, w)`` bool: the pair (cell, cell + offset k) lies inside the grid."""
    ones = torch.ones(1, h, w, device=device)
    return torch.cat([_shifted(ones, dy, dx) for dy, dx in offsets]) > 0


class _PairL1(torch.autograd.Function):
    """``(B, K, h, w)``: ``mean_d |f(y, x) - f(y + dy, x + dx)|`` per offset, 0 where the partner is
    outside. Plain autograd would keep a ``(B, D, h, w)`` difference per offset for the backward pass
    (34 of them at radius 5: 0.5 GB for a batch of 8 at 32x32 cells); this recomputes the sign
    instead, which also makes a training step about 0.35 s faster on 2 CPU cores."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
        b, _, h, w = features.shape
        out = features.new_zeros(b, len(offsets), h, w)
        for k, (dy, dx) in enumerate(offsets):
            (yd, xd), (ys, xs) = _overlap(h, w, dy, dx)
            out[:, k, yd, xd] = (features[:, :, yd, xd] - features[:, :, ys, xs]).abs_().mean(1)
        ctx.save_for_backward(features)
        ctx.offsets = offsets
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (features,) = ctx.saved_tensors
        _, d, h, w = features.shape
        grad_features = torch.zeros_like(features)
        for k, (dy, dx) in enumerate(ctx.offsets):
            (yd, xd), (ys, xs) = _overlap(h, w, dy, dx)
            part = (features[:, :, yd, xd] - features[:, :, ys, xs]).sign_().mul_(grad[:, k:k + 1, yd, xd] / d)
            grad_features[:, :, yd, xd] += part
            grad_features[:, :, ys, xs] -= part
        return grad_features, None


def pair_affinities(features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """``(B, K, h, w)``: ``exp(-mean_d |f(y, x) - f(y + dy, x + dx)|)`` for each offset; 0 where the
    partner lies outside the grid."""
    h, w = features.shape[-2:]
    inside = _in_bounds(h, w, offsets, features.device)
    return torch.exp(-_PairL1.apply(features, offsets)) * inside


def affinity_labels(labels: torch.Tensor, offsets: list[tuple[int, int]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """psa's pair labels from a label grid ``(B, h, w)`` (0 background, c class, 255 unsure):
    ``(bg_pos, fg_pos, neg)``, each ``(B, K, h, w)`` bool. A pair counts only when both cells are sure
    and inside the grid: both background -> bg_pos, the same class -> fg_pos, different -> neg."""
    partner = torch.stack([_shifted(labels, dy, dx, IGNORE) for dy, dx in offsets], 1)
    me = labels.unsqueeze(1).expand_as(partner)
    sure = (me != IGNORE) & (partner != IGNORE)
    same = sure & (me == partner)
    return same & (me == 0), same & (me != 0), sure & (me != partner)


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, float]]:
    """psa's balanced loss: ``bg/4 + fg/4 + neg/2`` where bg and fg are the mean ``-log a`` over the
    positive pairs of each kind and neg the mean ``-log(1 - a)`` over the negative pairs."""
    def mean_over(term: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(term.dtype)
        return (term * m).sum() / (m.sum() + eps)

    bg = mean_over(-torch.log(aff + eps), bg_pos)
    fg = mean_over(-torch.log(aff + eps), fg_pos)
    ng = mean_over(-torch.log(1.0 + eps - aff), neg)
    loss = bg / 4 + fg / 4 + ng / 2
    return loss, {"bg_pos": bg.item(), "fg_pos": fg.item(), "neg": ng.item()}


def transition_weights(aff: torch.Tensor, offsets: list[tuple[int, int]], beta: float) -> torch.Tensor:
    """The random walk's row-normalised weights as a window ``(M, h, w)``, ``M = (2p+1)^2`` for
    ``p = max |offset|``: entry ``(p + dy) * (2p+1) + (p + dx)`` of cell i is the weight of cell
    ``i + (dy, dx)``. psa's graph: symmetric weights ``a^beta`` between each cell and its partners, 1 on
    the self loop, each row divided by its sum (the cell's degree)."""
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    side = 2 * p + 1
    h, w = aff.shape[-2:]
    weights = aff.new_zeros(side * side, h, w)
    weights[p * side + p] = 1.0
    w_fwd = aff.clamp_min(0) ** beta                       # weight of (i, i + o_k), stored at i
    for k, (dy, dx) in enumerate(offsets):
        weights[(p + dy) * side + (p + dx)] += w_fwd[k]
        weights[(p - dy) * side + (p - dx)] += _shifted(w_fwd[k], -dy, -dx)  # the same pair, seen from i + o_k
    return weights / weights.sum(0, keepdim=True)


def random_walk(scores: torch.Tensor, aff: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                steps: int) -> torch.Tensor:
    """Propagate ``scores`` ``(C, h, w)`` ``steps`` times along the affinities ``aff`` ``(K, h, w)``.

    One step is ``v <- D^-1 A v`` on psa's graph (:func:`transition_weights`: every cell takes the
    weighted mean of its neighbourhood), so ``steps = 2^logt`` equals psa's ``cam @ T^(2^logt)`` with
    ``T = A / colsum(A)``, computed in windows of the neighbourhood instead of a dense matrix.
    """
    c, h, w = scores.shape
    weights = transition_weights(aff, offsets, beta)
    side = int(round(weights.shape[0] ** 0.5))
    p = side // 2
    v = scores
    for _ in range(steps):
        windows = F.unfold(F.pad(v[None], (p, p, p, p)), side).view(c, side * side, h, w)
        v = (windows * weights).sum(1)
    return v


class AffinityNet(FrozenBatchNormModule):
    """Backbone levels at ``feature_stride`` and deeper -> 1x1 convs -> concat -> 1x1 conv (psa)."""

    def __init__(self, backbone: Backbone, feature_stride: int = 8):
        super().__init__()
        self.backbone = backbone
        self.feature_stride = int(feature_stride)
        self.register_buffer("mean", torch.tensor(backbone.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.input_std).view(1, 3, 1, 1), persistent=False)
        channels = [c for s, c in backbone.level_channels() if s >= self.feature_stride]
        if not channels:
            strides = sorted({s for s, _ in backbone.level_channels()})
            raise AffinityError(f"backbone has no level at stride {feature_stride} or deeper (levels: {strides})")
        widths = [256 // 2 ** (len(channels) - 1 - i) for i in range(len(channels))]  # psa: 64, 128, 256
        widths = [max(16, w) for w in widths]
        self.reduce = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(channels, widths))
        self.fuse = nn.Conv2d(sum(widths), sum(widths), 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # psa's f9

    @property
    def out_channels(self) -> int:
        return self.fuse.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = -(-x.shape[-2] // self.feature_stride), -(-x.shape[-1] // self.feature_stride)
        x = (x - self.mean) / self.std
        levels = [f for s, f in self.backbone.levels(x) if s >= self.feature_stride]
        feats = []
        for conv, f in zip(self.reduce, levels):
            f = F.elu(conv(f))
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            feats.append(f)
        return F.elu(self.fuse(torch.cat(feats, 1)))

    def head_parameters(self) -> list[nn.Parameter]:
        """The layers trained from scratch (psa's ``from_scratch_layers``, at ``head_lr_mult``)."""
        return [*self.reduce.parameters(), *self.fuse.parameters()]

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        head = {id(p) for p in self.head_parameters()}
        backbone = [p for p in self.parameters() if p.requires_grad and id(p) not in head]
        return [{"params": backbone, "lr": lr, "initial_lr": lr, "weight_decay": weight_decay},
                {"params": [p for p in self.head_parameters() if p.requires_grad], "lr": lr * head_lr_mult,
                 "initial_lr": lr * head_lr_mult, "weight_decay": weight_decay}]


def build_affinity_net(backbone: str, feature_stride: int = 8, *, output_stride: int = 16,
                       pretrained: bool = True, weights_path: str | Path = "") -> AffinityNet:
    return AffinityNet(build_backbone(backbone, output_stride, pretrained, weights_path), feature_stride)


def save_affinity_net(path: str | Path, model: AffinityNet, meta: dict) -> None:
    """Write weights + metadata atomically (``meta`` needs backbone, output_stride, feature_stride)."""
    for key in ("backbone", "output_stride", "feature_stride"):
        if key not in meta:
            raise ValueError(f"affinity network metadata lacks '{key}'")
    save_model_file(path, model, meta, FILE_FORMAT)


def load_affinity_net(path: str | Path, map_location="cpu") -> tuple[AffinityNet, dict]:
    """Rebuild a trained affinity network (eval mode) and its metadata."""
    path = Path(path)
    obj = read_model_file(path, FILE_FORMAT, "affinity network", "train_affinity", AffinityError)
    meta = obj["meta"]
    model = build_affinity_net(meta["backbone"], int(meta["feature_stride"]),
                               output_stride=int(meta["output_stride"]), pretrained=False)
    meta = load_weights(model, obj, path, f"{meta['backbone']} affinity network", AffinityError)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), meta
