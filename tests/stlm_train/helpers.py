"""Test-only helpers: deterministic non-trivial weights, an independent naive STLM reference, and STFPM
weights in the torchvision / official layouts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stlm_train import get_config
from stlm_train.modeling import STFPM, ResNet18Features


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
def with_tlm_prior(model: nn.Module, mode: str = "product+tlm") -> nn.Module:
    """``model``'s weights in an eval-mode twin with the TLM prior path (``fa_input`` ``mode``: "product+tlm",
    or "tlm", whose head reads the prior alone and so gets seeded first-layer weights of its own), the prior set
    to trained-looking per-level weights and a bias (not the (1, 1) / 0 start)."""
    from dataclasses import replace

    from stlm_train import STLM

    m = STLM(replace(model.cfg, fa_input=mode))
    own = m.state_dict()
    fits = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = m.load_state_dict(fits, strict=False).missing_keys
    unfit = sorted(k for k in missing if ".prior." not in k)
    assert sorted(set(missing) - set(unfit)) == ["fa_head.prior.bias", "fa_head.prior.weight"]
    assert unfit == ([] if mode == "product+tlm" else
                     ["fa_head.res.0.conv1.weight", "fa_head.res.0.downsample.0.weight"])
    g = torch.Generator().manual_seed(3)
    for name, p in m.named_parameters():
        if name in unfit:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    m.fa_head.prior.weight.copy_(torch.tensor([0.7, 1.3]).view(1, 2, 1, 1))
    m.fa_head.prior.bias.fill_(2.0)
    return m.eval()


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


# ---- STFPM: ResNet-18 weights in the layouts users have
_PREFIX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def full_resnet18(seed: int) -> ResNet18Features:
    """All four stages, seeded non-trivial weights: what a torchvision resnet18 holds (minus fc)."""
    return randomize(ResNet18Features((1, 2, 3, 4)), seed).eval()


def torchvision_sd(net: ResNet18Features, with_fc: bool = True) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    if with_fc:  # the ImageNet head, which STFPM never uses
        sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


def official_snapshot(net: ResNet18Features) -> dict:
    """The official ``{'category', 'state_dict'}`` of ResNet18_MS3 (nn.Sequential of torchvision's children)."""
    sd = {}
    for k, v in net.state_dict().items():
        head, rest = k.split(".", 1)
        sd[f"model.{_PREFIX[head]}.{rest}"] = v.clone()
    return {"category": "bottle", "state_dict": sd}


def built_stfpm(seed_t: int = 1, seed_s: int = 2, img_size: int = 256) -> STFPM:
    model = STFPM(get_config("stfpm", img_size))
    model.teacher.load_state_dict({k: v for k, v in full_resnet18(seed_t).state_dict().items()
                                   if not k.startswith("layer4.")})
    model.student.load_state_dict({k: v for k, v in full_resnet18(seed_s).state_dict().items()
                                   if not k.startswith("layer4.")})
    return model.eval()


