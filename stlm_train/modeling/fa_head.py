"""Feature-aggregation (FA) head: fuses the per-level student products into one anomaly map.

DeSTSeg-style segmentation net as STLM configures it: two ResNet BasicBlocks (in -> 128), ASPP with
an image-pool branch and dilations (1, 3), conv3x3-BN-ReLU, conv1x1 -> 1 logit, sigmoid.
Key names follow the official ``segmentation_net`` (``res.N``, ``head.N``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FAHeadConfig
from .resnet import BasicBlock  # the ResNet block, same keys (conv1, bn1, conv2, bn2, downsample)


class ConvNormAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image-pool branch + one branch per rate (1x1 when rate is 1)."""

    def __init__(self, in_ch: int, out_ch: int, atrous_rates: tuple[int, ...]) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(in_ch, out_ch, 1))]
        for r in atrous_rates:
            branches.append(ConvNormAct(in_ch, out_ch, 1 if r == 1 else 3, padding=0 if r == 1 else r, dilation=r))
        self.aspp_feature_extractors = nn.ModuleList(branches)
        self.aspp_fusion_layer = ConvNormAct((1 + len(atrous_rates)) * out_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, *rest = [m(x) for m in self.aspp_feature_extractors]
        pooled = F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.aspp_fusion_layer(torch.cat([pooled, *rest], dim=1))


class FAHead(nn.Module):
    """(B, in_channels, h, w) student products -> (B, 1, h, w) anomaly probability.

    ``prior_channels`` > 0 adds a prior path (``fa_input`` ``product+tlm`` or ``tlm``): a 1x1 conv over per-level log
    cosine distances (the TLM map's factors, :func:`stlm_train.modeling.stlm.fa_prior`) added to the logits,
    initialised to their sum (log TLM) with the head's last conv at zero, so training starts from the TLM
    map and the head learns a correction. 0 (default) is the official head and its state dict.
    """

    def __init__(self, in_channels: int, cfg: FAHeadConfig, prior_channels: int = 0) -> None:
        super().__init__()
        c = cfg.channels
        self.res = nn.Sequential(*[BasicBlock(in_channels if i == 0 else c, c) for i in range(cfg.num_blocks)])
        for m in self.res.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.head = nn.Sequential(
            ASPP(c, c, cfg.atrous_rates),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 1, 1),
        )
        self.prior: nn.Conv2d | None = None
        if prior_channels > 0:
            self.prior = nn.Conv2d(prior_channels, 1, 1)
            nn.init.ones_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def logits(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, h, w); prior: (B, prior_channels, h, w), required iff the head has a prior path."""
        out = self.head(self.res(x))
        if self.prior is None:
            return out
        if prior is None:
            raise ValueError("FAHead: this head has a prior path and needs the prior input")
        return out + self.prior(prior)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(x, prior))
