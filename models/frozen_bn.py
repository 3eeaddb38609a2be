"""BatchNorm kept frozen in training: with small batches (psa/EPS, DeepLab-v2) the statistics and
affine parameters of the pretrained backbone stay fixed. Both trained networks share this."""

from __future__ import annotations

from torch import nn


class FrozenBatchNormModule(nn.Module):
    """An ``nn.Module`` whose BatchNorm layers can be frozen (:meth:`freeze_batchnorm`): they stay
    in eval mode through ``train()`` and their parameters get no gradient."""

    frozen_bn: bool = False

    def freeze_batchnorm(self) -> None:
        self.frozen_bn = True
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
