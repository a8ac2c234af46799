"""STLM: plain student Sp + denoising student Sd + one shared SAM decoder + FA head.

``STLM`` is the inference graph (no teacher): images in, anomaly map / score / TLM map out. The
training graph adds the frozen teacher on top (``stlm_train.modeling.teacher``); export wraps this
module with fused pre/post-processing (``stlm_export.deploy_model``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stlm_deploy.preprocess import resize_image

from ..config import STLMConfig
from .common import Normalize
from .decoder import FeatureDecoder
from .fa_head import FAHead
from .tiny_vit import TinyViT

Features = tuple[torch.Tensor, torch.Tensor]  # (feature1, feature2), each (B, C, h, w)


class InferenceOutput(NamedTuple):
    """Field names are the ONNX output names."""

    anomaly_map: torch.Tensor  # (B, H, W) FA map in [0, 1]
    score: torch.Tensor  # (B,) mean of the top-k map pixels
    tlm_map: torch.Tensor  # (B, H, W) no-FA map


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Channel L2 normalisation with the official eps placement (outside the sqrt)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + 1e-12)


def fa_input(plain: Features, denoising: Features) -> torch.Tensor:
    """FA head input: cat_k(-l2n(Sp_k) * l2n(Sd_k)) -> (B, 2C, h, w)."""
    return torch.cat([-l2n(p) * l2n(d) for p, d in zip(plain, denoising)], dim=1)


def tlm_map(plain: Features, denoising: Features) -> torch.Tensor:
    """No-FA map: prod_k(1 - <l2n(Sp_k), l2n(Sd_k)>) -> (B, 1, h, w)."""
    out = None
    for p, d in zip(plain, denoising):
        m = 1 - torch.sum(l2n(p) * l2n(d), dim=1, keepdim=True)
        out = m if out is None else out * m
    assert out is not None
    return out


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W), bilinear with align_corners=False as in the official evaluation."""
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]


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
        self.fa_head = FAHead(2 * cfg.decoder.dim, cfg.fa_head)
        self.normalize = Normalize(cfg.pixel_mean, cfg.pixel_std)

    def student_features(self, x: torch.Tensor) -> tuple[Features, Features]:
        """Both streams, with one decoder call on their embeddings stacked along the batch."""
        b = x.shape[0]
        emb = torch.cat([self.plain(x), self.denoising(x)], dim=0)  # (2B, C, h, w)
        f1, f2 = self.decoder(emb)
        return (f1[:b], f2[:b]), (f1[b:], f2[b:])

    def forward(self, x: torch.Tensor) -> InferenceOutput:
        """x: normalised (B, 3, S, S) -> maps at S x S and scores."""
        plain, denoising = self.student_features(x)
        size = (x.shape[2], x.shape[3])
        anomaly_map = upsample(self.fa_head(fa_input(plain, denoising)), size)
        return InferenceOutput(anomaly_map, topk_score(anomaly_map, self.cfg.top_k),
                               upsample(tlm_map(plain, denoising), size))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> InferenceOutput:
        """uint8 RGB (N, H, W, 3) of any size -> maps at (H, W); resized to img_size on the way in.

        Scores are always taken on the img_size map (what the exported graph computes).
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[-1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a uint8 tensor (N, H, W, 3) RGB, got {got}")
        device = next(self.parameters()).device
        h, w = images.shape[1:3]
        s = self.cfg.img_size
        if (h, w) != (s, s):  # the runtime's own resize, so eager and engine see the same pixels
            small = [resize_image(im, s, self.cfg.resize) for im in images.cpu().numpy()]
            images = torch.from_numpy(np.stack(small))
        out = self(self.normalize(images.to(device)))
        if (h, w) != (s, s):
            out = InferenceOutput(upsample(out.anomaly_map[:, None], (h, w)), out.score,
                                  upsample(out.tlm_map[:, None], (h, w)))
        return out
