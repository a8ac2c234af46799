"""bf16 / fp16 inference of the OpenVINO IR, gated like INT8 by task metrics; and why each variant counts.

The parity gate (``gate.py``) holds every artifact to PyTorch within a map tolerance (fp32 1e-4,
fp16/bf16 5e-3). That is right for fp32, and wrong as the only test of bf16: at 1024 px OpenVINO bf16
moves the map by about 2e-2 while keeping every decision, so it was never the default although it runs
2x faster. So the IR's reduced inference precisions are judged the way INT8 is
(:mod:`stlm_export.task_gate`): against the fp32 graph on the export's gate images, image and pixel
AUROC within 0.01, decisions agreeing on >= 98 %, max |Δmap| recorded but not decisive, and the
evidence (images, good/defective) recorded with a warning when it is too thin to resolve the limits.

fp16 inference is tried only where the export CPU's OpenVINO reports ``FP16`` (AVX512-FP16 / AMX-FP16);
bf16 only where it reports ``BF16``; otherwise the reason is recorded and the variant is not gated.

:func:`variant_summary` turns every gate of one export into stlm.json's ``variants`` object: for each
variant the runtimes can select (``ort/fp32``, ``openvino/bf16``, ...), its artifact, whether it is
gated and one line saying why. The runtimes' ``backend="auto"`` runs only gated variants
(docs/engine_format.md, "Default backend and precision").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .calib import stitched
from .gate import OPENVINO_GATE_CHUNK, ParityRecord, backend_outputs
from .int8.data import ValSet
from .task_gate import TASK_TOLERANCE, TaskRecord, TaskTolerance, task_compare

__all__ = ["FLOAT_PRECISIONS", "GateImages", "PrecisionOutcome", "gate_openvino_precisions", "variant_summary",
           "int8_entries", "IR_XML", "INT8_LABELS"]

#: Reduced inference precisions of the IR, in the order tried (and preferred for ``inference_precision``).
FLOAT_PRECISIONS = ("bf16", "fp16")
IR_XML = "openvino/model.xml"
#: The INT8 artifacts that are CPU variants, by file.
INT8_LABELS = {"model.int8.onnx": "ort/int8", "openvino/model.int8.xml": "openvino/int8"}


@dataclass
class GateImages:
    """What every task gate of one export judges on: the gate images and the fp32 graph's outputs on them."""

    val: ValSet
    fp32: dict[str, np.ndarray]  # the fp32 graph's outputs on ``graph_inputs`` (a tiled engine: per tile)
    threshold: float | None
    tolerance: TaskTolerance = TASK_TOLERANCE
    inputs: np.ndarray | None = None  # what the graph takes (None: ``val.images``; normalised for --no-fuse-pre)

    @property
    def graph_inputs(self) -> np.ndarray:
        return self.val.images if self.inputs is None else self.inputs

    @cached_property
    def fp32_images(self) -> Mapping[str, np.ndarray]:
        """fp32 outputs per image (stitched for a tiled engine): what the gates judge."""
        return stitched(self.fp32, self.val.layout)

    def compare(self, got: Mapping[str, np.ndarray], *, artifact: str, backend: str, precision: str,
                details: dict[str, Any] | None = None) -> TaskRecord:
        """The task gate of ``got`` (graph outputs on ``graph_inputs``) against fp32, per image."""
        return task_compare(self.fp32_images, stitched(got, self.val.layout), self.val.labels, self.val.masks,
                            self.threshold, artifact=artifact, backend=backend, image_source=self.val.source,
                            tolerance=self.tolerance, details=details, precision=precision)

    def data(self) -> dict[str, Any]:
        """parity.json's description of the gate images and their evidence."""
        v = self.val
        return {"source": v.source, "n_images": len(v), "images": v.paths, "labelled": v.two_classes,
                "pixel_labels": v.masks is not None, "note": v.note, "evidence": v.evidence().to_dict(self.tolerance)}


