"""OpenVINO INT8 IR through NNCF (``openvino/model.int8.xml`` + ``.bin``).

The fp32 IR converted from the verified ``model.onnx`` (uncompressed weights: NNCF wants the
original precision) is quantised with ``nncf.quantize(model_type=TRANSFORMER)`` on good
calibration images, for the op types of one :class:`~stlm_export.int8.ort.QdqPolicy` (the
export walks the same ladder as for ONNX Runtime: all compute ops, then convolutions float, then
matmuls float). ``accuracy_control`` runs ``nncf.quantize_with_accuracy_control`` instead, driven
by :func:`stlm_export.int8.gate.gate_margin` (image/pixel AUROC drop and decision agreement against
the fp32 graph, the gate itself), so NNCF reverts the most damaging quantisers to float until the
gate would pass or ``max_reverts`` is spent; the export uses it as the last rung, because it costs
minutes per revert and, measured on a 12-minute checkpoint, ended further from fp32 than the plain
ladder's passing rung (docs/int8.md). The FA head stays float (as in the ORT policy). Which ops were
quantised is read back from the IR (FakeQuantize layers) and recorded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from stlm_deploy.tiling import gate_maps

from ..calib import TileLayout, combine
from .gate import INT8_TOLERANCE, Int8Tolerance, gate_margin
from .ort import ORT_INT8_POLICY, QdqPolicy

__all__ = ["OvInt8", "quantize_openvino", "validation_fn", "ov_ignored_types", "OV_INT8_XML", "OV_IGNORED_PATTERNS",
           "DEFAULT_MAX_REVERTS"]

OV_INT8_XML = "openvino/model.int8.xml"
OV_IGNORED_PATTERNS = (".*/fa_head/.*",)
DEFAULT_MAX_REVERTS = 8
# ONNX op type of a QdqPolicy -> the OpenVINO op types it becomes after convert_model (Gemm -> MatMul)
_OV_TYPES = {"MatMul": ("MatMul",), "Gemm": ("MatMul",), "Conv": ("Convolution", "GroupConvolution")}


def ov_ignored_types(policy: QdqPolicy) -> list[str]:
    """The OpenVINO op types NNCF must leave float so that only ``policy.op_types`` are quantised."""
    keep = {t for op in policy.op_types for t in _OV_TYPES.get(op, ())}
    return sorted({t for ts in _OV_TYPES.values() for t in ts} - keep)


@dataclass
class OvInt8:
    xml: Path
    bin: Path
    method: str  # "quantize" | "quantize_with_accuracy_control"
    fake_quantize: int = 0
    notes: list[str] = field(default_factory=list)
    policy: QdqPolicy = ORT_INT8_POLICY

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "fake_quantize_layers": self.fake_quantize, "model_type": "TRANSFORMER",
                "op_types": list(self.policy.op_types), "ignored_types": ov_ignored_types(self.policy),
                "ignored_patterns": list(OV_IGNORED_PATTERNS), "reason": self.policy.reason,
                "notes": list(self.notes)}


def _outputs(compiled: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run an ov.CompiledModel one image at a time (NNCF hands us compiled models)."""
    req = compiled.create_infer_request()
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(len(images)):
        res = req.infer({0: np.ascontiguousarray(images[i:i + 1])})
        for port in compiled.outputs:
            outs.setdefault(port.get_any_name(), []).append(np.array(res[port], copy=True))
    return {k: np.concatenate(v) for k, v in outs.items()}


