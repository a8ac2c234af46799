"""STLM or STFPM -> one fused, checked, simplified ONNX graph (``model.onnx``).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. Why not the dynamo
exporter (torch's default since 2.9): it needs ``onnxscript``, which is not a dependency of this
project (and not installed in the reference environment), while the TorchScript exporter ships with
torch, supports opset 17-20, names the dynamic batch axis (``dim_param "N"``) through
``dynamic_axes`` and folds constants (``do_constant_folding=True``). The traced graph is then
simplified with onnxslim (onnxsim as a fallback) and the simplified graph is kept only when a parity
probe still passes on it; otherwise the plain exporter output is kept and the reason recorded.
"""
from __future__ import annotations

import collections
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import onnx
import torch

from stlm_train import STLM
from stlm_train.modeling import STFPM

from .deploy_model import DeployModel
from .opset import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, check_opset

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "GraphReport", "OnnxExport", "check_opset", "trace_onnx",
           "simplify_onnx", "graph_report", "set_metadata", "read_metadata", "save_onnx", "export_onnx",
           "torch_param_count", "METADATA_SPEC_KEY"]

METADATA_SPEC_KEY = "stlm.json"

# Probe: model -> (passed, one-line detail); decides whether the simplified graph is kept.
Probe = Callable[[onnx.ModelProto], "tuple[bool, str]"]


@dataclass
class GraphReport:
    """What the exported graph contains: sizes to compare with the PyTorch model and across exports."""

    nodes: int
    params: int  # elements of floating-point initializers (weights, folded BN, constant tables)
    initializers: int
    op_histogram: dict[str, int] = field(default_factory=dict)
    opset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "params": self.params, "initializers": self.initializers,
                "opset": self.opset, "op_histogram": dict(self.op_histogram)}

    def line(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in list(self.op_histogram.items())[:8])
        return f"{self.nodes} nodes, {self.params:,} parameters in {self.initializers} initializers; ops: {top}, ..."


@dataclass
class OnnxExport:
    """The fp32 graph in memory plus how it was made (the caller adds metadata and saves it)."""

    model: onnx.ModelProto
    report: GraphReport
    raw_report: GraphReport
    simplified: bool
    simplifier: str | None
    notes: list[str] = field(default_factory=list)


def torch_param_count(stlm: STLM | STFPM) -> int:
    """Parameters of the deployed model, every one of which reaches the map (STLM: the students, decoder and
    FA head; STFPM: teacher and student)."""
    return sum(p.numel() for p in stlm.parameters())


def _float_types() -> set[int]:
    tp = onnx.TensorProto
    return {tp.FLOAT, tp.FLOAT16, tp.BFLOAT16, tp.DOUBLE}


def graph_report(model: onnx.ModelProto) -> GraphReport:
    """Node count, op histogram (most frequent first) and floating-point parameter count."""
    hist = collections.Counter(n.op_type for n in model.graph.node)
    params = 0
    floats = _float_types()
    for init in model.graph.initializer:
        if init.data_type in floats:
            n = 1
            for d in init.dims:
                n *= int(d)
            params += n
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return GraphReport(nodes=len(model.graph.node), params=params, initializers=len(model.graph.initializer),
                       op_histogram=dict(hist.most_common()), opset=opset)


