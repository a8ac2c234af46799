"""Checkpoints: the project's own format (either model family) and the official STLM / SAM / MobileSAM /
STFPM / ResNet-18 files.

* ``files.py``: read once (``torch.load(weights_only=True)``, sha256 of the bytes loaded), the kind told in one
  place (:data:`KINDS`), :class:`CheckpointError`;
* ``keymaps.py``: foreign layouts -> our modules as data (:class:`KeyMap`), strict loading;
* ``stlm.py`` / ``stfpm.py``: the official files of each family and their teachers;
* ``load.py``: any model file -> a model in eval mode (:func:`load_model`);
* ``record.py``: the one typed :class:`Checkpoint` record every reader downstream of training uses
  (:func:`read_checkpoint`), and :func:`save_checkpoint`, which training writes it with.
"""
from __future__ import annotations

from .files import (FORMAT, FORMAT_VERSION, KINDS, CheckpointError, detect_kind, is_official_stfpm, read_file,
                    read_file_and_sha256)
from .keymaps import (MOBILE_SAM_STUDENT_KEYMAP, MOBILE_SAM_TEACHER_KEYMAP, OFFICIAL_STLM_KEYMAP, SAM_TEACHER_KEYMAP,
                      KeyMap, flatten_official, load_converted, official_student_keymap, resnet_keymap)
from .load import checkpoint_tiling, load_model, model_from_checkpoint
from .record import Checkpoint, TrainSplit, read_checkpoint, save_checkpoint
from .stfpm import load_official_stfpm, load_resnet18_teacher
from .stlm import (init_students_from_mobile_sam, load_mobile_sam_teacher, load_official_stlm, load_sam_teacher,
                   load_teacher, official_state_dict)

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "CheckpointError", "detect_kind", "is_official_stfpm", "read_file",
           "read_file_and_sha256", "KeyMap", "OFFICIAL_STLM_KEYMAP", "SAM_TEACHER_KEYMAP", "MOBILE_SAM_TEACHER_KEYMAP",
           "MOBILE_SAM_STUDENT_KEYMAP", "flatten_official", "load_converted", "resnet_keymap",
           "official_student_keymap", "checkpoint_tiling", "load_model", "model_from_checkpoint", "Checkpoint",
           "TrainSplit", "read_checkpoint", "save_checkpoint", "load_official_stfpm", "load_resnet18_teacher",
           "load_official_stlm", "official_state_dict", "load_sam_teacher", "load_mobile_sam_teacher", "load_teacher",
           "init_students_from_mobile_sam"]
