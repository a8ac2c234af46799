"""Model configuration: one dataclass that fully describes an STLM model, and one registry of sizes.

The config is saved inside every checkpoint, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from stlm_deploy.preprocess import DEFAULT_RESIZE, RESIZE_POLICIES

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM TinyViT: stage widths, depths, heads and window sizes (stride 16 overall)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3


@dataclass(frozen=True)
class ViTConfig:
    """SAM ViT image encoder (the teacher of the paper)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    pretrain_img_size: int = 1024


SAM_VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass(frozen=True)
class DecoderConfig:
    """SAM mask decoder parts that reach the anomaly map: the two-way transformer and its tokens."""

    dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_mask_tokens: int = 4


@dataclass(frozen=True)
class FAHeadConfig:
    """Feature-aggregation head (DeSTSeg-style segmentation net)."""

    channels: int = 128
    num_blocks: int = 2
    atrous_rates: tuple[int, ...] = (1, 3)


@dataclass(frozen=True)
class STLMConfig:
    """Everything needed to rebuild an STLM model; ``img_size`` must be a multiple of 64."""

    name: str = "paper"
    img_size: int = 1024
    student: TinyViTConfig = field(default_factory=TinyViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fa_head: FAHeadConfig = field(default_factory=FAHeadConfig)
    top_k: int = 100
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    # How images reach img_size (stlm_deploy.preprocess.RESIZE_POLICIES); checkpoints written before the
    # field existed were trained on "bilinear" and are read as such.
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        validate_img_size(self.img_size)
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")

    @property
    def feature_size(self) -> int:
        return self.img_size // 16

    def with_img_size(self, img_size: int) -> "STLMConfig":
        return replace(self, img_size=img_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "STLMConfig":
        """Inverse of ``to_dict``; unknown keys are an error so a foreign file is not half-read."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown STLMConfig fields {unknown}")
        kw = {"resize": "bilinear", **d}
        for key, sub in (("student", TinyViTConfig), ("decoder", DecoderConfig), ("fa_head", FAHeadConfig)):
            if key in kw and isinstance(kw[key], dict):
                kw[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw[key].items()})
        for key in ("pixel_mean", "pixel_std"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def validate_img_size(img_size: int) -> int:
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0 or img_size % 64:
        raise ValueError(f"img_size must be a positive multiple of 64 (e.g. 256, 512, 1024), got {img_size!r}")
    return img_size


CONFIGS: dict[str, STLMConfig] = {
    # The paper / official code: MobileSAM TinyViT students at 1024 px.
    "paper": STLMConfig(name="paper", img_size=1024),
    # A tiny model with the same topology, for tests and quick demos.
    "small": STLMConfig(
        name="small",
        img_size=128,
        student=TinyViTConfig(embed_dims=(16, 32, 40, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                              window_sizes=(7, 7, 7, 7)),
        decoder=DecoderConfig(dim=64, depth=2, num_heads=4, mlp_dim=128),
        fa_head=FAHeadConfig(channels=32),
    ),
}


def get_config(name: str, img_size: int | None = None) -> STLMConfig:
    """Look up a registered config, optionally at another image size."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.with_img_size(img_size) if img_size is not None else cfg
