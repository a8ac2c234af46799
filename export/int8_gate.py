"""The INT8 accuracy gate's first home: the gate now judges bf16/fp16 variants too (:mod:`stlm_export.task_gate`).

Kept so that ``from stlm_export.int8_gate import Int8Tolerance, int8_compare, ...`` (benchmarks, scripts)
keeps working; the names are the task gate's own objects, not copies.
"""
from __future__ import annotations

from .task_gate import (INT8_TOLERANCE, Int8Record, Int8Tolerance, decision_threshold, gate_margin,  # noqa: F401
                        int8_compare)

__all__ = ["Int8Tolerance", "INT8_TOLERANCE", "Int8Record", "int8_compare", "decision_threshold", "gate_margin"]
