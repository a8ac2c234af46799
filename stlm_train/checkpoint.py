"""Checkpoints: the project's own format (either model family) and the official STLM / SAM / MobileSAM files
(official STFPM files: :mod:`stlm_train.stfpm_checkpoint`).

Foreign layouts are converted with key maps (data, timm ``checkpoint_filter_fn`` style): an ordered
list of (foreign prefix -> our prefix) rules, plus the prefixes that are known not to reach the map
and are dropped. Any other key is an error, and so is a missing group or a wrong shape, each
reported in one line that names the file and the offending keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stlm_deploy.tiling import Tiling

from .config import SAM_VIT_CONFIGS, STLMConfig, config_from_dict, get_config, validate_img_size
from .modeling import build_model, tiling_of
from .modeling.stfpm import STFPM
from .modeling.stlm import STLM
from .modeling.teacher import Teacher, build_tinyvit_teacher, build_vit_teacher

FORMAT = "stlm-checkpoint"
FORMAT_VERSION = 1

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the keys."""


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _groups(keys: list[str], depth: int = 3) -> list[str]:
    seen: dict[str, None] = {}
    for k in keys:
        seen.setdefault(".".join(k.split(".")[:depth]) + ".*", None)
    return list(seen)


def _torch_load(source: Any, p: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; a pickle that would import or
    call anything (code execution) is refused before it runs, as a one-line CheckpointError."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint (truncated or another file type): "
                              f"{reason[:160]}") from None


def read_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing, foreign or truncated files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    return _torch_load(p, p)


def read_file_and_sha256(path: str | os.PathLike) -> tuple[Any, str]:
    """(:func:`read_file`'s object, sha256 of the very bytes it was loaded from): the file is read once,
    hashed, then loaded from memory, so the recorded checksum cannot describe another version of the file."""
    import io

    from stlm_deploy.files import sha256_bytes

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    return _torch_load(io.BytesIO(data), p), sha256_bytes(data)


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


def load_official_stlm(path_or_sd: str | os.PathLike | Mapping[str, Any], img_size: int = 1024,
                       config: STLMConfig | None = None, source: str | os.PathLike | None = None) -> STLM:
    """Official STLM checkpoint (encoderT/encoderS/model.*/segmentation_net) -> STLM in eval mode.

    The weights do not depend on the input size, so any multiple of 64 works (official code: 1024).
    ``source`` names the file an already-loaded state dict came from, for the error messages.
    """
    if isinstance(path_or_sd, Mapping):
        return _load_official_obj(path_or_sd, source if source is not None else "<state dict>", img_size, config)
    return _load_official_obj(read_file(path_or_sd), path_or_sd, img_size, config)


def official_state_dict(model: STLM) -> dict[str, dict[str, torch.Tensor]]:
    """Our STLM -> the official nested layout (only the parts that reach the map)."""
    flat = OFFICIAL_STLM_KEYMAP.invert(model.state_dict())
    out: dict[str, dict[str, torch.Tensor]] = {"twostream": {}, "segmentation_net": {}}
    for k, v in flat.items():
        top, rest = k.split(".", 1)
        out[top][rest] = v
    return out


def _checked_size(img_size: int, path: Any) -> int:
    try:
        return validate_img_size(img_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


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
    teacher = build_vit_teacher(SAM_VIT_CONFIGS[name], _checked_size(img_size, path), kind=f"sam_{name}")
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


def save_checkpoint(path: str | os.PathLike, model: STLM | STFPM, **extra: Any) -> Path:
    """Project checkpoint: weights + config + preprocessing + whatever the trainer adds (thresholds...).

    An STFPM checkpoint holds the teacher's weights too (both networks run at inference). A tiled model
    (``model.tiling``) adds ``work_size``, ``tile_overlap`` and ``tile_blend`` to ``preprocessing``.
    """
    from stlm_deploy.files import atomic_output

    cfg = model.cfg
    tiling = tiling_of(model)  # a tiled model records its work size and overlap (untiled: no such keys)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "preprocessing": {"resize": cfg.resize, "mean": list(cfg.pixel_mean), "std": list(cfg.pixel_std),
                          "channel_order": "RGB", "img_size": cfg.img_size,
                          **(tiling.to_preprocessing() if tiling is not None else {})},
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_output(path, clean_stale=True) as tmp:  # removes temps of killed saves
        torch.save(payload, tmp)
    return Path(path)


def checkpoint_kind(obj: Any) -> str:
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return "project"
    if isinstance(obj, Mapping) and {"twostream", "segmentation_net"} <= set(obj):
        return "official"
    from .stfpm_checkpoint import is_official_stfpm

    if is_official_stfpm(obj):
        return "official_stfpm"
    return "unknown"


def load_model(path: str | os.PathLike, img_size: int | None = None, device: str | torch.device = "cpu",
               teacher: str | os.PathLike | None = None) -> STLM | STFPM:
    """Any checkpoint -> model in eval mode on ``device``: a project checkpoint of either family, an
    official STLM state dict, or an official STFPM student snapshot (``teacher``: its ImageNet
    ResNet-18 file, e.g. ``resnet18-f37072fd.pth``; official STFPM default size 256)."""
    return model_from_checkpoint(read_file(path), path, img_size, teacher).to(device)


def model_from_checkpoint(obj: Any, path: str | os.PathLike, img_size: int | None = None,
                          teacher: str | os.PathLike | None = None) -> STLM | STFPM:
    """An already-read checkpoint (:func:`read_file`) -> model in eval mode; errors name ``path``.

    For callers that also need the checkpoint's other entries (thresholds, config) without
    reading the file twice.
    """
    kind = checkpoint_kind(obj)
    if kind == "official":
        return _load_official_obj(obj, path, img_size or 1024)
    if kind == "official_stfpm":
        from .stfpm_checkpoint import load_official_stfpm

        return load_official_stfpm(obj, img_size or 256, teacher, source=path)
    if kind != "project":
        raise CheckpointError(f"{path}: not a model checkpoint: expected a project checkpoint (format "
                              f"'{FORMAT}'), an official STLM state dict with 'twostream' and 'segmentation_net' "
                              "or an official STFPM snapshot with 'state_dict'")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is newer than supported "
                              f"({FORMAT_VERSION}); upgrade stlm-deploy")
    try:
        cfg = config_from_dict(obj["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'config': {e}") from None
    if img_size is not None:
        cfg = cfg.with_img_size(_checked_size(img_size, path))
    model = build_model(cfg)
    sd = obj.get("state_dict")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: missing 'state_dict'")
    load_converted(model, sd, None, path)
    model.tiling = checkpoint_tiling(obj, cfg.img_size, path)
    return model.eval()


def checkpoint_tiling(obj: Any, tile: int, path: str | os.PathLike = "<checkpoint>") -> Tiling | None:
    """The tiling a project checkpoint's ``preprocessing`` records, with ``tile`` = the model input size
    (None: no ``work_size``, an untiled checkpoint); bad values are a one-line :class:`CheckpointError`."""
    pre = obj.get("preprocessing") if isinstance(obj, Mapping) else None
    try:
        return Tiling.from_preprocessing(tile, pre if isinstance(pre, Mapping) else None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid 'preprocessing' tiling at img_size {tile}: {e}") from None


def _load_official_obj(obj: Mapping[str, Any], path: Any, img_size: int, config: STLMConfig | None = None) -> STLM:
    cfg = config.with_img_size(_checked_size(img_size, path)) if config else get_config("paper", _checked_size(img_size, path))
    model = STLM(cfg)
    load_converted(model, flatten_official(obj, path), OFFICIAL_STLM_KEYMAP, path)
    return model.eval()
