"""STLM weights from foreign files: official STLM state dicts, SAM ViT and MobileSAM teachers, and the
paper's MobileSAM initialisation of the students (all through the key maps of :mod:`.keymaps`)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..config import SAM_VIT_CONFIGS, STLMConfig, get_config
from ..modeling.stlm import STLM
from ..modeling.teacher import Teacher, build_tinyvit_teacher, build_vit_teacher
from .files import CheckpointError, checked_size, read_file
from .keymaps import (MOBILE_SAM_STUDENT_KEYMAP, MOBILE_SAM_TEACHER_KEYMAP, OFFICIAL_STLM_KEYMAP, SAM_TEACHER_KEYMAP,
                      flatten_official, load_converted)


def load_official_stlm(path_or_sd: str | os.PathLike | Mapping[str, Any], img_size: int = 1024,
                       config: STLMConfig | None = None, source: str | os.PathLike | None = None) -> STLM:
    """Official STLM checkpoint (encoderT/encoderS/model.*/segmentation_net) -> STLM in eval mode.

    The weights do not depend on the input size, so any multiple of 64 works (official code: 1024).
    ``source`` names the file an already-loaded state dict came from, for the error messages.
    """
    if isinstance(path_or_sd, Mapping):
        return official_stlm_model(path_or_sd, source if source is not None else "<state dict>", img_size, config)
    return official_stlm_model(read_file(path_or_sd), path_or_sd, img_size, config)


def official_state_dict(model: STLM) -> dict[str, dict[str, torch.Tensor]]:
    """Our STLM -> the official nested layout (only the parts that reach the map).

    Only a model with the official FA input (``product``) has one: the official code would read an
    ``absdiff`` model's weights as a product head, and has no keys for the TLM prior path."""
    if model.cfg.fa_input != "product":
        raise ValueError(f"official_state_dict: the model's FA head reads fa_input={model.cfg.fa_input!r}; the "
                         "official layout holds only the official 'product' head")
    flat = OFFICIAL_STLM_KEYMAP.invert(model.state_dict())
    out: dict[str, dict[str, torch.Tensor]] = {"twostream": {}, "segmentation_net": {}}
    for k, v in flat.items():
        top, rest = k.split(".", 1)
        out[top][rest] = v
    return out


def _vit_variant(sd: Mapping[str, torch.Tensor], path: Any) -> str:
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        raise CheckpointError(f"{path}: not a SAM checkpoint: missing key image_encoder.patch_embed.proj.weight")
    depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
    for name, vit in SAM_VIT_CONFIGS.items():
        if vit.embed_dim == w.shape[0] and vit.depth == depth:
            return name
    raise CheckpointError(f"{path}: SAM image encoder of width {w.shape[0]} and depth {depth} matches none of "
                          f"{sorted(SAM_VIT_CONFIGS)}")


def load_sam_teacher(path: str | os.PathLike, img_size: int, variant: str | None = None,
                     sd: Mapping[str, Any] | None = None) -> Teacher:
    """``sam_vit_{b,l,h}_*.pth`` (segment-anything layout) -> frozen Teacher; variant read from shapes.

    ``sd``: the file's state dict when the caller has already read it (a SAM file is up to 2.5 GB: read once).
    """
    sd = read_file(path) if sd is None else sd
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    name = variant or _vit_variant(sd, path)
    teacher = build_vit_teacher(SAM_VIT_CONFIGS[name], checked_size(img_size, path), kind=f"sam_{name}")
    load_converted(teacher, sd, SAM_TEACHER_KEYMAP, path)
    return teacher.eval()


def load_mobile_sam_teacher(path: str | os.PathLike, cfg: STLMConfig, sd: Mapping[str, Any] | None = None) -> Teacher:
    """``mobile_sam.pt`` -> frozen TinyViT teacher (a lighter alternative to SAM ViT); ``sd`` if already read."""
    sd = read_file(path) if sd is None else sd
    teacher = build_tinyvit_teacher(cfg, kind="mobile_sam")
    load_converted(teacher, sd, MOBILE_SAM_TEACHER_KEYMAP, path)
    return teacher.eval()


def load_teacher(spec: str | os.PathLike, cfg: STLMConfig) -> Teacher:
    """A teacher file of either family, told apart by the image-encoder keys."""
    sd = read_file(spec)  # once: the loaders below take the state dict
    if isinstance(sd, Mapping) and "image_encoder.patch_embed.proj.weight" in sd:
        return load_sam_teacher(spec, cfg.img_size, sd=sd)
    if isinstance(sd, Mapping) and "image_encoder.patch_embed.seq.0.c.weight" in sd:
        return load_mobile_sam_teacher(spec, cfg, sd=sd)
    raise CheckpointError(f"{spec}: not a SAM (sam_vit_*.pth) or MobileSAM (mobile_sam.pt) checkpoint")


def init_students_from_mobile_sam(model: STLM, path: str | os.PathLike) -> STLM:
    """Initialise both students and the shared decoder from ``mobile_sam.pt`` (the paper's init)."""
    sd = read_file(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a MobileSAM state dict, got {type(sd).__name__}")
    load_converted(model, sd, MOBILE_SAM_STUDENT_KEYMAP, path, required_prefixes=("plain.", "decoder."))
    model.denoising.load_state_dict(model.plain.state_dict())
    return model


def official_stlm_model(obj: Mapping[str, Any], path: Any, img_size: int, config: STLMConfig | None = None) -> STLM:
    cfg = config.with_img_size(checked_size(img_size, path)) if config else get_config("paper", checked_size(img_size, path))
    model = STLM(cfg)
    load_converted(model, flatten_official(obj, path), OFFICIAL_STLM_KEYMAP, path)
    return model.eval()
