"""MobileSAM TinyViT image encoder (the STLM students and the built-in teacher).

Key names follow MobileSAM (``patch_embed.seq.0.c``, ``layers.N.blocks.M.attn.qkv``, ``neck.N``) so
official weights load through a prefix map. Unlike the official code this works for any input size
that is a multiple of 64: every resolution is derived from ``img_size`` instead of a fixed 64x64 view.
The classifier head (``norm_head``/``head``) never reaches the feature map and is not built.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TinyViTConfig
from .common import LayerNorm2d


class Conv2d_BN(nn.Sequential):  # noqa: N801 - official key layout (``.c``, ``.bn``)
    """Conv without bias followed by BatchNorm."""

    def __init__(self, in_ch: int, out_ch: int, ks: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_ch, out_ch, ks, stride, pad, 1, groups, bias=False))
        bn = nn.BatchNorm2d(out_ch)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 convs: image -> (B, C0, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block of stage 0 (the last BN starts at 0, as in TinyViT)."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2d_BN(dim, hidden, ks=1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2d_BN(hidden, dim, ks=1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """Downsampling between stages; tokens (B, H*W, C) or maps (B, C, H, W) in, tokens out."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H', W'): the merge without the final token layout."""
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.maps(x).flatten(2).transpose(1, 2)  # (B, H'*W', C')


class Attention(nn.Module):
    """Window self-attention with learned per-offset biases (LeViT style).

    The bias table is gathered from ``attention_biases`` on every call instead of being cached on
    ``eval()``: one code path for training and export, and weights loaded after ``eval()`` are used.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (B, h, N, d)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (h, N, N)
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class Mlp(nn.Module):
    """Pre-norm MLP of a TinyViT block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (zero-padded to whole windows) + depthwise local conv + MLP."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, attn_ratio=1.0, resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        h, w = self.resolution
        ws = self.window_size
        b, n, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w].contiguous()
        return x.view(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self._window_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on maps, then patch merging to tokens."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then optional patch merging."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        ])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder with SAM neck: (B, 3, S, S) -> (B, out_chans, S/16, S/16).

    Args:
        cfg: stage widths/depths/heads/windows.
        img_size: input side (multiple of 64); fixes the token grid of every stage.
        out_chans: neck width (the SAM decoder dimension, 256 in MobileSAM).
    """

    def __init__(self, cfg: TinyViTConfig, img_size: int, out_chans: int = 256, in_chans: int = 3) -> None:
        super().__init__()
        dims, n = cfg.embed_dims, len(cfg.depths)
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, dims[0])
        # Stage resolutions: /4, /8, /16 and /16 again (MobileSAM's last merge has stride 1).
        res = [img_size // 4 // (2 ** min(i, n - 2)) for i in range(n)]
        self.layers = nn.ModuleList()
        for i in range(n):
            down = None
            if i < n - 1:
                stride = 1 if i == n - 2 else 2
                down = PatchMerging((res[i], res[i]), dims[i], dims[i + 1], stride)
            if i == 0:
                layer: nn.Module = ConvLayer(dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, down)
            else:
                layer = BasicLayer(dims[i], (res[i], res[i]), cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i],
                                   cfg.mlp_ratio, cfg.local_conv_size, down)
            self.layers.append(layer)
        self.out_res = res[-1]
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 256, S/16, S/16)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_res, self.out_res, c).permute(0, 3, 1, 2)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0.0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(m.weight, 1.0)
