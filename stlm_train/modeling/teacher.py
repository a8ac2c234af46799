"""The frozen teacher: a SAM-style encoder + its own decoder producing (feature1, feature2).

Three kinds: SAM ViT (vit_b/l/h, the paper), MobileSAM TinyViT, and the built-in weightless teacher.
A TinyViT with its official random init is useless as a teacher (zero-initialised MBConv BN and
attention biases make features nearly image-independent), so the built-in one randomises every norm
affine and attention-bias table from its seed and then calibrates all BatchNorm statistics on the
training images, which makes its features image-dependent and informative enough to distil.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import DecoderConfig, STLMConfig, ViTConfig
from .decoder import FeatureDecoder
from .tiny_vit import Attention as TinyViTAttention
from .tiny_vit import TinyViT
from .vit import ImageEncoderViT


class Teacher(nn.Module):
    """encoder -> shared-style decoder features; always frozen and run without gradients."""

    def __init__(self, encoder: nn.Module, decoder: FeatureDecoder, kind: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.kind = kind
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(self.encoder(x))


def build_vit_teacher(vit: ViTConfig, img_size: int, decoder: DecoderConfig | None = None, kind: str = "sam") -> Teacher:
    dec = decoder or DecoderConfig()
    return Teacher(ImageEncoderViT(vit, img_size, out_chans=dec.dim), FeatureDecoder(dec), kind)


def build_tinyvit_teacher(cfg: STLMConfig, kind: str = "mobile_sam") -> Teacher:
    return Teacher(TinyViT(cfg.student, cfg.img_size, out_chans=cfg.decoder.dim), FeatureDecoder(cfg.decoder), kind)


@torch.no_grad()
def build_builtin_teacher(cfg: STLMConfig, seed: int = 0) -> Teacher:
    """Deterministic random TinyViT teacher; call ``calibrate_batchnorm`` on training images next."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        teacher = build_tinyvit_teacher(cfg, kind="builtin")
    finally:
        torch.random.set_rng_state(state)
    for m in teacher.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) or type(m).__name__ == "LayerNorm2d":
            m.weight.copy_(1.0 + 0.5 * (torch.rand(m.weight.shape, generator=gen) * 2 - 1))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, TinyViTAttention):
            m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=gen))
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    return teacher


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over ``batches``.

    Returns the number of images seen. The model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return seen
