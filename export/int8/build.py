"""``stlm-export --int8``: quantise, gate and list the INT8 artifacts of one engine directory.

Runs after ``model.onnx`` (and the fp16/bf16 artifacts) passed their parity gates, inside the
export's temporary directory:

1. calibration images (good, never test) and the gate images, never the same (:mod:`stlm_export.int8.data`);
2. the fp32 graph's outputs on the gate images (ONNX Runtime, the reference; shared with the bf16/fp16 gates);
3. ``model.int8.onnx`` (ORT static Q/DQ, :mod:`stlm_export.int8.ort`), gated;
4. ``openvino/model.int8.xml`` (NNCF, :mod:`stlm_export.int8.openvino`): the same op-type ladder as
   the Q/DQ file, then (labelled data only) accuracy control as the last rung; each rung gated at
   bf16 for the float remainder where the CPU has it, else / on failure at f32 (the passing one is
   recorded as ``inference_precision``);
5. ``model.int8.plan`` (TensorRT explicit quantisation from the same Q/DQ file) where TensorRT runs.

An artifact is listed in ``stlm.json`` only if it passed (:mod:`stlm_export.task_gate`), with its
gate numbers and evidence under ``gate``; a failing one is deleted, its numbers stay in ``parity.json``. The
export then continues: the other artifacts are published either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stlm_deploy.spec import EngineSpec

from ..gate import OPENVINO_GATE_CHUNK, backend_outputs, ort_outputs
from ..calib import CalibSet, TileLayout, stitched
from .data import ValSet, gate_data
from ..precision_gate import int8_entries
from ..task_gate import INT8_TOLERANCE, Int8Record, Int8Tolerance, int8_compare
from ..onnx_export import save_onnx, set_metadata
from .ort import INT8_ONNX, ORT_INT8_LADDER, ORT_INT8_POLICY, QdqPolicy, quantize_qdq
from .openvino import DEFAULT_MAX_REVERTS, OV_INT8_XML, quantize_openvino

__all__ = ["Int8Outcome", "build_gated_int8", "int8_data"]


@dataclass
class Int8Outcome:
    """What the INT8 step produced (``parity.json``'s ``int8`` section)."""

    records: list[Int8Record] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.records) and all(r.passed for r in self.records)

    @property
    def failures(self) -> list[Int8Record]:
        return [r for r in self.records if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "data": dict(self.data), "artifacts": [r.to_dict() for r in self.records],
                **self.details}


def _walk_ladder(ladder: tuple[QdqPolicy, ...], attempt: Callable[[QdqPolicy], Int8Record], artifact: str,
                 say: Callable[[str], None]) -> list[Int8Record]:
    """Gate ``attempt(policy)`` down the ladder until one passes; every record, in order."""
    recs: list[Int8Record] = []
    for policy in ladder:
        recs.append(attempt(policy))
        if recs[-1].passed:
            break
        say(f"int8 gate {artifact} with {'+'.join(policy.op_types)}: " + "; ".join(recs[-1].failures))
    return recs


def _final(recs: list[Int8Record]) -> Int8Record:
    """The last record, carrying the ones before it as ``fallback_from`` (kept in parity.json)."""
    if len(recs) > 1:
        recs[-1].details["fallback_from"] = [r.to_dict() for r in recs[:-1]]
    return recs[-1]


def int8_data(calib_data: Any, val_data: Any, recorded: Any, s: int, resize: str,
              tiled: TileLayout | None = None) -> tuple[CalibSet, ValSet]:
    """Calibration and gate images at ``s`` px (tiled: the tiles of the images), disjoint (ValueError naming the
    flag when there are none)."""
    calib, val = gate_data(calib_data, val_data, recorded, s, resize, int8=True, tiled=tiled)
    assert calib is not None
    return calib, val


