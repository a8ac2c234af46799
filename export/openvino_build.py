"""OpenVINO IR (``openvino/model.xml`` + ``.bin``) from the verified fp32 ONNX graph.

The IR keeps fp32 weights (``save_model(compress_to_fp16=False)``). fp16-compressed weights halved the
file but bought no speed on CPU (the plugin decompresses them: 74.5 ms either way at 256 px, same run)
and cost accuracy once the runtime compiles a dynamic IR for batch 1 (issue 24; OpenVINO's static
compilation of compressed weights moved the map by 6.5e-5 instead of 1.5e-5 and a TLM map by 4e-2:
:mod:`stlm_deploy.backends.openvino`, "Static batch 1"); older engines with fp16 weights keep running
on the dynamic compilation they were gated on. The inference precision is a compile option, not a
property of the file, so one IR serves every precision:

* **f32** (required): parity-gated against PyTorch at the fp32 tolerance (a failure aborts the export,
  as for ``model.onnx``);
* **bf16 / fp16** (optional, where the CPU's OpenVINO reports BF16 / FP16): judged by the task gate
  against the fp32 graph on the gate images (:mod:`stlm_export.precision_gate`), not by the map
  tolerance; the first one that passes is recorded as the IR's ``inference_precision`` (the runtimes'
  default for this IR), else ``fp32``.

The gates run the IR through the runtime's :class:`stlm_deploy.backends.openvino.OpenVinoBackend` (which
owns the one map between our precision names and OpenVINO's), one image per call: the batch-1
compilation that single-image callers run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stlm_deploy.backends.openvino import OpenVinoBackend, choose_inference_precision
from stlm_deploy.spec import EngineSpec

from .gate import OPENVINO_GATE_CHUNK, Gate, ParityRecord, backend_outputs
from .precision_gate import GateImages, PrecisionOutcome, gate_openvino_precisions

__all__ = ["OpenVinoIR", "build_openvino", "build_gated_openvino", "cpu_capabilities", "preferred_precision"]


@dataclass
class OpenVinoIR:
    """Paths of the written IR (relative names are what stlm.json lists)."""

    xml: Path
    bin: Path
    weights_precision: str = "fp32"


def build_openvino(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, compress_to_fp16: bool = False) -> OpenVinoIR:
    """ONNX -> IR via ``openvino.convert_model`` + ``save_model`` (fp32 weights unless ``compress_to_fp16``)."""
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
    hint, _ = choose_inference_precision("bf16", capabilities)
    return "bf16" if hint == "bf16" else "fp32"


def build_gated_openvino(tmp: Path, batch: int | str, graph_inputs: np.ndarray | None, gate: Gate,
                         spec: EngineSpec, task: GateImages | None = None,
                         say: Callable[[str], None] = print) -> PrecisionOutcome | None:
    """``tmp/openvino`` from ``tmp/model.onnx``: parity-gated at f32, then bf16/fp16 task-gated (module docstring).

    ``graph_inputs`` None: not verified (the IR is listed for f32 inference). ``task`` None: no
    reduced-precision gate (the IR runs at f32 by default). Returns the reduced-precision outcome.
    """
    ir = build_openvino(tmp / "model.onnx", tmp / "openvino")
    caps = cpu_capabilities()
    outcome: PrecisionOutcome | None = None
    used = "fp32"
    if graph_inputs is not None:
        gate.require(_check_ir(ir, "fp32", graph_inputs, batch, gate, caps))
        if task is not None:
            outcome = gate_openvino_precisions(ir.xml, task, batch, caps, ir.weights_precision, say)
            used = next(iter(outcome.gated()), "fp32")
    spec.add_artifact(tmp, "openvino/model.xml", "openvino", ir.weights_precision, inference_precision=used)
    spec.add_artifact(tmp, "openvino/model.bin", "openvino", ir.weights_precision)
    return outcome


def _check_ir(ir: OpenVinoIR, prec: str, graph_inputs: np.ndarray, batch: int | str, gate: Gate,
              caps: list[str]) -> ParityRecord:
    """Parity-gate ``ir`` run at ``prec`` (f32); fp16-stored weights are held to the fp16 tolerance."""
    backend = OpenVinoBackend(ir.xml, precision=prec, artifact_precision=ir.weights_precision)
    got = backend_outputs(backend, graph_inputs, batch, OPENVINO_GATE_CHUNK)
    ran = backend.inference_precision or prec
    tol_class = "fp16" if ir.weights_precision == "fp16" or ran != "fp32" else "fp32"
    return gate.check("openvino/model.xml", "openvino-cpu", tol_class, got,
                      details={"inference_precision": ran, "weights": ir.weights_precision,
                               "requested_precision": prec, "cpu_capabilities": caps})