@dataclass
class PrecisionOutcome:
    """The IR's reduced-precision gates: records of those tried, reasons for those not tried."""

    records: list[TaskRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why it was not tried

    def record(self, precision: str) -> TaskRecord | None:
        return next((r for r in self.records if r.precision == precision), None)

    def gated(self) -> list[str]:
        """Precisions that passed, in :data:`FLOAT_PRECISIONS` order."""
        return [p for p in FLOAT_PRECISIONS if (r := self.record(p)) is not None and r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"artifacts": [r.to_dict() for r in self.records], "skipped": dict(self.skipped)}


def gate_openvino_precisions(xml: Path, images: GateImages, batch: int | str, capabilities: list[str],
                             weights: str, say: Callable[[str], None]) -> PrecisionOutcome:
    """Run the IR at each of :data:`FLOAT_PRECISIONS` the CPU supports and task-gate it against fp32."""
    from stlm_deploy.backends.openvino import OpenVinoBackend, choose_inference_precision

    out = PrecisionOutcome()
    for prec in FLOAT_PRECISIONS:
        hint, _ = choose_inference_precision(prec, capabilities)
        if hint == "f32":
            out.skipped[prec] = (f"not tried: the export CPU's OpenVINO reports no {prec.upper()} "
                                 f"(OPTIMIZATION_CAPABILITIES: {', '.join(capabilities) or 'none'})")
            say(f"precision gate {IR_XML} [{prec}]: {out.skipped[prec]}")
            continue
        backend = OpenVinoBackend(xml, precision=prec, artifact_precision=weights)
        got = backend_outputs(backend, images.graph_inputs, batch, OPENVINO_GATE_CHUNK)
        ran = backend.inference_precision or prec
        if ran != prec:
            out.skipped[prec] = f"not tried: OpenVINO compiled the IR at {ran} when asked for {prec}"
            say(f"precision gate {IR_XML} [{prec}]: {out.skipped[prec]}")
            continue
        rec = images.compare(got, artifact=IR_XML, backend="openvino-cpu", precision=prec,
                             details={"inference_precision": ran, "weights": weights})
        out.records.append(rec)
        say("precision gate " + rec.line())
    return out


# ---------------------------------------------------------------------------------- stlm.json "variants"
def _parity_why(rec: ParityRecord) -> str:
    verdict = "passed" if rec.passed else "failed"
    return (f"parity gate vs PyTorch {verdict}: max|Δmap| {rec.max_abs_map:.2e} (tol {rec.tolerance.map:g}) "
            f"on {rec.n_images} images")


def _task_why(rec: TaskRecord) -> str:
    m = rec.metrics
    drops = ", ".join(f"{k.split('_')[0]} AUROC drop {m[k]:.4f}" for k in ("image_auroc_drop", "pixel_auroc_drop")
                      if m[k] is not None) or "AUROC not judged"
    head = "task gate vs fp32 passed" if rec.passed else "task gate vs fp32 failed (" + "; ".join(rec.failures) + ")"
    ev = rec.evidence.line(rec.tolerance) if rec.evidence is not None else f"{rec.n_images} images"
    return (f"{head}: {drops}, decisions agree {m['agreement']:.1%}, max|Δmap| "
            f"{m['max_abs_map'] if m['max_abs_map'] is None else format(m['max_abs_map'], '.2e')} (recorded, not "
            f"decisive) on {ev}")


def _task_entry(artifact: str, rec: TaskRecord) -> dict[str, Any]:
    return {"artifact": artifact, "gated": rec.passed, "gate": "task", "why": _task_why(rec),
            "evidence": rec.evidence.to_dict(rec.tolerance) if rec.evidence is not None else None}


def variant_summary(parity: list[ParityRecord], precision: PrecisionOutcome | None, int8: Any | None,
                    *, verified: bool, built: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """stlm.json ``variants``: for every selectable variant, its artifact, ``gated`` and why (module docstring).

    ``built``: which artifacts this export wrote (``model.fp16.onnx``, ``openvino/model.xml``, ``int8``).
    ``int8``: the :class:`stlm_export.int8.build.Int8Outcome` or None when ``--int8`` was not asked for.
    """
    by_art = {r.artifact: r for r in parity}
    out: dict[str, dict[str, Any]] = {}

    def parity_entry(label: str, artifact: str) -> None:
        rec = by_art.get(artifact)
        if rec is not None:
            out[label] = {"artifact": artifact, "gated": rec.passed, "gate": "parity", "why": _parity_why(rec)}
        elif not verified:
            fp32 = label.endswith("/fp32")
            out[label] = {"artifact": artifact, "gated": fp32, "gate": "none",
                          "why": "not verified (--no-verify)" + ("; fp32 is the reference precision" if fp32 else "")}

    parity_entry("ort/fp32", "model.onnx")
    if built.get("model.fp16.onnx"):
        parity_entry("ort/fp16", "model.fp16.onnx")
    else:
        out["ort/fp16"] = {"artifact": "model.fp16.onnx", "gated": False, "gate": "none",
                           "why": "not built (export with --fp16)"}
    if built.get(IR_XML):
        parity_entry("openvino/fp32", IR_XML)
        for prec in FLOAT_PRECISIONS:
            label = f"openvino/{prec}"
            rec = precision.record(prec) if precision is not None else None
            if rec is not None:
                out[label] = _task_entry(IR_XML, rec)
            else:
                why = (precision.skipped.get(prec) if precision is not None else None) or "not verified (--no-verify)"
                out[label] = {"artifact": IR_XML, "gated": False, "gate": "none", "why": why}
    if int8 is None:
        for art, label in INT8_LABELS.items():
            out[label] = {"artifact": art, "gated": False, "gate": "none", "why": "not built (export with --int8)"}
    else:
        out.update(int8_entries(int8.records))
    return out


def int8_entries(records: list[TaskRecord]) -> dict[str, dict[str, Any]]:
    """``variants`` entries of the INT8 gate's final records (the TensorRT INT8 plan is not a CPU variant)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        label = INT8_LABELS.get(rec.artifact)
        if label is not None:
            out[label] = _task_entry(rec.artifact, rec)
            if not rec.passed:
                out[label]["why"] += "; not published"
    return out
