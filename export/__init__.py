"""stlm_export: STLM checkpoint -> fused, verified engines (ONNX fp32/fp16, OpenVINO IR, TensorRT plan).

Public API (the ``stlm-export`` CLI is a thin layer over :func:`export_engine`)::

    from stlm_export import ExportOptions, export_engine
    result = export_engine(ExportOptions(ckpt="runs/bottle/model.ckpt", fp16=True))
    result.engine_dir, result.parity, result.graph

Names are imported on first use, so the CLI can say which extra is missing before torch is
imported; heavy libraries (onnxruntime, openvino, tensorrt, polygraphy, onnxconverter_common)
are imported inside the functions that need them.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeployModel": "deploy_model",
    "export_onnx": "onnx_export", "graph_report": "onnx_export", "read_metadata": "onnx_export",
    "GraphReport": "onnx_export", "OnnxExport": "onnx_export", "DEFAULT_OPSET": "onnx_export",
    "convert_fp16": "precision", "fp32_nodes": "precision", "Fp16Result": "precision", "FP32_OP_TYPES": "precision",
    "compare": "gate", "reference_outputs": "gate", "ParityRecord": "gate", "Tolerance": "gate",
    "TOLERANCES": "gate",
    "builder_settings": "tensorrt_build", "build_engine": "tensorrt_build", "BuildSettings": "tensorrt_build",
    "calibration_images": "calib", "CalibSet": "calib",
    "export_engine": "pipeline", "ExportOptions": "pipeline", "ExportResult": "pipeline", "ExportError": "pipeline",
    "ParityGateError": "pipeline", "resolve_targets": "pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
