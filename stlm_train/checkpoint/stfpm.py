"""STFPM weights from foreign files: ImageNet ResNet-18 teachers and official student snapshots.

* teacher: torchvision ``resnet18-*.pth`` or timm ``resnet18`` state dicts (one key layout:
  ``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``); the head and the stages after the last matched
  one are dropped; a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is accepted.
* student: the official ``{"category", "state_dict"}`` snapshot of ``ResNet18_MS3``, whose trunk is an
  ``nn.Sequential`` of torchvision's children (``model.0`` = conv1, ``model.1`` = bn1, ``model.4..7`` =
  layer1..4).

Every problem is a one-line :class:`CheckpointError` naming the file (``keymaps.load_converted``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..config import STFPMConfig, get_config
from ..modeling.stfpm import STFPM
from .files import CheckpointError, checked_size, is_official_stfpm, read_file
from .keymaps import load_converted, official_student_keymap, resnet_keymap


def _unwrap(obj: Any, path: Any, what: str) -> Mapping[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and "conv1.weight" not in obj:
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {what} (a state dict of tensors), got {type(obj).__name__}")
    return obj


def load_resnet18_teacher(model: STFPM, path: str | os.PathLike) -> STFPM:
    """Load an ImageNet ResNet-18 (torchvision / timm file) into ``model.teacher``, in place."""
    sd = _unwrap(read_file(path), path, "a torchvision/timm resnet18 state dict (conv1, bn1, layer1..4, fc)")
    if "conv1.weight" not in sd:
        raise CheckpointError(f"{path}: not a ResNet-18 state dict: missing key conv1.weight "
                              "(expected torchvision resnet18-*.pth or timm resnet18 keys)")
    load_converted(model.teacher, sd, resnet_keymap(model.cfg.layers), path)
    model.teacher.eval()
    return model


def load_official_stfpm(snapshot: str | os.PathLike | Mapping[str, Any], img_size: int = 256,
                        teacher: str | os.PathLike | None = None, config: STFPMConfig | None = None,
                        source: str | os.PathLike | None = None) -> STFPM:
    """Official student snapshot + ImageNet ResNet-18 teacher file -> STFPM in eval mode.

    The student was distilled from the ImageNet teacher, so the teacher file is required.
    """
    path = source if source is not None else (snapshot if not isinstance(snapshot, Mapping) else "<state dict>")
    obj = snapshot if isinstance(snapshot, Mapping) else read_file(snapshot)
    if not is_official_stfpm(obj):
        raise CheckpointError(f"{path}: not an official STFPM snapshot: expected {{'category', 'state_dict'}} "
                              "with ResNet18_MS3 keys (model.0.weight, model.4.0.conv1.weight, ...)")
    if teacher is None:
        raise CheckpointError(f"{path}: an official STFPM student needs its ImageNet teacher: pass "
                              "teacher='resnet18-f37072fd.pth' (torchvision) or a timm resnet18 file")
    base = config or get_config("stfpm")
    model = STFPM(base.with_img_size(checked_size(img_size, path)))
    load_converted(model.student, obj["state_dict"], official_student_keymap(model.cfg.layers), path)
    load_resnet18_teacher(model, teacher)
    return model.eval()