def _set_dims(value_info: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    """Overwrite a graph input/output shape (the exporter invents names for the static dims)."""
    shape = value_info.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def _fix_io_shapes(model: onnx.ModelProto, deploy: DeployModel, batch: int | str) -> None:
    n: int | str = "N" if batch == "dynamic" else int(batch)
    s = deploy.img_size
    _set_dims(model.graph.input[0], [n, s, s, 3] if deploy.fuse_pre else [n, 3, s, s])
    for out in model.graph.output:
        _set_dims(out, [n] if out.name == "score" else [n, s, s])


def trace_onnx(deploy: DeployModel, opset: int = DEFAULT_OPSET, batch: int | str = "dynamic") -> onnx.ModelProto:
    """Trace ``deploy`` with the TorchScript exporter (``dynamo=False``, constants folded)."""
    check_opset(opset)
    trace_batch = 2 if batch == "dynamic" else int(batch)  # 2, not 1: a batch of 1 can get specialised away
    example = deploy.example_input(trace_batch)
    names = list(deploy.output_names)
    dynamic_axes = None
    if batch == "dynamic":
        dynamic_axes = {deploy.input_name: {0: "N"}, **{o: {0: "N"} for o in names}}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-derived Python ints are expected
        torch.onnx.export(deploy, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[deploy.input_name], output_names=names, dynamic_axes=dynamic_axes,
                          do_constant_folding=True, export_params=True)
    model = onnx.load_from_string(buf.getvalue())
    _fix_io_shapes(model, deploy, batch)
    return model


def simplify_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None, str]:
    """Simplify with onnxslim, else onnxsim: (model or None, tool name, note)."""
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
    if onnxslim is not None:
        try:
            return onnxslim.slim(model), "onnxslim", "simplified with onnxslim"
        except Exception as e:  # noqa: BLE001 - a simplifier bug must not break the export
            note = f"onnxslim failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    else:
        note = "onnxslim not installed"
    try:
        import onnxsim
    except ImportError:
        return None, None, note + "; onnxsim not installed: graph not simplified"
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as e:  # noqa: BLE001
        return None, None, note + f"; onnxsim failed ({type(e).__name__})"
    return (simplified, "onnxsim", note + "; simplified with onnxsim") if ok else \
        (None, None, note + "; onnxsim could not validate its result")


def set_metadata(model: onnx.ModelProto, props: Mapping[str, Any]) -> None:
    """Replace ``metadata_props`` with ``props`` (non-strings are stored as JSON)."""
    model.ClearField("metadata_props")
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key = str(k)
        entry.value = v if isinstance(v, str) else json.dumps(v)


def read_metadata(model: onnx.ModelProto | str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` as a dict (accepts a path; weights are not loaded)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Save as one self-contained file and run the full checker on what was written."""
    path = Path(path)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_onnx(stlm: STLM | STFPM, *, opset: int = DEFAULT_OPSET, batch: int | str = "dynamic", fuse_pre: bool = True,
                with_tlm: bool = False, simplify: bool = True, probe: Probe | None = None,
                window_layout: bool = False) -> OnnxExport:
    """Trace, check and (parity-probed) simplify the fused graph; returns it in memory.

    ``window_layout=True`` traces the students in the carried window layout (:mod:`.window_layout`; a
    measured alternative, slower here).
    ``probe(model)`` is run on the simplified graph; the simplified graph is kept only if it
    passes (without a probe it is kept when ONNX's full checker accepts it).
    """
    deploy = DeployModel(stlm, fuse_pre=fuse_pre, with_tlm=with_tlm, window_layout=window_layout)
    raw = trace_onnx(deploy, opset=opset, batch=batch)
    onnx.checker.check_model(raw, full_check=True)
    raw_report = graph_report(raw)
    notes: list[str] = []
    if not simplify:
        return OnnxExport(raw, raw_report, raw_report, False, None, ["simplification disabled"])
    slim, tool, note = simplify_onnx(raw)
    notes.append(note)
    if slim is not None:
        try:
            _fix_io_shapes(slim, deploy, batch)
            onnx.checker.check_model(slim, full_check=True)
        except Exception as e:  # noqa: BLE001
            notes.append(f"simplified graph rejected by onnx.checker ({type(e).__name__}); kept the exporter's graph")
            slim = None
    if slim is not None and probe is not None:
        ok, detail = probe(slim)
        if not ok:
            notes.append(f"simplified graph failed the parity probe ({detail}); kept the exporter's graph")
            slim = None
        else:
            notes.append(f"parity probe on the simplified graph: {detail}")
    if slim is None:
        return OnnxExport(raw, raw_report, raw_report, False, None, notes)
    return OnnxExport(slim, graph_report(slim), raw_report, True, tool, notes)
