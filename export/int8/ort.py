"""ONNX Runtime INT8: static Q/DQ quantisation of the verified fp32 graph (``model.int8.onnx``).

``quant_pre_process`` first (symbolic shape inference + ORT graph optimisation, the documented
prerequisite), then ``quantize_static`` in QDQ format, S8S8 (signed int8 activations and weights,
symmetric, the CPU's VNNI path) with per-channel weights, MinMax ranges from good calibration images.

Which ops are quantised is :data:`ORT_INT8_POLICY`, chosen by measured sensitivity
(:func:`op_type_sensitivity`, numbers in docs/int8.md): the compute ops (MatMul, Conv, Gemm) are
quantised; normalisations, softmax, elementwise residual adds/muls, the l2 normalisation and the
FA head stay float. Sensitivity is a property of the checkpoint, so the export walks
:data:`ORT_INT8_LADDER` (all compute ops -> matmuls only -> convolutions only) and publishes the first
rung that passes the gate. The same Q/DQ file is the input of explicit-quantisation TensorRT builds.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["QdqPolicy", "ORT_INT8_POLICY", "ORT_INT8_LADDER", "quantize_qdq", "op_type_sensitivity", "qdq_histogram", "INT8_ONNX"]

INT8_ONNX = "model.int8.onnx"


@dataclass(frozen=True)
class QdqPolicy:
    """What gets Q/DQ pairs: op types, minus nodes whose name starts with an excluded prefix."""

    op_types: tuple[str, ...] = ("MatMul", "Conv", "Gemm")
    exclude_prefixes: tuple[str, ...] = ("/fa_head/",)
    per_channel: bool = True
    reason: str = "measured: docs/int8.md"

    def to_dict(self) -> dict[str, Any]:
        return {"op_types": list(self.op_types), "exclude_prefixes": list(self.exclude_prefixes),
                "per_channel": self.per_channel, "activation": "int8 (symmetric)", "weights": "int8 (symmetric)",
                "format": "QDQ", "calibration": "MinMax", "reason": self.reason}


ORT_INT8_POLICY = QdqPolicy()
# What the export tries, in order, until one passes the INT8 gate: the measured sensitivity
# (docs/int8.md) is per checkpoint, so it is measured at export time too. Ordered fastest first;
# the first rung that passes is published and the numbers of the rungs above it stay in parity.json.
ORT_INT8_LADDER: tuple[QdqPolicy, ...] = (
    ORT_INT8_POLICY,
    QdqPolicy(op_types=("MatMul", "Gemm"), reason="fallback: convolutions float"),
    QdqPolicy(op_types=("Conv",), reason="fallback: attention/MLP matmuls float"),
)


class _Reader:
    """``CalibrationDataReader`` over uint8 NHWC images, one image per feed."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.name, self.images, self.i = input_name, images, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.images):
            return None
        x = np.ascontiguousarray(self.images[self.i:self.i + 1])
        self.i += 1
        return {self.name: x}

    def rewind(self) -> None:
        self.i = 0


def _excluded(model: Any, prefixes: Iterable[str]) -> list[str]:
    prefixes = tuple(prefixes)
    return [n.name for n in model.graph.node if prefixes and n.name.startswith(prefixes)]


def quantize_qdq(fp32_onnx: str | os.PathLike, out: str | os.PathLike, images: np.ndarray,
                 policy: QdqPolicy = ORT_INT8_POLICY, input_name: str = "image") -> dict[str, Any]:
    """Write the Q/DQ INT8 model to ``out``; returns a summary (quantised node counts, policy)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="stlm-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
        model = onnx.load(str(pre))
        excluded = _excluded(model, policy.exclude_prefixes)
        quantize_static(str(pre), str(out), _Reader(input_name, images), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(policy.op_types), per_channel=policy.per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    q = onnx.load(str(out))
    return {"policy": policy.to_dict(), "excluded_nodes": len(excluded), **qdq_histogram(q)}


def qdq_histogram(model: Any, op_types: Iterable[str] = ("MatMul", "Conv", "Gemm", "Add", "Mul", "Softmax",
                                                          "LayerNormalization")) -> dict[str, Any]:
    """Nodes of ``op_types`` that read a DequantizeLinear output (ORT runs them as int8 kernels), and Q/DQ counts."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    wanted = set(op_types)
    hist: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in wanted:
            continue
        if any(producers.get(i) == "DequantizeLinear" for i in n.input):
            hist[n.op_type] = hist.get(n.op_type, 0) + 1
    ops = [n.op_type for n in model.graph.node]
    return {"quantized_by_op": dict(sorted(hist.items())), "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear")}


def op_type_sensitivity(fp32_onnx: str | os.PathLike, calib: np.ndarray, val: np.ndarray,
                        measure: Callable[[Path], dict[str, float]],
                        candidates: Sequence[tuple[str, QdqPolicy]]) -> list[dict[str, Any]]:
    """Quantise with each candidate policy and ``measure`` the result (e.g. max|Δmap| vs fp32 on ``val``).

    ``measure`` takes the INT8 ONNX path and returns numbers; the rows keep the policy next to them,
    so docs/int8.md can show why a given op type stays float.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="stlm-int8-sens-") as tmp:
        for label, pol in candidates:
            path = Path(tmp) / f"{len(rows)}.onnx"
            summary = quantize_qdq(fp32_onnx, path, calib, pol)
            rows.append({"candidate": label, "policy": pol.to_dict(), **summary, **measure(path)})
            path.unlink()
    return rows