def validation_fn(val_images: np.ndarray, fp32_val: Mapping[str, np.ndarray], labels: np.ndarray,
                  masks: np.ndarray | None, threshold: float | None, tolerance: Int8Tolerance,
                  layout: TileLayout | None = None, mask_list: list[np.ndarray] | None = None,
                  ) -> tuple[list[tuple[np.ndarray, int]], Callable[[Any, Any], tuple[float, list[list[np.ndarray]]]]]:
    """NNCF accuracy control's validation items (one per image: its input, or a tiled engine's tiles) and metric:
    :func:`gate_margin` of the compiled model against ``fp32_val`` on the items given, per image (stitched maps
    and scores for a tiled engine), plus each item's outputs for NNCF's ranking."""
    rows = (lambda idx: np.asarray(idx, np.int64)) if layout is None else layout.tile_index
    items = [(np.ascontiguousarray(val_images[rows([i])]), i) for i in range(len(labels))]

    def validate(compiled: Any, data: Any) -> tuple[float, list[list[np.ndarray]]]:
        data = list(data)
        idx = [i for _, i in data]
        got = _outputs(compiled, np.concatenate([x for x, _ in data]))
        ref = {k: np.asarray(v)[rows(idx)] for k, v in fp32_val.items() if k in got}
        if layout is None:
            m = None if masks is None else masks[np.asarray(idx)]
            per_item = [[got["anomaly_map"][j], got["score"][j:j + 1]] for j in range(len(idx))]
        else:  # per image: stitched maps and scores on both sides
            lay = layout.take(idx)
            res = lay.results(got)
            got, ref = combine(res), lay.stitch(ref)
            m = None if mask_list is None else gate_maps([mask_list[i] for i in idx])
            per_item = [[r.maps["anomaly_map"], np.asarray([r.score])] for r in res]
        return gate_margin(ref, got, labels[np.asarray(idx)], m, threshold, tolerance), per_item

    return items, validate


def quantize_openvino(fp32_onnx: str | os.PathLike, out_xml: str | os.PathLike, calib: np.ndarray, *,
                      val_images: np.ndarray | None = None, fp32_val: Mapping[str, np.ndarray] | None = None,
                      labels: np.ndarray | None = None, masks: np.ndarray | None = None,
                      threshold: float | None = None, tolerance: Int8Tolerance = INT8_TOLERANCE,
                      accuracy_control: bool = True, max_reverts: int = DEFAULT_MAX_REVERTS,
                      policy: QdqPolicy = ORT_INT8_POLICY, say: Callable[[str], None] = lambda _m: None,
                      layout: TileLayout | None = None, mask_list: list[np.ndarray] | None = None) -> OvInt8:
    """Quantise the ``policy.op_types`` of ``fp32_onnx`` and save the INT8 IR at ``out_xml``.

    Accuracy control runs when ``accuracy_control`` and the validation images have both classes
    (``labels``); ``fp32_val`` are the fp32 graph's outputs on ``val_images`` (the reference). A tiled engine
    (``layout``): ``val_images`` are the tiles of the validation images, each validation item is one image's
    tiles, and the metric is the gate on stitched maps and scores (``mask_list``: each image's mask).
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    nncf.set_log_level(logging.ERROR)  # its INFO lines and progress bars would bury the export's own log
    model = ov.convert_model(str(fp32_onnx))
    calib_ds = nncf.Dataset([np.ascontiguousarray(calib[i:i + 1]) for i in range(len(calib))])
    ignored = nncf.IgnoredScope(patterns=list(OV_IGNORED_PATTERNS), types=ov_ignored_types(policy), validate=False)
    two_classes = labels is not None and 0 < int(np.sum(labels)) < len(labels)
    notes: list[str] = []
    if accuracy_control and two_classes and val_images is not None and fp32_val is not None and max_reverts > 0:
        items, validate = validation_fn(val_images, fp32_val, labels, masks, threshold, tolerance, layout, mask_list)
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the CLI's result line
            q = nncf.quantize_with_accuracy_control(
                model, calib_ds, nncf.Dataset(items, lambda item: item[0]), validate,
                max_drop=tolerance.auroc_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
                model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=max_reverts, ranking_subset_size=min(len(items), 8), num_ranking_workers=1))
        method = "quantize_with_accuracy_control"
    else:
        if accuracy_control and not two_classes:
            notes.append("accuracy control needs labelled validation images of both classes: plain nncf.quantize")
        with contextlib.redirect_stdout(sys.stderr):
            q = nncf.quantize(model, calib_ds, subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=ignored)
        method = "quantize"
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    fq = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
    say(f"{out_xml.name}: nncf {nncf.__version__} {method} of {'+'.join(policy.op_types)}, {fq} FakeQuantize layers")
    return OvInt8(out_xml, out_xml.with_suffix(".bin"), method, fq, notes, policy)
