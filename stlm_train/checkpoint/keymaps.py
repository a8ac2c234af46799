"""Key maps: foreign checkpoint layouts -> our modules, as data (timm ``checkpoint_filter_fn`` style).

A :class:`KeyMap` is an ordered list of (foreign prefix -> our prefix) rules plus the prefixes known not to
reach the map, which are dropped. :func:`load_converted` applies one and loads strictly: any other key is an
error, and so is a missing group or a wrong shape, each reported in one line naming the file and the keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .files import CheckpointError

# SAM prompt-encoder / mask-decoder parts that never influence feature1/feature2.
_SAM_DEAD = (
    "mask_decoder.output_upscaling.", "mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.",
    "mask_decoder.transformer.final_attn_token_to_image.", "mask_decoder.transformer.norm_final_attn.",
    "prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.", "prompt_encoder.mask_downscaling.",
)
_TINYVIT_DEAD = ("norm_head.", "head.")
_SAM_DECODER_MAP = (
    ("mask_decoder.transformer.layers.", "decoder.transformer.layers."),
    ("mask_decoder.iou_token.", "decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "decoder.mask_tokens."),
    ("prompt_encoder.no_mask_embed.", "decoder.no_mask_embed."),
    ("prompt_encoder.pe_layer.", "decoder.pe_layer."),
)


@dataclass(frozen=True)
class KeyMap:
    """Ordered prefix rules: ``ignore`` first, then the first matching ``rename`` wins."""

    rename: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = field(default=())

    def convert(self, sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        """-> (converted, ignored keys, unknown keys)."""
        out: dict[str, torch.Tensor] = {}
        ignored, unknown = [], []
        for k, v in sd.items():
            if any(k.startswith(p) for p in self.ignore):
                ignored.append(k)
                continue
            for src, dst in self.rename:
                if k.startswith(src):
                    out[dst + k[len(src):]] = v
                    break
            else:
                unknown.append(k)
        return out, ignored, unknown

    def invert(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys -> foreign keys (for keys that have a rule)."""
        out = {}
        for k, v in sd.items():
            for src, dst in self.rename:
                if k.startswith(dst):
                    out[src + k[len(dst):]] = v
                    break
        return out


