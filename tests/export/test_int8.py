"""INT8: calibration data rules, the accuracy gate, Q/DQ + NNCF artifacts, the failing-gate path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stlm_export.int8.data import int8_calibration, int8_validation
from stlm_train.checkpoint import TrainSplit
from stlm_export.int8.gate import INT8_TOLERANCE, Int8Tolerance, gate_margin, int8_compare
from stlm_export.pipeline import ExportError, ExportOptions, export_engine, int8_only

IMG = 128


# ------------------------------------------------------------------------------------- pure gate rules
def _outputs(scores, maps):
    return {"score": np.asarray(scores, np.float32), "anomaly_map": np.asarray(maps, np.float32)}


def _labelled(n=8, s=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n // 2))
    masks = np.zeros((n, s, s), np.uint8)
    masks[n // 2:, 2:5, 2:5] = 1
    maps = rng.uniform(0, 0.5, (n, s, s)) + masks * 0.4
    scores = maps.reshape(n, -1).max(1)
    return labels, masks, maps, scores


def test_gate_passes_identical_outputs_and_reports_every_number():
    labels, masks, maps, scores = _labelled()
    rec = int8_compare(_outputs(scores, maps), _outputs(scores, maps), labels, masks, float(np.median(scores)),
                       artifact="a", backend="b", image_source="x")
    assert rec.passed and rec.failures == [] and rec.notes == []
    m = rec.metrics
    assert m["image_auroc_fp32"] == m["image_auroc_int8"] == 1.0 and m["image_auroc_drop"] == 0.0
    assert m["pixel_auroc_drop"] == 0.0 and m["agreement"] == 1.0 and m["max_abs_map"] == 0.0
    assert m["spearman"] == pytest.approx(1.0)
    assert rec.threshold_source == "stlm.json thresholds.image"


def test_gate_fails_by_how_much():
    labels, masks, maps, scores = _labelled()
    bad_scores = scores.copy()
    bad_scores[labels == 1] -= 0.6  # defects now score below the good images: AUROC collapses
    rec = int8_compare(_outputs(scores, maps), _outputs(bad_scores, maps), labels, masks, float(np.median(scores)),
                       artifact="model.int8.onnx", backend="onnxruntime-cpu", image_source="x")
    assert not rec.passed
    auroc = next(f for f in rec.failures if f.startswith("image AUROC"))
    assert "below fp32 1.0000" in auroc and "short by" in auroc
    agree = next(f for f in rec.failures if f.startswith("decisions agree"))
    assert "short by" in agree and rec.metrics["agreement"] < 0.98
    assert "FAIL" in rec.line() and "model.int8.onnx" in rec.line()


def test_one_class_validation_gates_what_it_can_and_says_so():
    _, _, maps, scores = _labelled()
    rec = int8_compare(_outputs(scores, maps), _outputs(scores + 1e-4, maps), np.zeros(len(scores)), None, None,
                       artifact="a", backend="b", image_source="held-out")
    assert rec.metrics["image_auroc_int8"] is None and rec.metrics["pixel_auroc_int8"] is None
    assert any("image AUROC not gated" in n for n in rec.notes) and any("pixel AUROC" in n for n in rec.notes)
    assert rec.threshold_source.startswith("fp32 median")
    assert rec.passed == (rec.metrics["agreement"] >= 0.98)


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.3, 0.6])
def test_gate_margin_is_the_gate(shift):
    """NNCF's 'drop <= max_drop' on gate_margin is exactly the gate's verdict (not a proxy)."""
    labels, masks, maps, scores = _labelled(seed=1)
    got_scores = scores - shift * labels
    got_maps = maps - shift * masks
    ref, got = _outputs(scores, maps), _outputs(got_scores, got_maps)
    thr = float(np.median(scores))
    assert gate_margin(ref, ref, labels, masks, thr) == 1.0  # never 0: NNCF divides by the initial metric
    drop = 1.0 - gate_margin(ref, got, labels, masks, thr)
    verdict = int8_compare(ref, got, labels, masks, thr, artifact="a", backend="b", image_source="x").passed
    assert (drop <= INT8_TOLERANCE.auroc_drop) == verdict


def test_int8_only_rule():
    assert int8_only(ExportOptions(ckpt="x", int8=True))
    assert not int8_only(ExportOptions(ckpt="x", int8=True, fp16=True))
    assert not int8_only(ExportOptions(ckpt="x", int8=True, target="openvino"))
    assert not int8_only(ExportOptions(ckpt="x"))


# -------------------------------------------------------------------------------------------- data
def test_parity_images_of_a_data_set_root_are_inputs_not_masks(sample_dir, tmp_path):
    """--calib-data on an MVTec root used to spread the parity batch over ground_truth/ masks too."""
    from stlm_export.calib import calibration_images

    par = calibration_images(sample_dir, 64, 64)
    assert (sample_dir / "ground_truth").is_dir() and par.paths
    assert not [p for p in par.paths if "/ground_truth/" in p]
    masks = tmp_path / "ground_truth" / "crack"
    masks.mkdir(parents=True)
    for f in (sample_dir / "ground_truth").rglob("*.png"):
        (masks / f.name).write_bytes(f.read_bytes())
        break
    with pytest.raises(ValueError, match=r"--calib-data .*only mask images"):
        calibration_images(tmp_path, 64)


def test_calibration_never_sees_test_images(sample_dir, tmp_path):
    cal = int8_calibration(sample_dir, None, 64, "area", 4)  # a data-set root: train/good only
    assert cal.paths and all("/train/good/" in p for p in cal.paths)
    assert cal.images.shape == (len(cal.paths), 64, 64, 3)
    with pytest.raises(ValueError, match=r"--calib-data .*contains test/mask images"):
        int8_calibration(sample_dir / "test", None, 64, "area")
    with pytest.raises(ValueError, match=r"--int8: the checkpoint records no training data"):
        int8_calibration(None, TrainSplit(data=str(tmp_path / "gone")), 64, "area")


def test_defaults_come_from_the_checkpoint(sample_dir, tmp_path):
    ckpt = TrainSplit(data=str(sample_dir), format="mvtec", held_out=frozenset({"002.png"}))
    cal = int8_calibration(None, ckpt, 64, "area")
    names = [Path(p).name for p in cal.paths]
    assert "002.png" not in names and len(names) == 4 and all("/train/good/" in p for p in cal.paths)
    # the recorded data set's labelled test split comes first: never trained or calibrated on
    val = int8_validation(None, ckpt, 64, "area", cal)
    assert val.source.startswith("recorded-test-split:") and val.two_classes and val.masks is not None
    assert all("/test/" in p for p in val.paths) and len(val) == 10
    lab = int8_validation(sample_dir, ckpt, 64, "area", cal)
    assert lab.two_classes and lab.masks is not None and lab.masks.shape == (len(lab), 64, 64)
    assert all("/test/" in p for p in lab.paths)
    # a data set without a test split: the held-out good images the thresholds were chosen on
    ckpt = TrainSplit(data=str(_train_only_copy(sample_dir, tmp_path)), format="mvtec", held_out=frozenset({"002.png"}))
    val = int8_validation(None, ckpt, 64, "area")
    assert [Path(p).name for p in val.paths] == ["002.png"] and val.source.startswith("held-out:")
    assert not val.two_classes and "AUROC not gated" in val.note


def _train_only_copy(sample_dir: Path, root: Path) -> Path:
    """A data set with train/good only (no test split): the checkpoint's held-out images are its gate images."""
    (root / "train" / "good").mkdir(parents=True)
    for p in sorted((sample_dir / "train" / "good").iterdir()):
        (root / "train" / "good" / p.name).write_bytes(p.read_bytes())
    return root


