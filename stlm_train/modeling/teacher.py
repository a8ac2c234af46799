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


#: How the built-in teacher's free parameters are drawn (``TEACHER_RECIPES[name]``):
#: norm weight ~ U(1 - w, 1 + w), norm bias ~ N(0, b), attention biases ~ N(0, a), linear biases
#: that the official init leaves at zero ~ N(0, l), and ``centre``: the fraction of every depthwise
#: kernel moved onto its centre tap (its norm kept). A random depthwise 3x3 kernel mixes a token with
#: its neighbours as much as with itself; TinyViT stacks ten of them at 1/16 (``local_conv`` replaces
#: the token, it is not residual), so a pasted defect changed the teacher almost as much outside the
#: defect as inside (1 - cos inside/outside 1.3 on the tire category); centre 0.8 gives 2.3.
#: "local" is the default; "reference" reached image AUROC 0.90 on a real MVTec AD category but maps
#: that do not localise; "v1" is this project's first recipe (both kept for the ablation table).
TEACHER_RECIPES: dict[str, dict[str, float]] = {
    "local": {"norm_weight": 0.5, "norm_bias": 0.1, "attention_bias": 0.5, "linear_bias": 0.02, "centre": 0.8},
    "reference": {"norm_weight": 0.5, "norm_bias": 0.1, "attention_bias": 0.5, "linear_bias": 0.02, "centre": 0.0},
    "v1": {"norm_weight": 0.5, "norm_bias": 0.2, "attention_bias": 1.0, "linear_bias": 0.0, "centre": 0.0},
}
DEFAULT_TEACHER_RECIPE = "local"
#: The teacher's seed is the run seed plus this, so it never shares a random stream with the students:
#: built from the students' seed, 109 of its 217 tensors equalled the plain student's initial weights
#: and the FA map learned nothing (image AUROC 0.53 vs 0.88 on a real category).
TEACHER_SEED_OFFSET = 1000


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) or type(m).__name__ == "LayerNorm2d"


@torch.no_grad()
def build_builtin_teacher(cfg: STLMConfig, seed: int = 0, recipe: str = DEFAULT_TEACHER_RECIPE) -> Teacher:
    """Deterministic random TinyViT teacher from ``seed`` alone; call ``calibrate_batchnorm`` next.

    Every draw (the official init and the recipe's) comes from a generator of its own, and the
    global RNG is left as it was, so building a teacher never shifts or mirrors the students' init.
    """
    if recipe not in TEACHER_RECIPES:
        raise ValueError(f"teacher recipe must be one of {', '.join(TEACHER_RECIPES)}, got {recipe!r}")
    r = TEACHER_RECIPES[recipe]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_tinyvit_teacher(cfg, kind="builtin")
    zero_bias = {id(m.bias) for m in teacher.modules()
                 if isinstance(m, nn.Linear) and m.bias is not None and not m.bias.any()}
    for m in teacher.modules():
        if _is_norm(m):
            m.weight.copy_(1.0 + r["norm_weight"] * (torch.rand(m.weight.shape, generator=gen) * 2 - 1))
            m.bias.copy_(r["norm_bias"] * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, TinyViTAttention):
            m.attention_biases.copy_(r["attention_bias"] * torch.randn(m.attention_biases.shape, generator=gen))
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
        if isinstance(m, nn.Linear) and id(m.bias) in zero_bias and r["linear_bias"]:
            m.bias.copy_(r["linear_bias"] * torch.randn(m.bias.shape, generator=gen))
        if r["centre"] and _is_depthwise(m):
            centre_kernel(m.weight, r["centre"])
    return teacher


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and max(m.kernel_size) > 1


@torch.no_grad()
def centre_kernel(weight: torch.Tensor, fraction: float) -> None:
    """Move ``fraction`` of each (C, 1, k, k) kernel onto its centre tap, keeping the kernel's norm."""
    delta = torch.zeros_like(weight)
    delta[..., weight.shape[-2] // 2, weight.shape[-1] // 2] = 1.0
    norm = weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    weight.copy_(fraction * norm * delta + (1.0 - fraction) * weight)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over ``batches``.

    Only the BatchNorm layers run in train mode (everything else as at inference), and the
    model is left in eval mode. Returns the number of images seen.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
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
