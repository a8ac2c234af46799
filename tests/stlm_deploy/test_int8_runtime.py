"""INT8 artifacts in the runtime: Detector.load(precision="int8") on ONNX Runtime and OpenVINO."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("backend,artifact", [("ort", "model.int8.onnx"), ("openvino", "openvino/model.int8.xml")])
def test_detector_loads_int8(int8_engine, backend, artifact):
    from stlm_deploy import Detector
    from stlm_export.calib import calibration_images

    d, _ = int8_engine
    images = calibration_images(None, 128, 2).images
    with Detector.load(d, backend=backend, precision="int8", threads=1) as det:
        assert det.info()["precision"] == "int8" and det.artifact == d / artifact
        preds = det.predict(images)
    with Detector.load(d, backend=backend, precision="fp32" if backend == "ort" else None, threads=1) as ref:
        assert ref.artifact != d / artifact  # the fp32 IR / ONNX is still what plain loads pick
        ref_preds = ref.predict(images)
    for p, q in zip(preds, ref_preds):
        assert np.isfinite(p.anomaly_map).all() and np.abs(p.anomaly_map - q.anomaly_map).max() < 0.05


def test_int8_ir_runs_at_its_gated_float_precision(int8_engine):
    """The float remainder of the INT8 IR runs at the precision its gate passed at (recorded in stlm.json)."""
    from stlm_deploy.selection import Planner
    from stlm_deploy.spec import load_spec, resolve_engine

    d, _ = int8_engine
    spec = load_spec(d)
    recorded = spec.artifacts["openvino/model.int8.xml"].extra["inference_precision"]
    cand = Planner(d, spec, "int8").candidate("openvino")
    assert cand.artifact == "openvino/model.int8.xml" and cand.options["precision"] == recorded
    assert cand.verify == ["openvino/model.int8.xml", "openvino/model.int8.bin"]
    assert Planner(d, spec, None).candidate("openvino").artifact == "openvino/model.xml"
    assert resolve_engine(d / "openvino") == (d, d / "openvino" / "model.xml")  # not model.int8.xml
    assert resolve_engine(d / "openvino" / "model.int8.bin") == (d, d / "openvino" / "model.int8.xml")
