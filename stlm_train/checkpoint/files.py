"""Reading a checkpoint file: once, with the sha256 of the very bytes loaded, and telling its kind in one place.

Every file goes through ``torch.load(weights_only=True)``: tensors and plain containers only, so a pickle
that would import or call anything is refused before it runs. Every problem is a one-line
:class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stlm_deploy.files import sha256_bytes

from ..config import validate_img_size

FORMAT = "stlm-checkpoint"
FORMAT_VERSION = 1
#: what a model file can be: a project checkpoint of either family, or an official file of either family
KINDS = ("stlm", "stfpm", "official_stlm", "official_stfpm")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the keys."""


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
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    return _torch_load(io.BytesIO(data), p), sha256_bytes(data)


def is_official_stfpm(obj: Any) -> bool:
    """``{"category", "state_dict"}`` with ``model.0.weight`` inside: an official STFPM student snapshot."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and "model.0.weight" in obj["state_dict"] and "format" not in obj)


def detect_kind(obj: Any, path: str | os.PathLike) -> str:
    """The one place a file's kind is told (:data:`KINDS`); anything else is a one-line CheckpointError."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        cfg = obj.get("config")
        return "stfpm" if isinstance(cfg, Mapping) and cfg.get("family") == "stfpm" else "stlm"
    if isinstance(obj, Mapping) and {"twostream", "segmentation_net"} <= set(obj):
        return "official_stlm"
    if is_official_stfpm(obj):
        return "official_stfpm"
    raise CheckpointError(f"{path}: not a model checkpoint: expected a project checkpoint (format "
                          f"'{FORMAT}'), an official STLM state dict with 'twostream' and 'segmentation_net' "
                          "or an official STFPM snapshot with 'state_dict'")


def checked_size(img_size: int, path: Any) -> int:
    """``img_size`` by the one size rule, or a one-line CheckpointError naming ``path``."""
    try:
        return validate_img_size(img_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
