"""stlm_export: STLM checkpoint -> fused, verified engines (ONNX fp32/fp16, OpenVINO IR, TensorRT plan).

Public API (the ``stlm-export`` CLI is a thin layer over :func:`export_engine`)::

    from stlm_export import ExportOptions, export_engine
    result = export_engine(ExportOptions(ckpt="runs/bottle/model.ckpt", fp16=True))
    result.engine_dir, result.parity, result.graph

Heavy libraries (onnxruntime, openvino, tensorrt, polygraphy, onnxconverter_common) are imported
inside the functions that need them.
"""
from __future__ import annotations

from .calib import CalibSet, calibration_images
from .deploy_model import DeployModel
from .onnx_export import DEFAULT_OPSET, GraphReport, OnnxExport, export_onnx, graph_report, read_metadata
from .pipeline import ExportError, ExportOptions, ExportResult, ParityGateError, export_engine, resolve_targets
from .precision import FP32_OP_TYPES, Fp16Result, convert_fp16, fp32_nodes
from .tensorrt_build import BuildSettings, build_engine, builder_settings
from .verify import TOLERANCES, ParityRecord, Tolerance, compare, reference_outputs

__all__ = [
    "DeployModel", "export_onnx", "graph_report", "read_metadata", "GraphReport", "OnnxExport", "DEFAULT_OPSET",
    "convert_fp16", "fp32_nodes", "Fp16Result", "FP32_OP_TYPES",
    "compare", "reference_outputs", "ParityRecord", "Tolerance", "TOLERANCES",
    "builder_settings", "build_engine", "BuildSettings",
    "calibration_images", "CalibSet",
    "export_engine", "ExportOptions", "ExportResult", "ExportError", "ParityGateError", "resolve_targets",
]
