"""The INT8 gate: the names of the task gate (:mod:`stlm_export.task_gate`, which also judges bf16/fp16
variants) that INT8 quantisation, its build and the INT8 benchmarks use; the same objects, not copies."""
from __future__ import annotations

from ..task_gate import (INT8_TOLERANCE, Int8Record, Int8Tolerance, decision_threshold, gate_margin,  # noqa: F401
                         int8_compare)

__all__ = ["Int8Tolerance", "INT8_TOLERANCE", "Int8Record", "int8_compare", "decision_threshold", "gate_margin"]
