"""Model configuration: one dataclass per model family that fully describes a model, and one registry.

The config is saved inside every checkpoint (with its ``family``), so a checkpoint alone rebuilds its
model. Families: ``stlm`` (:class:`STLMConfig`) and ``stfpm`` (:class:`STFPMConfig`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Union

from stlm_deploy.preprocess import DEFAULT_RESIZE, RESIZE_POLICIES
from stlm_deploy.spec import IMG_SIZE_MULTIPLE, is_img_size

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: What the FA head reads per level k (``stlm_train.modeling.stlm.fa_input``): ``product`` is the official
#: ``-l2n(Sp_k) * l2n(Sd_k)`` (where the students agree it is the squared feature: content); ``absdiff`` is
#: ``|l2n(Sp_k) - l2n(Sd_k)|`` (zero where they agree: only their disagreement reaches the head).
#: ``product+tlm`` feeds the product and, through a prior path added to the head's logits, the per-level
#: log cosine distances whose sum is log TLM (``stlm_train.modeling.fa_head.FAHead``); ``tlm`` feeds those
#: distances alone, to the head and to its prior path (the head sees where the students disagree, never what
#: the image shows, so it cannot learn to spot the pseudo anomalies' textures).
FA_INPUTS = ("product", "absdiff", "product+tlm", "tlm")
DEFAULT_FA_INPUT = "product"  # the model description's default: official checkpoints and runs before the field
#: What ``stlm-train`` trains by default (README "Localisation": the FA map starts as the TLM map).
TRAIN_FA_INPUT = "product+tlm"
#: The FA inputs whose head has the TLM prior path.
PRIOR_FA_INPUTS = ("product+tlm", "tlm")
#: What the FA map is at inference (``stlm_train.modeling.stlm.STLM.fa_logits``): ``head``, the head's logits
#: (the official output; with the prior path added when the head has one), or ``prior``, the trained prior path
#: alone. With ``prior`` the whole head still trains (its loss shapes the students and the prior's per-level
#: weights), but its correction, learned on pseudo anomalies only, is not applied: on real defects it lowered
#: the map on every seed (README "Localisation"). The trainer picks ``prior`` for a head that has the path.
FA_OUTPUTS = ("head", "prior")
DEFAULT_FA_OUTPUT = "head"  # official checkpoints and runs before the field


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


class _ImageModelConfig:
    """What both families' configs share: image size and resize policy checks, resizing, serialising.
    (A plain base: its annotations are not dataclass fields; the subclasses declare the fields.)"""

    img_size: int
    resize: str

    def _check_image(self) -> None:
        validate_img_size(self.img_size)
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")

    def with_img_size(self, img_size: int) -> Any:
        return replace(self, img_size=img_size)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class STLMConfig(_ImageModelConfig):
    """Everything needed to rebuild an STLM model; ``img_size`` must be a multiple of 64."""

    name: str = "paper"
    img_size: int = 1024
    family: str = "stlm"
    student: TinyViTConfig = field(default_factory=TinyViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fa_head: FAHeadConfig = field(default_factory=FAHeadConfig)
    top_k: int = 100
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    # How images reach img_size (stlm_deploy.preprocess.RESIZE_POLICIES); checkpoints written before the
    # field existed were trained on "bilinear" and are read as such.
    resize: str = DEFAULT_RESIZE
    fa_input: str = DEFAULT_FA_INPUT  # FA_INPUTS; official checkpoints and older runs: product
    fa_output: str = DEFAULT_FA_OUTPUT  # FA_OUTPUTS; official checkpoints and older runs: head

    def __post_init__(self) -> None:
        self._check_image()
        if self.fa_input not in FA_INPUTS:
            raise ValueError(f"fa_input must be one of {', '.join(FA_INPUTS)}, got {self.fa_input!r}")
        if self.fa_output not in FA_OUTPUTS:
            raise ValueError(f"fa_output must be one of {', '.join(FA_OUTPUTS)}, got {self.fa_output!r}")
        if self.fa_output == "prior" and self.fa_input not in PRIOR_FA_INPUTS:
            raise ValueError(f"fa_output 'prior' needs an FA head with the prior path (fa_input "
                             f"{' or '.join(PRIOR_FA_INPUTS)}), got fa_input {self.fa_input!r}")

    @property
    def feature_size(self) -> int:
        return self.img_size // 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "STLMConfig":
        """Inverse of ``to_dict``; unknown keys are an error so a foreign file is not half-read."""
        kw = {"resize": "bilinear", **_known_fields(cls, d)}
        for key, sub in (("student", TinyViTConfig), ("decoder", DecoderConfig), ("fa_head", FAHeadConfig)):
            if key in kw and isinstance(kw[key], dict):
                kw[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw[key].items()})
        for key in ("pixel_mean", "pixel_std"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    if d.get("family", cls.family) != cls.family:
        raise ValueError(f"{cls.__name__}: family must be {cls.family!r}, got {d.get('family')!r}")
    return dict(d)


@dataclass(frozen=True)
class STFPMConfig(_ImageModelConfig):
    """STFPM (Wang et al., BMVC 2021): a frozen ResNet-18 teacher and a same-shape student, compared on
    layer1..layer3. ``top_k`` 1: the image score is the maximum of the map (official evaluation)."""

    name: str = "stfpm"
    img_size: int = 256
    family: str = "stfpm"
    layers: tuple[int, ...] = (1, 2, 3)  # ResNet stages whose outputs are matched
    top_k: int = 1
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN  # ImageNet, on the 0..255 scale
    pixel_std: tuple[float, float, float] = PIXEL_STD
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        self._check_image()
        if not self.layers or any(i not in (1, 2, 3, 4) for i in self.layers):
            raise ValueError(f"layers must be a non-empty subset of (1, 2, 3, 4), got {self.layers!r}")

    @property
    def map_size(self) -> int:
        """Side of the per-layer maps before the product: layer1's resolution (64 at 256 px, as official)."""
        return self.img_size // 4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "STFPMConfig":
        kw = _known_fields(cls, d)
        for key in ("layers", "pixel_mean", "pixel_std"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


ModelConfig = Union[STLMConfig, STFPMConfig]
FAMILIES: dict[str, type] = {"stlm": STLMConfig, "stfpm": STFPMConfig}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A checkpoint's ``config`` -> the config of its family (no ``family`` key: STLM, older checkpoints)."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict, got {type(d).__name__}")
    family = d.get("family", "stlm")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family].from_dict(d)


def validate_img_size(img_size: int) -> int:
    """``img_size`` if it follows the one size rule (``stlm_deploy.spec.is_img_size``), else a one-line ValueError."""
    if not is_img_size(img_size):
        raise ValueError(f"img_size must be a positive multiple of {IMG_SIZE_MULTIPLE} (e.g. 256, 512, 1024), "
                         f"got {img_size!r}")
    return img_size


CONFIGS: dict[str, ModelConfig] = {
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
    # STFPM, the official recipe (ResNet-18 teacher/student, 256 px).
    "stfpm": STFPMConfig(),
}


def get_config(name: str, img_size: int | None = None) -> ModelConfig:
    """Look up a registered config, optionally at another image size."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.with_img_size(img_size) if img_size is not None else cfg