def test_the_gate_never_judges_on_calibration_images(sample_dir, tmp_path, monkeypatch):
    """Without --val-data and without a recorded split, the calibration images were also the gate images
    (issue 24): now every other one is held out of calibration; held-out gate images leave --calib-data."""
    import stlm_export.int8.data as gd

    resolved = lambda paths: {Path(p).resolve() for p in paths}  # noqa: E731
    monkeypatch.setattr(gd, "sample_data_root", lambda: None)  # no bundled sample to fall back on
    train = sample_dir / "train" / "good"
    cal, val = gd.gate_data(train, None, None, 64, "area", int8=True)
    assert cal.paths and val.paths and not resolved(cal.paths) & resolved(val.paths)
    assert resolved(cal.paths) | resolved(val.paths) == resolved(train.iterdir())
    assert val.source.startswith("held-out-of-calibration:") and val.labels is None
    assert "(unlabelled)" in val.evidence().line() and not val.evidence().to_dict()["sufficient"]
    # --calib-data pointing at the training folder: the checkpoint's held-out gate image is not calibrated on
    data = _train_only_copy(sample_dir, tmp_path / "data")
    ckpt = TrainSplit(data=str(data), format="mvtec", held_out=frozenset({"002.png"}))
    cal, val = gd.gate_data(data / "train" / "good", None, ckpt, 64, "area", int8=True)
    assert [Path(p).name for p in val.paths] == ["002.png"] and "002.png" not in [Path(p).name for p in cal.paths]
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(train.iterdir()).read_bytes())
    with pytest.raises(ValueError, match=r"--val-data: needed here .*1 image\(s\); none can be held out"):
        gd.gate_data(one, None, None, 64, "area", int8=True)
    with pytest.raises(ValueError, match=r"--calib-data .*every image is also a gate image"):
        gd.int8_calibration(one, None, 64, "area", exclude=[one / "a.png"])


