"""stlm_train: the PyTorch side of STLM (and the STFPM family) — models, checkpoints, training, evaluation.

The names below are imported on first use, so ``stlm-train --help`` and the missing-extra message
work where torch is not installed (``pip install 'stlm-deploy[train]'`` brings it).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"CheckpointError": "checkpoint", "load_model": "checkpoint", "load_official_stlm": "checkpoint",
            "save_checkpoint": "checkpoint", "CONFIGS": "config", "STLMConfig": "config", "get_config": "config",
            "STLM": "modeling", "InferenceOutput": "modeling", "STFPM": "modeling", "STFPMConfig": "config",
            "load_official_stfpm": "checkpoint", "predict_tiled": "modeling"}

__all__ = ["STLM", "STLMConfig", "STFPM", "STFPMConfig", "load_official_stfpm", "InferenceOutput", "CONFIGS", "get_config", "load_model", "load_official_stlm",
           "save_checkpoint", "CheckpointError", "predict_tiled"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
