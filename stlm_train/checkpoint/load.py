"""Any model file -> a model in eval mode: a project checkpoint of either family, an official STLM state dict
or an official STFPM snapshot (told apart by :func:`.files.detect_kind`)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from stlm_deploy.tiling import Tiling

from ..config import ModelConfig, config_from_dict
from ..modeling import build_model
from ..modeling.stfpm import STFPM
from ..modeling.stlm import STLM
from .files import FORMAT_VERSION, CheckpointError, checked_size, detect_kind, read_file
from .keymaps import load_converted
from .stfpm import load_official_stfpm
from .stlm import official_stlm_model


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
    kind = detect_kind(obj, path)
    if kind == "official_stlm":
        return official_stlm_model(obj, path, img_size or 1024)
    if kind == "official_stfpm":
        return load_official_stfpm(obj, img_size or 256, teacher, source=path)
    cfg = project_config(obj, path)
    if img_size is not None:
        cfg = cfg.with_img_size(checked_size(img_size, path))
    model = build_model(cfg)
    sd = obj.get("state_dict")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: missing 'state_dict'")
    load_converted(model, sd, None, path)
    model.tiling = checkpoint_tiling(obj, cfg.img_size, path)
    return model.eval()


def project_config(obj: Mapping[str, Any], path: str | os.PathLike) -> ModelConfig:
    """The model config a project checkpoint saved (either family); a newer format or a bad config: one line."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is newer than supported "
                              f"({FORMAT_VERSION}); upgrade stlm-deploy")
    try:
        return config_from_dict(obj["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'config': {e}") from None


def checkpoint_tiling(obj: Any, tile: int, path: str | os.PathLike = "<checkpoint>") -> Tiling | None:
    """The tiling a project checkpoint's ``preprocessing`` records, with ``tile`` = the model input size
    (None: no ``work_size``, an untiled checkpoint); bad values are a one-line :class:`CheckpointError`."""
    pre = obj.get("preprocessing") if isinstance(obj, Mapping) else None
    try:
        return Tiling.from_preprocessing(tile, pre if isinstance(pre, Mapping) else None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid 'preprocessing' tiling at img_size {tile}: {e}") from None