def test_int8_option_errors(small_ckpt, tmp_path):
    with pytest.raises(ExportError, match="--int8 with --no-verify"):
        export_engine(ExportOptions(ckpt=small_ckpt, out=tmp_path / "e", int8=True, verify=False))
    with pytest.raises(ExportError, match="--int8 with --batch 2"):
        export_engine(ExportOptions(ckpt=small_ckpt, out=tmp_path / "e", int8=True, batch=2))
    with pytest.raises(ExportError, match="--val-data with --no-verify"):
        export_engine(ExportOptions(ckpt=small_ckpt, out=tmp_path / "e", val_data=tmp_path, verify=False))
    with pytest.raises(ExportError, match="--gate-images: must be a positive integer, got 0"):
        export_engine(ExportOptions(ckpt=small_ckpt, out=tmp_path / "e", gate_images=0))


# ------------------------------------------------------------------------------- real artifacts
def test_int8_artifacts_are_listed_with_their_gate(int8_engine):
    d, out = int8_engine
    spec = json.loads((d / "stlm.json").read_text())
    arts = spec["artifacts"]
    assert arts["model.int8.onnx"]["precision"] == "int8" and arts["model.int8.onnx"]["gate"]["pass"]
    assert arts["openvino/model.int8.xml"]["precision"] == "int8"
    assert arts["openvino/model.int8.xml"]["inference_precision"] in ("bf16", "fp32")
    assert arts["openvino/model.int8.bin"]["kind"] == "openvino"
    assert out.passed and [r.artifact for r in out.records] == ["model.int8.onnx", "openvino/model.int8.xml"]
    ort_rec = out.records[0]
    assert ort_rec.details["qdq"]["quantized_by_op"].get("MatMul", 0) > 0  # the compute really is int8
    # the plain ladder comes first; its first rung (all compute ops) passes this tolerance
    assert out.records[1].details["nncf"]["method"] == "quantize"
    assert out.records[1].details["nncf"]["op_types"] == ["MatMul", "Conv", "Gemm"]
    assert out.records[1].details["nncf"]["fake_quantize_layers"] > 0
    for r in out.records:  # real numbers on the labelled sample: both classes, pixel masks
        assert r.metrics["image_auroc_fp32"] is not None and r.metrics["pixel_auroc_fp32"] is not None
        assert 0.0 <= r.metrics["agreement"] <= 1.0 and r.n_images == 10
    data = out.to_dict()["data"]
    assert all("/train/good/" in p for p in data["calibration"]["images"])
    assert all("/test/" in p for p in data["validation"]["images"])


def test_failing_int8_gate_keeps_the_other_artifacts(small_ckpt, sample_dir, tmp_path):
    """An impossible agreement (>100 %) must fail: reported by how much, fp32 still published."""
    out = tmp_path / "e"
    res = export_engine(ExportOptions(ckpt=small_ckpt, out=out, int8=True, target="onnx", parity_images=2,
                                      calib_data=sample_dir, val_data=sample_dir,
                                      int8_tolerance=Int8Tolerance(min_agreement=1.01)))
    spec = json.loads((out / "stlm.json").read_text())
    assert "model.onnx" in spec["artifacts"] and "model.int8.onnx" not in spec["artifacts"]
    assert not (out / "model.int8.onnx").exists()
    parity = json.loads((out / "parity.json").read_text())
    rec = parity["int8"]["artifacts"][0]
    assert not rec["pass"] and not parity["int8"]["passed"]
    assert any("short by" in f and "decisions agree" in f for f in rec["failures"])
    # every rung of the ORT ladder was tried (fastest first) and is on record
    from stlm_export.int8.ort import ORT_INT8_LADDER

    tried = [r["qdq"]["policy"]["op_types"] for r in rec["fallback_from"]] + [rec["qdq"]["policy"]["op_types"]]
    assert tried == [list(p.op_types) for p in ORT_INT8_LADDER]
    assert spec["parity"]["int8_passed"] is False and spec["parity"]["summary"]["model.int8.onnx"]["pass"] is False
    assert res.int8 is not None and not res.int8["passed"]


def test_openvino_ignored_types_follow_the_ladder():
    from stlm_export.int8.ort import ORT_INT8_LADDER, QdqPolicy
    from stlm_export.int8.openvino import ov_ignored_types

    assert [ov_ignored_types(p) for p in ORT_INT8_LADDER] == [[], ["Convolution", "GroupConvolution"], ["MatMul"]]
    assert ov_ignored_types(QdqPolicy(op_types=("Gemm",))) == ["Convolution", "GroupConvolution"]
