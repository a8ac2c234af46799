"""Export of a tiled checkpoint: stlm.json format_version 2 with the tiling, a per-tile graph gated on stitched maps
and scores, INT8 calibrated on tiles and judged per image, and every runtime matching PyTorch's tiled prediction."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stlm_deploy import Detector
from stlm_deploy.preprocess import resize_map
from stlm_deploy.spec import load_spec
from stlm_deploy.tiling import Tiling
from stlm_export.calib import TileLayout, calibration_images
from stlm_export.gate import Gate, Tolerance

TILE, WORK = 128, 256  # tests/conftest.py tiled_ckpt / tiled_engine


def test_tiled_export_writes_version_2_and_gates_per_image(tiled_engine):
    spec = tiled_engine.spec
    assert spec["format_version"] == 2
    assert {k: spec["preprocessing"][k] for k in ("work_size", "tile_overlap", "tile_blend")} == \
        {"work_size": WORK, "tile_overlap": 0.25, "tile_blend": "mean"}
    parity = json.loads((tiled_engine.engine_dir / "parity.json").read_text())
    n_tiles = parity["tiling"]["n_tiles"]
    assert parity["n_images"] == 2 and n_tiles > 2 and parity["tiling"]["work_size"] == WORK
    assert all(r["n_images"] == 2 and r["pass"] for r in parity["artifacts"])  # images, not tiles
    assert parity["gate_images"]["n_images"] == 10  # the sample's test split, judged on stitched maps
    inputs = json.loads((tiled_engine.engine_dir / "inputs.json").read_text())
    assert inputs  # Polygraphy replays the per-tile graph
    assert json.loads((tiled_engine.engine_dir / "stlm.json").read_text())["format_version"] == 2
    onnx_meta = __import__("onnx").load(str(tiled_engine.engine_dir / "model.onnx")).metadata_props
    embedded = json.loads(next(p.value for p in onnx_meta if p.key == "stlm.json"))
    assert embedded["preprocessing"]["work_size"] == WORK and embedded["format_version"] == 2


@pytest.mark.parametrize("backend, precision", [("ort", None), ("openvino", "fp32")])
def test_runtimes_match_pytorch_tiled_prediction(tiled_engine, tiled_ckpt, sample_dir, backend, precision):
    from stlm_deploy.images import read_image_rgb
    from stlm_train.checkpoint import load_model
    from stlm_train.modeling.predict import predict_tiled

    model = load_model(tiled_ckpt)
    assert model.tiling == Tiling(TILE, WORK, 0.25)
    paths = sorted((sample_dir / "test").rglob("*.png"))[:2]
    with Detector.load(tiled_engine.engine_dir, backend=backend, precision=precision) as det:
        for p in paths:
            image = read_image_rgb(p)
            ref = predict_tiled(model, image)
            got = det.predict(image)
            assert got.n_tiles == ref.n_tiles > 1
            assert abs(got.score - float(ref.score)) < 1e-4
            want = resize_map(ref.maps["anomaly_map"], image.shape[:2])
            assert float(np.abs(got.anomaly_map - want).max()) < 1e-4
            assert float(np.abs(got.tlm_map - resize_map(ref.maps["tlm_map"], image.shape[:2])).max()) < 1e-3


def test_the_gate_compares_stitched_maps_and_scores(small_stlm):
    layout = TileLayout(Tiling(TILE, WORK, 0.25), 100)
    calib = calibration_images(None, TILE, 2, "area", layout)
    assert len(calib) == 2 and calib.images.shape[0] == sum(calib.layout.counts()) > 2
    from stlm_export.gate import reference_outputs

    ref = reference_outputs(small_stlm, calib.images, with_tlm=False)
    gate = Gate(ref, calib.source, {"fp32": Tolerance(1e-4, 1e-4, 1e-4, False)}, lambda _m: None, calib.layout)
    assert gate.check("same", "x", "fp32", ref).passed
    off = {k: v.copy() for k, v in ref.items()}
    off["anomaly_map"][1, :, :] += 3e-4  # tile (0, 64) of the first image: every pixel of it is shared by two
    rec = gate.check("off", "x", "fp32", off)  # tiles (positions 0, 64, 128 per axis), so the mean moves by half
    assert not rec.passed and rec.n_images == 2 and rec.max_abs_map == pytest.approx(1.5e-4, rel=1e-3)
    off["score"][:] += 1.0  # the per-tile score is not what the gates compare: the stitched top-k mean is
    assert gate.check("score", "x", "fp32", {**ref, "score": off["score"]}).passed


def test_int8_on_a_tiled_engine_calibrates_on_tiles_and_judges_images(tiled_engine, tiled_ckpt, sample_dir,
                                                                       tmp_path):
    import openvino as ov

    from stlm_deploy.spec import write_spec
    from stlm_export.gate import ort_outputs
    from stlm_export.int8.build import build_gated_int8, int8_data
    from stlm_export.int8.gate import Int8Tolerance
    from stlm_export.pipeline import spec_metadata
    from stlm_export.int8.openvino import validation_fn

    d = tmp_path / "tiled_int8"
    shutil.copytree(tiled_engine.engine_dir, d)
    spec = load_spec(d)
    layout = TileLayout(spec.tiling, spec.top_k)
    calib, val = int8_data(sample_dir, sample_dir, None, spec.img_size, spec.preprocessing.resize, layout)
    assert calib.layout is not None and calib.images.shape[0] == sum(calib.layout.counts())
    assert len(val) == 10 and val.images.shape[0] == sum(val.layout.counts()) and len(val.mask_list) == 10
    assert val.masks.shape == (10, WORK, WORK)  # the bundled 900 x 900 images: 256 x 256 work maps
    # the accuracy-control metric, per image on stitched outputs: fp32 against itself is the gate's 1.0
    fp32 = ort_outputs(d / "model.onnx", val.images)
    items, validate = validation_fn(val.images, fp32, val.labels, val.masks, 0.5, Int8Tolerance(), val.layout,
                                    val.mask_list)
    assert len(items) == 10 and items[0][0].shape[0] == val.layout.counts()[0]
    compiled = ov.Core().compile_model(str(d / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    metric, per_item = validate(compiled, items[:4] + items[-4:])
    assert metric == pytest.approx(1.0) and len(per_item) == 8 and per_item[0][0].shape == (WORK, WORK)
    out = build_gated_int8(d, spec, calib, val, targets=("onnx", "openvino"), metadata=spec_metadata(spec, "int8"),
                           tolerance=Int8Tolerance(auroc_drop=1.0, min_agreement=0.0), accuracy_control=False,
                           say=lambda _m: None)
    write_spec(d, spec)
    assert out.records and all(r.n_images == 10 for r in out.records)
    assert load_spec(d).format_version == 2 and "model.int8.onnx" in load_spec(d).artifacts
    with Detector.load(d, backend="ort", precision="int8") as det:
        assert det.predict(np.zeros((300, 200, 3), np.uint8)).n_tiles > 1
