"""The ONNX opsets the exporter writes: torch-free, so ``stlm-export --help`` and its flag checks run first."""
from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "check_opset"]

DEFAULT_OPSET = 17  # LayerNormalization needs 17; TensorRT 10, OpenVINO and ORT all read it
MIN_OPSET = 17
MAX_OPSET = 20  # the TorchScript exporter's newest opset (torch.onnx._constants)


def check_opset(opset: Any) -> int:
    """Validate ``--opset`` (17..20) with a one-line error naming the flag."""
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset: must be an integer from {MIN_OPSET} to {MAX_OPSET} (the TorchScript exporter's "
                         f"range; LayerNormalization needs 17), got {opset!r}")
    return opset
