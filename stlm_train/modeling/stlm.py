"""STLM: plain student Sp + denoising student Sd + one shared SAM decoder + FA head.

``STLM`` is the inference graph (no teacher): images in, anomaly map / score / TLM map out. The
training graph adds the frozen teacher on top (``stlm_train.modeling.teacher``); export wraps this
module with fused pre/post-processing (``stlm_export.deploy_model``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import FA_INPUTS, PRIOR_FA_INPUTS, STLMConfig
from .common import Normalize
from .decoder import FeatureDecoder
from .fa_head import FAHead
from .predict import InferenceOutput, predict_images, upsample
from .tiny_vit import TinyViT

Features = tuple[torch.Tensor, torch.Tensor]  # (feature1, feature2), each (B, C, h, w)


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Channel L2 normalisation with the official eps placement (outside the sqrt)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + 1e-12)


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - <l2n(a), l2n(b)>`` per position: (B, C, h, w) x2 -> (B, 1, h, w) (the TLM map's and the losses' term)."""
    return 1 - torch.sum(l2n(a) * l2n(b), dim=1, keepdim=True)


def fa_input(plain: Features, denoising: Features, mode: str = "product") -> torch.Tensor:
    """FA head input -> (B, 2C, h, w): ``product`` cat_k(-l2n(Sp_k) * l2n(Sd_k)) (official), ``absdiff``
    cat_k(|l2n(Sp_k) - l2n(Sd_k)|) (:data:`stlm_train.config.FA_INPUTS`; ``product+tlm``: the product, the
    TLM prior goes to the head's prior path, :func:`fa_prior`); ``tlm``: (B, 2, h, w), the prior itself."""
    if mode not in FA_INPUTS:
        raise ValueError(f"fa_input must be one of {', '.join(FA_INPUTS)}, got {mode!r}")
    if mode == "absdiff":
        return torch.cat([torch.abs(l2n(p) - l2n(d)) for p, d in zip(plain, denoising)], dim=1)
    if mode == "tlm":
        return fa_prior(plain, denoising)
    return torch.cat([-l2n(p) * l2n(d) for p, d in zip(plain, denoising)], dim=1)  # product, product+tlm


#: Added to each cosine distance before its log in :func:`fa_prior` (keeps log finite where the students agree).
PRIOR_EPS = 1e-4


def has_prior(mode: str) -> bool:
    """Whether an ``fa_input`` mode feeds the FA head the TLM prior."""
    return mode in PRIOR_FA_INPUTS


def fa_prior(plain: Features, denoising: Features) -> torch.Tensor:
    """(B, L, h, w): log(1 - <l2n(Sp_k), l2n(Sd_k)> + eps) per level k; their sum is log of the TLM map."""
    return torch.cat([torch.log(cosine_distance_map(p, d).clamp_min(0) + PRIOR_EPS)
                      for p, d in zip(plain, denoising)], dim=1)


def tlm_map(plain: Features, denoising: Features) -> torch.Tensor:
    """No-FA map: prod_k(1 - <l2n(Sp_k), l2n(Sd_k)>) -> (B, 1, h, w)."""
    out = None
    for p, d in zip(plain, denoising):
        m = cosine_distance_map(p, d)
        out = m if out is None else out * m
    assert out is not None
    return out


def topk_score(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the k largest pixels of the full-size map."""
    flat = anomaly_map.flatten(1)
    return torch.topk(flat, min(k, flat.shape[1]), dim=1).values.mean(dim=1)


class STLM(nn.Module):
    """The student-only STLM graph.

    Args:
        cfg: model description (student TinyViT, decoder, FA head, image size, top-k).
    """

    def __init__(self, cfg: STLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.plain = TinyViT(cfg.student, cfg.img_size, out_chans=cfg.decoder.dim)  # Sp (official encoderT)
        self.denoising = TinyViT(cfg.student, cfg.img_size, out_chans=cfg.decoder.dim)  # Sd (official encoderS)
        self.decoder = FeatureDecoder(cfg.decoder)
        levels = 2  # the decoder's two feature maps
        in_channels = levels if cfg.fa_input == "tlm" else levels * cfg.decoder.dim
        self.fa_head = FAHead(in_channels, cfg.fa_head, levels if has_prior(cfg.fa_input) else 0)
        self.normalize = Normalize(cfg.pixel_mean, cfg.pixel_std)

    def student_features(self, x: torch.Tensor,
                         encoders: tuple[nn.Module, nn.Module] | None = None) -> tuple[Features, Features]:
        """Both streams, with one decoder call on their embeddings stacked along the batch.

        ``encoders``: other modules computing the same (plain, denoising) embeddings, e.g. the export's
        inference views of the students (``stlm_export.window_layout``); default the students themselves."""
        plain, denoising = encoders if encoders is not None else (self.plain, self.denoising)
        b = x.shape[0]
        emb = torch.cat([plain(x), denoising(x)], dim=0)  # (2B, C, h, w)
        f1, f2 = self.decoder(emb)
        return (f1[:b], f2[:b]), (f1[b:], f2[b:])

    def fa_head_inputs(self, plain: Features, denoising: Features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the FA head reads: the configured per-level input, and the TLM prior when the head has that path."""
        prior = fa_prior(plain, denoising) if self.fa_head.prior is not None else None
        if self.cfg.fa_input == "tlm":
            return prior, prior  # the head reads the disagreement alone, not the features' content
        return fa_input(plain, denoising, self.cfg.fa_input), prior

    def fa_logits(self, plain: Features, denoising: Features) -> torch.Tensor:
        """The FA map's logits (B, 1, h, w) on the students' features: the head's (``fa_output`` head), or its
        trained prior path alone (``prior``: the head's other layers are not computed)."""
        if self.cfg.fa_output == "prior":
            assert self.fa_head.prior is not None  # STLMConfig allows "prior" only with the path
            return self.fa_head.prior(fa_prior(plain, denoising))
        return self.fa_head.logits(*self.fa_head_inputs(plain, denoising))

    def forward(self, x: torch.Tensor) -> InferenceOutput:
        """x: normalised (B, 3, S, S) -> maps at S x S and scores."""
        plain, denoising = self.student_features(x)
        size = (x.shape[2], x.shape[3])
        anomaly_map = upsample(torch.sigmoid(self.fa_logits(plain, denoising)), size)
        return InferenceOutput(anomaly_map, topk_score(anomaly_map, self.cfg.top_k),
                               upsample(tlm_map(plain, denoising), size))

    def predict(self, images: torch.Tensor) -> InferenceOutput:
        """uint8 RGB (N, H, W, 3) of any size -> maps at (H, W) (:func:`predict_images`)."""
        return predict_images(self, images)
