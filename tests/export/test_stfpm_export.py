"""STFPM through the same export pipeline and runtime: one fused graph (teacher + student), the same I/O
contract, ``model_family: "stfpm"``, fp16 through the same gate, and the runtime unchanged."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from stlm_export.pipeline import ExportError, ExportOptions, export_engine
from stlm_train import save_checkpoint
from tests.stlm_train.helpers import built_stfpm

THRESHOLDS = {"image": 5.0, "pixel": 4.0, "method": "held-out good (test fixture)", "n_images": 1}


@pytest.fixture(scope="module")
def stfpm_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "stfpm_bottle" / "model.ckpt"
    save_checkpoint(path, built_stfpm(img_size=64), thresholds=dict(THRESHOLDS))
    return path


@pytest.fixture(scope="module")
def stfpm_engine(tmp_path_factory, stfpm_ckpt):
    out = tmp_path_factory.mktemp("engines") / "stfpm_bottle"
    return export_engine(ExportOptions(ckpt=stfpm_ckpt, out=out, fp16=True, parity_images=4))


def test_one_fused_graph_with_the_contract_and_family(stfpm_engine):
    spec = stfpm_engine.spec
    assert spec["model_family"] == "stfpm" and spec["top_k"] == 1 and spec["img_size"] == 64
    assert spec["input"]["name"] == "image" and spec["input"]["dtype"] == "uint8"
    assert [o["name"] for o in spec["outputs"]] == ["anomaly_map", "score"]
    assert {r["artifact"]: r["pass"] for r in stfpm_engine.parity} == {
        "model.onnx": True, "model.fp16.onnx": True, "openvino/model.xml": True}
    assert max(r["max_abs_map"] for r in stfpm_engine.parity if r["precision"] == "fp32") <= 1e-4
    model = onnx.load(str(stfpm_engine.engine_dir / "model.onnx"))
    # both trunks are in the graph: two 7x7 stems (conv1 of teacher and student)
    stems = [i for i in model.graph.initializer if list(i.dims) == [64, 3, 7, 7]]
    assert len(stems) == 2
    assert {p.key: p.value for p in model.metadata_props}["stlm.model_family"] == "stfpm"


def test_runtime_serves_it_unchanged_and_matches_pytorch(stfpm_engine, stfpm_ckpt, small_images):
    from stlm_deploy import Detector
    from stlm_train import load_model

    model = load_model(stfpm_ckpt)
    images = small_images.images[:, :100, :90]  # another size: the runtime resizes in and out
    with Detector.load(stfpm_engine.engine_dir, backend="ort", precision="fp32") as det:
        preds = det.predict(list(images))
    ref = model.predict(torch.from_numpy(np.ascontiguousarray(images)))
    got_maps = np.stack([p.anomaly_map for p in preds])
    assert got_maps.shape == (len(images), 100, 90)
    assert np.abs(got_maps - ref.anomaly_map.numpy()).max() <= 1e-4 * max(1.0, float(ref.anomaly_map.max()))
    assert np.abs(np.array([p.score for p in preds]) - ref.score.numpy()).max() <= 1e-4 * max(1.0, float(ref.score.max()))
    assert all(p.is_anomalous == (p.score > THRESHOLDS["image"]) for p in preds)


def test_with_tlm_and_official_snapshots_are_refused_in_one_line(stfpm_ckpt, tmp_path):
    with pytest.raises(ExportError, match=r"--with-tlm: .* is a stfpm model, which has a single map"):
        export_engine(ExportOptions(ckpt=stfpm_ckpt, out=tmp_path / "e", with_tlm=True))
    from tests.stlm_train.helpers import full_resnet18, official_snapshot

    torch.save(official_snapshot(full_resnet18(2)), tmp_path / "best.pth.tar")
    with pytest.raises(ExportError, match=r"best\.pth\.tar: an official STFPM snapshot needs its ImageNet teacher"):
        export_engine(ExportOptions(ckpt=tmp_path / "best.pth.tar", out=tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_int8_with_accuracy_control_runs_on_an_stfpm_engine(stfpm_ckpt, sample_dir, tmp_path):
    """INT8 for the second family: the OpenVINO IR walks the op-type ladder, then NNCF accuracy control
    as the last rung (forced here by an impossible agreement), each rung gated and on record. (The crash
    seen on a trained STFPM model, NNCF dividing by an initial metric of 0, is pinned by
    test_int8.py::test_gate_margin_is_the_gate: the metric of the fp32 graph is 1.)"""
    from stlm_export.int8.gate import Int8Tolerance
    from stlm_export.int8.ort import ORT_INT8_LADDER

    res = export_engine(ExportOptions(ckpt=stfpm_ckpt, out=tmp_path / "stfpm_int8", int8=True, target="openvino",
                                      val_data=str(sample_dir), calib_data=str(sample_dir), parity_images=4,
                                      int8_tolerance=Int8Tolerance(min_agreement=1.01)))
    assert res.int8 is not None
    recs = [r for r in res.int8["artifacts"] if r["artifact"] == "openvino/model.int8.xml"]
    assert len(recs) == 1 and not recs[0]["pass"]
    final = recs[0]
    assert final["nncf"]["method"] == "quantize_with_accuracy_control"
    ladder = [r["nncf"] for r in final["fallback_from"]]
    assert [n["method"] for n in ladder] == ["quantize"] * len(ORT_INT8_LADDER)
    assert [n["op_types"] for n in ladder] == [list(p.op_types) for p in ORT_INT8_LADDER]
    assert not (tmp_path / "stfpm_int8" / "openvino" / "model.int8.xml").exists()
