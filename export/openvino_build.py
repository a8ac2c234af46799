"""OpenVINO IR (``openvino/model.xml`` + ``.bin``) from the verified fp32 ONNX graph, and its gate runner.

The IR is written with ``save_model(compress_to_fp16=True)``: weights are stored as fp16 (half the
size) and decompressed by the CPU plugin, so the IR is gated with the fp16/bf16 tolerance. The
inference precision is a compile option, not a property of the file: bf16 where the CPU reports
``BF16`` in ``OPTIMIZATION_CAPABILITIES`` (AVX512-BF16/AMX), f32 otherwise; the precision the
compiled model actually uses is read back and recorded. If bf16 inference fails the gate but f32
inference passes, the IR is published with ``inference_precision: f32`` and the bf16 numbers are
kept in parity.json (the runtime can still be asked for bf16 explicitly).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OpenVinoIR", "build_openvino", "cpu_capabilities", "preferred_precision", "OpenVinoRunner"]

_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_FROM_OV = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}


@dataclass
class OpenVinoIR:
    """Paths of the written IR (relative names are what stlm.json lists)."""

    xml: Path
    bin: Path
    weights_precision: str = "fp16"


def build_openvino(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, compress_to_fp16: bool = True) -> OpenVinoIR:
    """ONNX -> IR via ``openvino.convert_model`` + ``save_model`` (fp16-compressed weights by default)."""
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    xml = out_dir / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    return OpenVinoIR(xml=xml, bin=xml.with_suffix(".bin"), weights_precision="fp16" if compress_to_fp16 else "fp32")


def cpu_capabilities(device: str = "CPU") -> list[str]:
    """``OPTIMIZATION_CAPABILITIES`` of ``device`` (e.g. ['BF16', 'FP32', 'INT8', ...])."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")]


def preferred_precision(capabilities: list[str]) -> str:
    """bf16 where the CPU has native BF16 support, fp32 otherwise (fp16 inference is not a CPU thing)."""
    return "bf16" if "BF16" in {c.upper() for c in capabilities} else "fp32"


class OpenVinoRunner:
    """Compiled IR on CPU with an explicit ``INFERENCE_PRECISION_HINT``; ``run(x) -> {name: array}``."""

    def __init__(self, xml: str | os.PathLike, precision: str, device: str = "CPU", threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(xml)), device, config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin really uses
        used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint).lower()
        self.precision = _FROM_OV.get(used, used)
        self.request = self.compiled.create_infer_request()

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.request.infer({0: x})
        return {port.get_any_name(): np.array(v) for port, v in res.items()}
