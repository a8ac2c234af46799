"""The shared SAM mask decoder as STLM uses it: two feature levels per image, no prompts.

``feature1`` is the encoder embedding itself (before the no-mask dense embedding is added) and
``feature2`` the two-way transformer's image tokens. Tokens are [iou_token, mask_tokens] with no
sparse prompts; the positional encoding is SAM's random-Fourier grid at the embedding size. The
output upscaling, hypernetwork MLPs and IoU head never influence these features and are not built.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import DecoderConfig
from .two_way import TwoWayTransformer


class PositionEmbeddingRandom(nn.Module):
    """SAM's dense positional encoding from a fixed random Gaussian matrix (a buffer, not a weight)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def forward(self, h: int, w: int) -> torch.Tensor:  # -> (C, h, w)
        g = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), device=g.device, dtype=g.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        coords = 2 * torch.stack([x, y], dim=-1) - 1
        coords = 2 * math.pi * (coords @ g)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1)


class FeatureDecoder(nn.Module):
    """(B, C, h, w) embeddings -> (feature1, feature2), both (B, C, h, w); batch = any number of images.

    Both student streams go through one call with their embeddings concatenated on the batch axis.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(cfg.depth, cfg.dim, cfg.num_heads, cfg.mlp_dim,
                                             cfg.attention_downsample_rate)
        self.iou_token = nn.Embedding(1, cfg.dim)
        self.mask_tokens = nn.Embedding(cfg.num_mask_tokens, cfg.dim)
        self.no_mask_embed = nn.Embedding(1, cfg.dim)
        self.pe_layer = PositionEmbeddingRandom(cfg.dim // 2)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = embeddings.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)  # (B, T, C)
        src = embeddings + self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.pe_layer(h, w).unsqueeze(0).expand(b, -1, -1, -1)
        keys = self.transformer(src, pos, tokens)  # (B, h*w, C)
        feature2 = keys.transpose(1, 2).reshape(b, c, h, w)
        return embeddings, feature2