def build_gated_int8(tmp: Path, spec: EngineSpec, calib: CalibSet, val: ValSet, *, targets: tuple[str, ...],
                     metadata: dict[str, str], tolerance: Int8Tolerance | None = None, accuracy_control: bool = True,
                     max_reverts: int = DEFAULT_MAX_REVERTS, ort_rungs: int = len(ORT_INT8_LADDER),
                     trt_build: Callable[[], Any] | None = None, fp32: dict[str, np.ndarray] | None = None,
                     say: Callable[[str], None] = print) -> Int8Outcome:
    """Build, gate and list the INT8 artifacts in ``tmp`` (see the module docstring).

    ``ort_rungs``: how many policies of :data:`ORT_INT8_LADDER` to try (for the Q/DQ file and the IR alike).
    ``trt_build()`` (optional) builds the TensorRT INT8 plan from ``model.int8.onnx`` and returns
    (plan name, TensorRT backend); it is called only after the ORT Q/DQ file passed its gate.
    ``fp32``: model.onnx's outputs on ``val.images`` when the caller has them already (else computed here).
    """
    from stlm_deploy.backends.openvino import OpenVinoBackend

    from ..openvino_build import cpu_capabilities, preferred_precision

    tol = tolerance or INT8_TOLERANCE
    out = Int8Outcome(data={"calibration": {"source": calib.source, "n_images": len(calib), "images": calib.paths},
                            "validation": {"source": val.source, "n_images": len(val), "images": val.paths,
                                           "labelled": val.two_classes, "pixel_labels": val.masks is not None,
                                           "note": val.note, "evidence": val.evidence().to_dict(tol)}})
    say(f"int8: calibration {len(calib)} images from {calib.source}; validation {len(val)} images from "
        f"{val.source}{' (' + val.note + ')' if val.note else ''}")
    if fp32 is None:
        fp32 = ort_outputs(tmp / "model.onnx", val.images, spec.batch)
    threshold = spec.thresholds.image
    fp32_images = stitched(fp32, val.layout)  # a tiled engine is judged on stitched maps and scores

    def gate(artifact: str, backend: str, got: dict[str, np.ndarray], details: dict[str, Any]) -> Int8Record:
        return int8_compare(fp32_images, stitched(got, val.layout), val.labels, val.masks, threshold,
                            artifact=artifact, backend=backend, image_source=val.source, tolerance=tol,
                            details=details)

    def publish(rec: Int8Record, files: list[tuple[str, str]], **extra: Any) -> None:
        out.records.append(rec)
        say("int8 gate " + rec.line())
        if rec.passed:
            for i, (rel, kind) in enumerate(files):
                spec.add_artifact(tmp, rel, kind, "int8", **(dict(extra, gate=rec.summary()) if i == 0 else {}))
        else:
            for rel, _ in files:
                (tmp / rel).unlink(missing_ok=True)

    # ONNX Runtime static Q/DQ
    import onnx

    def qdq_rung(policy: QdqPolicy) -> Int8Record:
        summary = quantize_qdq(tmp / "model.onnx", tmp / INT8_ONNX, calib.images, policy)
        q = onnx.load(str(tmp / INT8_ONNX))
        set_metadata(q, metadata)
        save_onnx(q, tmp / INT8_ONNX)
        say(f"{INT8_ONNX}: {'+'.join(policy.op_types)} -> {summary['quantize_linear']} QuantizeLinear, int8 ops "
            + ", ".join(f"{k} {v}" for k, v in summary["quantized_by_op"].items()))
        return gate(INT8_ONNX, "onnxruntime-cpu", ort_outputs(tmp / INT8_ONNX, val.images, spec.batch),
                    {"qdq": summary})

    ladder = ORT_INT8_LADDER[:max(1, ort_rungs)]
    ort_rec = _final(_walk_ladder(ladder, qdq_rung, INT8_ONNX, say))
    publish(ort_rec, [(INT8_ONNX, "onnx")])

    if "openvino" in targets:
        caps = cpu_capabilities()

        def ov_rung(policy: QdqPolicy, control: bool) -> Int8Record:
            """Quantise with ``policy``, gate at the CPU's preferred precision, then at f32."""
            ov = quantize_openvino(tmp / "model.onnx", tmp / OV_INT8_XML, calib.images, val_images=val.images,
                                   fp32_val=fp32, labels=val.labels, masks=val.masks, threshold=threshold,
                                   tolerance=tol, accuracy_control=control, max_reverts=max_reverts, policy=policy,
                                   say=say, layout=val.layout, mask_list=val.mask_list)
            tried: list[Int8Record] = []
            for prec in dict.fromkeys([preferred_precision(caps), "fp32"]):
                backend = OpenVinoBackend(tmp / OV_INT8_XML, precision=prec, artifact_precision="int8")
                got = backend_outputs(backend, val.images, spec.batch, OPENVINO_GATE_CHUNK)
                ran = backend.inference_precision or prec
                tried.append(gate(OV_INT8_XML, "openvino-cpu", got, {"nncf": ov.to_dict(), "inference_precision": ran}))
                if tried[-1].passed:
                    break
            if len(tried) > 1:
                tried[-1].details["precision_fallback_from"] = tried[0].to_dict()
            return tried[-1]

        # the plain ladder first (seconds per rung), accuracy control last (minutes per revert)
        ov_rungs = _walk_ladder(ladder, lambda policy: ov_rung(policy, control=False), OV_INT8_XML, say)
        if not ov_rungs[-1].passed and accuracy_control and val.two_classes and max_reverts > 0:
            ov_rungs.append(ov_rung(ORT_INT8_POLICY, control=True))
        final = _final(ov_rungs)
        publish(final, [(OV_INT8_XML, "openvino"), (OV_INT8_XML[:-4] + ".bin", "openvino")],
                inference_precision=final.details["inference_precision"])

    if trt_build is not None and ort_rec.passed:
        plan, backend = trt_build()
        got = backend_outputs(backend, val.images, spec.batch)
        publish(gate(plan, "tensorrt", got, {}), [(plan, "tensorrt"), (plan + ".json", "json")])
    out.details["tolerance"] = tol.to_dict()
    out.details["threshold"] = threshold
    if spec.variants:  # an engine that already says why each variant is gated: the INT8 verdicts join it
        spec.set_variants({**{k: v.to_dict() for k, v in spec.variants.items()}, **int8_entries(out.records)})
    return out