def _prefixed(prefix: str, rules: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((prefix + a, b) for a, b in rules)


# Official STLM: {"twostream": Batch_SamE.state_dict(), "segmentation_net": SegmentationNet.state_dict()}
# flattened to "twostream.<key>" / "segmentation_net.<key>". encoderT = plain Sp, encoderS = denoising Sd.
OFFICIAL_STLM_KEYMAP = KeyMap(
    rename=(("twostream.encoderT.", "plain."), ("twostream.encoderS.", "denoising."),
            *_prefixed("twostream.model.", _SAM_DECODER_MAP), ("segmentation_net.", "fa_head.")),
    ignore=("twostream.model.image_encoder.",  # MobileSAM's own encoder: present but unused
            *("twostream.encoder" + s + "." + d for s in "TS" for d in _TINYVIT_DEAD),
            *("twostream.model." + d for d in _SAM_DEAD)),
)
# segment-anything sam_vit_{b,l,h}_*.pth -> Teacher(ImageEncoderViT, FeatureDecoder)
SAM_TEACHER_KEYMAP = KeyMap(rename=(("image_encoder.", "encoder."), *_SAM_DECODER_MAP), ignore=_SAM_DEAD)
# mobile_sam.pt -> Teacher(TinyViT, FeatureDecoder)
MOBILE_SAM_TEACHER_KEYMAP = KeyMap(rename=SAM_TEACHER_KEYMAP.rename,
                                   ignore=(*_SAM_DEAD, *("image_encoder." + d for d in _TINYVIT_DEAD)))
# mobile_sam.pt -> both STLM students and the shared decoder (the paper's initialisation)
MOBILE_SAM_STUDENT_KEYMAP = KeyMap(rename=(("image_encoder.", "plain."), *_SAM_DECODER_MAP),
                                   ignore=MOBILE_SAM_TEACHER_KEYMAP.ignore)

_STAGES = (1, 2, 3, 4)
_OFFICIAL_CHILD = {1: 4, 2: 5, 3: 6, 4: 7}  # torchvision children index of layerN in ResNet18_MS3.model


def resnet_keymap(layers: tuple[int, ...]) -> KeyMap:
    """torchvision/timm resnet18 -> ``ResNet18Features(layers)`` (identity names, unused parts dropped)."""
    last = max(layers)
    keep = ("conv1.", "bn1.", *(f"layer{i}." for i in _STAGES if i <= last))
    return KeyMap(rename=tuple((k, k) for k in keep), ignore=("fc.", *(f"layer{i}." for i in _STAGES if i > last)))


def official_student_keymap(layers: tuple[int, ...]) -> KeyMap:
    """Official ``ResNet18_MS3.state_dict()`` (``model.N.*``) -> ``ResNet18Features(layers)``."""
    last = max(layers)
    rename = (("model.0.", "conv1."), ("model.1.", "bn1."),
              *((f"model.{_OFFICIAL_CHILD[i]}.", f"layer{i}.") for i in _STAGES if i <= last))
    return KeyMap(rename=rename, ignore=tuple(f"model.{_OFFICIAL_CHILD[i]}." for i in _STAGES if i > last))


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _groups(keys: list[str], depth: int = 3) -> list[str]:
    seen: dict[str, None] = {}
    for k in keys:
        seen.setdefault(".".join(k.split(".")[:depth]) + ".*", None)
    return list(seen)


def load_converted(module: nn.Module, sd: Mapping[str, torch.Tensor], keymap: KeyMap | None, path: str | os.PathLike,
                   required_prefixes: tuple[str, ...] | None = None) -> list[str]:
    """Convert ``sd`` with ``keymap`` and load it strictly into ``module`` (or into the listed prefixes).

    Returns the ignored foreign keys. Unknown keys, missing groups and shape mismatches raise.
    """
    if keymap is None:
        converted, ignored, unknown = dict(sd), [], []
    else:
        converted, ignored, unknown = keymap.convert(sd)
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys {_short(_groups(unknown))}")
    own = module.state_dict()
    wanted = [k for k in own if required_prefixes is None or k.startswith(required_prefixes)]
    missing = [k for k in wanted if k not in converted]
    if missing:
        inv = keymap.invert(dict.fromkeys(missing)) if keymap is not None else dict.fromkeys(missing)
        names = list(inv) or missing
        raise CheckpointError(f"{path}: missing keys {_short(_groups(names, 4))}")
    extra = [k for k in converted if k not in own]
    if extra:
        raise CheckpointError(f"{path}: unexpected keys {_short(_groups(extra))}")
    bad = [f"{k} {tuple(converted[k].shape)} (expected {tuple(own[k].shape)})"
           for k in converted if tuple(converted[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: wrong shapes: {_short(bad, 3)}")
    module.load_state_dict(converted, strict=required_prefixes is None)
    return ignored


def flatten_official(obj: Any, path: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """{"twostream": {...}, "segmentation_net": {...}} -> one flat dict with those prefixes."""
    if not isinstance(obj, Mapping) or not {"twostream", "segmentation_net"} <= set(obj):
        have = sorted(obj)[:4] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: not an official STLM state dict: expected top-level keys "
                              f"'twostream' and 'segmentation_net', found {have}")
    flat = {}
    for top in ("twostream", "segmentation_net"):
        if not isinstance(obj[top], Mapping):
            raise CheckpointError(f"{path}: '{top}' must be a state dict, got {type(obj[top]).__name__}")
        flat.update({f"{top}.{k}": v for k, v in obj[top].items()})
    return flat
