"""The students' TinyViT with window layout carried across the blocks of a stage: measured, not adopted.

The training module (``stlm_train.modeling.TinyViT``, the official block structure) keeps tokens in
row-major (B, H*W, C) order and, in every block, pads to whole windows, partitions, runs attention,
reverses, crops, and transposes twice more around the depthwise local convolution: four Transposes plus
a Pad and a Slice per block. Here each stage pads and partitions once and keeps the tokens in window
order across its blocks; the padding is re-zeroed by a constant mask wherever the official code would
crop and pad again, so every real position computes the official numbers (tested).

Issue 24 asked for this rewrite, to be kept only if faster in a same-run table. It is not
(``python -m stlm_bench.vs_plain --layouts``): the padded tokens that the official block crops away
(at 256 px stage 2 pads 16x16 to 28x28) now also go through the local convolution and the MLP, and
the mask costs two multiplies per block, more than the Pad, Slice and Transposes saved. Exports
therefore trace the official block order (``window_layout=False``); this module reproduces the
measurement. It shares (never copies) the trained submodules and assumes evaluation-mode BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stlm_train.modeling import TinyViT
from stlm_train.modeling.tiny_vit import BasicLayer, ConvLayer, TinyViTBlock

__all__ = ["ConvStage", "WindowedStage", "WindowedTinyViT"]


class WindowedStage(nn.Module):
    """One TinyViT stage (``BasicLayer``) and its patch merging, NCHW maps in and out, window order inside.

    Args:
        layer: the trained stage (its blocks and downsample are shared).
    """

    def __init__(self, layer: BasicLayer) -> None:
        super().__init__()
        first: TinyViTBlock = layer.blocks[0]
        self.blocks = layer.blocks
        self.downsample = layer.downsample
        self.h, self.w = first.resolution
        self.ws = first.window_size
        self.pad_b, self.pad_r = (-self.h) % self.ws, (-self.w) % self.ws
        self.nh, self.nw = (self.h + self.pad_b) // self.ws, (self.w + self.pad_r) // self.ws
        self.padded = bool(self.pad_b or self.pad_r)
        mask = torch.zeros(self.h + self.pad_b, self.w + self.pad_r)
        mask[: self.h, : self.w] = 1.0
        self.register_buffer("mask", self._to_windows(mask[None, None]).view(1, self.nh * self.nw, self.ws ** 2, 1),
                             persistent=False)

    def _to_windows(self, m: torch.Tensor) -> torch.Tensor:
        """(B, C, PH, PW) -> (B * nW, ws*ws, C), as two transposes that each move one axis (runtimes have
        fast kernels for those; one general 6-D permutation was slower than both together)."""
        c, ws = m.shape[1], self.ws
        m = m.reshape(-1, c, self.nh * ws * self.nw * ws).transpose(1, 2)  # channels last
        m = m.reshape(-1, self.nh, ws, self.nw, ws * c).transpose(2, 3)
        return m.reshape(-1, ws * ws, c)

    def _to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B * nW, ws*ws, C) -> (B, C, PH, PW), the reverse of :meth:`_to_windows`."""
        c, ws = x.shape[2], self.ws
        x = x.reshape(-1, self.nh, self.nw, ws, ws * c).transpose(2, 3)
        x = x.reshape(-1, self.nh * ws * self.nw * ws, c).transpose(1, 2)
        return x.reshape(-1, c, self.nh * ws, self.nw * ws)

    def _zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return x
        n, c = x.shape[1], x.shape[2]
        return (x.reshape(-1, self.nh * self.nw, n, c) * self.mask).reshape(-1, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.padded:
            x = F.pad(x, (0, self.pad_r, 0, self.pad_b))
        x = self._to_windows(x)
        for i, blk in enumerate(self.blocks):
            if i:
                x = self._zero_padding(x)  # the official block pads the cropped tokens with zeros
            x = self._zero_padding(x + blk.attn(x))  # ... and its local conv sees a zero border
            x = self._to_windows(blk.local_conv(self._to_map(x)))
            x = x + blk.mlp(x)
        x = self._to_map(x)
        if self.padded:
            x = x[:, :, : self.h, : self.w]
        return self.downsample.maps(x) if self.downsample is not None else x


class ConvStage(nn.Module):
    """Stage 0 (MBConv blocks) and its patch merging, NCHW maps in and out."""

    def __init__(self, layer: ConvLayer) -> None:
        super().__init__()
        self.blocks = layer.blocks
        self.downsample = layer.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample.maps(x) if self.downsample is not None else x


class WindowedTinyViT(nn.Module):
    """``TinyViT`` forward on NCHW maps between stages and window order inside them (same outputs).

    Attribute names mirror ``TinyViT`` (``patch_embed``, ``layers.N.blocks.M``, ``neck``) so exported
    node names keep mapping to stages and blocks.
    """

    def __init__(self, encoder: TinyViT) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.layers = nn.ModuleList([ConvStage(encoder.layers[0])]
                                    + [WindowedStage(layer) for layer in encoder.layers[1:]])
        self.neck = encoder.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 256, S/16, S/16)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
