"""Test-only helpers: deterministic non-trivial weights and an independent naive STLM reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a seeded random value (zero inits hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim > 1:  # variance-preserving, so the signal survives depth and the maps depend on the image
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return module


@torch.no_grad()
def naive_reference(model, images_uint8: torch.Tensor, k: int = 100):
    """The official evaluation written out longhand: per-sample, per-stream decoder calls, sort-based top-k."""
    mean = torch.tensor(model.cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.pixel_std).view(1, 3, 1, 1)
    x = (images_uint8.permute(0, 3, 1, 2).float() - mean) / std
    maps, tlms, scores = [], [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        fp = model.decoder(model.plain(xi))
        fd = model.decoder(model.denoising(xi))

        def n(t):
            return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + 1e-12)

        fa_in = torch.cat([-n(p) * n(d) for p, d in zip(fp, fd)], dim=1)
        fa = model.fa_head(fa_in)
        tlm = (1 - torch.sum(n(fp[0]) * n(fd[0]), 1, keepdim=True)) * (1 - torch.sum(n(fp[1]) * n(fd[1]), 1, keepdim=True))
        size = images_uint8.shape[1:3]
        fa = F.interpolate(fa, size=size, mode="bilinear", align_corners=False)
        tlm = F.interpolate(tlm, size=size, mode="bilinear", align_corners=False)
        maps.append(fa[0, 0])
        tlms.append(tlm[0, 0])
        scores.append(torch.sort(fa.flatten(), descending=True).values[:k].mean())
    return torch.stack(maps), torch.stack(scores), torch.stack(tlms)
