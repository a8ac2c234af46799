"""Issue 24: bf16/fp16 inference gated like INT8 by task metrics; evidence; stlm.json 'variants'; auto after export."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stlm_export.pipeline import ExportOptions, export_engine
from stlm_export.task_gate import TASK_TOLERANCE, Evidence, TaskTolerance, task_compare


def _bf16_cpu() -> bool:
    import openvino as ov

    from stlm_deploy.timings import cpu_model_and_flags

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") and \
        bool(cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"})


# ------------------------------------------------------------------------------------------ evidence
def test_evidence_warns_for_every_limit_the_images_cannot_resolve():
    """The demo's 10 images (5 good, 5 defective) can resolve neither 98 % agreement nor a 0.01 AUROC step."""
    labels = np.array([0] * 5 + [1] * 5)
    masks = np.zeros((10, 4, 4), np.uint8)
    masks[5:, 1:3, 1:3] = 1
    ev = Evidence.of(labels, masks, 10, "sample")
    assert (ev.n_good, ev.n_defective, ev.pixel_labels) == (5, 5, True)
    warn = ev.warnings()
    assert warn == ["10 gate images: one flipped decision is 10% of them (the gate allows 2%); 50 or more resolve "
                    "the agreement limit",
                    "image AUROC on 5 good x 5 defective images moves in steps of 0.040, coarser than the 0.01 "
                    "allowed; 100 or more pairs resolve it"]
    assert ev.to_dict()["sufficient"] is False and ev.line() == "10 images (5 good, 5 defective, pixel masks) from sample"
    big = np.array([0] * 20 + [1] * 40)
    big_masks = np.zeros((60, 4, 4), np.uint8)
    big_masks[20:, 0, 0] = 1
    assert Evidence.of(big, big_masks, 60, "val").warnings() == []  # a real category's test split is enough
    assert "no pixel masks: pixel AUROC not judged" in Evidence.of(big, None, 60, "val").warnings()
    assert Evidence.of(None, None, 60, "x").warnings() == [
        "the gate images are unlabelled: image and pixel AUROC not judged"]
    assert "all good" in Evidence.of(np.zeros(60), None, 60, "held-out").warnings()[0]
    assert (TASK_TOLERANCE.min_images, TASK_TOLERANCE.min_pairs) == (50, 100)
    assert TaskTolerance(min_agreement=0.9).min_images == 10


def test_a_task_record_carries_its_precision_and_evidence():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 6)
    scores = np.r_[rng.uniform(0.1, 0.3, 6), rng.uniform(0.6, 0.9, 6)].astype(np.float32)
    maps = rng.uniform(0, 1, (12, 8, 8)).astype(np.float32)
    fp32 = {"score": scores, "anomaly_map": maps}
    bf16 = {"score": scores + 0.004, "anomaly_map": maps + 0.02}  # maps move by 2e-2, every decision holds
    rec = task_compare(fp32, bf16, labels, None, 0.45, artifact="openvino/model.xml", backend="openvino-cpu",
                       image_source="val", precision="bf16")
    assert rec.passed and rec.metrics["image_auroc_bf16"] == 1.0 and abs(rec.metrics["max_abs_map"] - 0.02) < 1e-6
    d = rec.to_dict()
    assert d["precision"] == "bf16" and d["evidence"]["n_good"] == 6 and d["evidence"]["sufficient"] is False
    s = rec.summary()
    assert s["evidence_sufficient"] is False and s["n_defective"] == 6 and s["pass"] is True
    assert "[openvino-cpu bf16] image AUROC 1.0000 vs fp32 1.0000" in rec.line()


# ------------------------------------------------------------------------------------------- export
def test_every_variant_says_why_and_the_evidence_is_recorded(full_engine):
    d = full_engine.engine_dir
    spec = json.loads((d / "stlm.json").read_text())
    parity = json.loads((d / "parity.json").read_text())
    v = spec["variants"]
    assert set(v) == {"ort/fp32", "ort/fp16", "openvino/fp32", "openvino/bf16", "openvino/fp16", "ort/int8",
                      "openvino/int8"}
    assert v["ort/fp32"]["gated"] and v["ort/fp32"]["why"].startswith("parity gate vs PyTorch passed")
    assert v["ort/int8"] == {"artifact": "model.int8.onnx", "gated": False, "gate": "none",
                             "why": "not built (export with --int8)"}
    ir = spec["artifacts"]["openvino/model.xml"]
    bf16 = v["openvino/bf16"]
    assert ir["inference_precision"] == ("bf16" if bf16["gated"] else "fp32")  # older runtimes' default agrees
    if _bf16_cpu():
        assert bf16["gate"] == "task" and bf16["why"].startswith("task gate vs fp32 ")
        assert bf16["evidence"]["n_images"] == parity["gate_images"]["n_images"] == 10
        rec = parity["precision_gates"]["artifacts"][0]
        assert rec["precision"] == "bf16" and rec["reference"].startswith("model.onnx") and "max_abs_map" in rec
        assert spec["parity"]["precision_gates"]["openvino/bf16"]["pass"] == bf16["gated"]
    # the bundled sample's 10 images are too few: a visible warning in parity.json and stlm.json
    assert parity["gate_images"]["evidence"]["sufficient"] is False
    assert parity["warnings"] == spec["parity"]["warnings"] and len(parity["warnings"]) == 2
    assert all(w.startswith("weak gate evidence: ") for w in parity["warnings"])


@pytest.mark.parametrize("tolerance,gated", [(TaskTolerance(auroc_drop=1.0, min_agreement=0.0), True),
                                              (TaskTolerance(min_agreement=1.01), False)])
def test_auto_runs_bf16_right_after_export_only_when_its_task_gate_passed(small_ckpt, tmp_path, tolerance, gated):
    """No stlm-bench run: Detector.load(auto) runs the IR at bf16 when the export gated it, else at fp32."""
    if not _bf16_cpu():
        pytest.skip("this CPU has no native BF16: OpenVINO bf16 is not tried")
    from stlm_deploy import Detector

    out = tmp_path / "e"
    said: list[str] = []
    export_engine(ExportOptions(ckpt=small_ckpt, out=out, target="openvino", parity_images=2, task_tolerance=tolerance),
                  log=said.append)
    spec = json.loads((out / "stlm.json").read_text())
    bf16 = spec["variants"]["openvino/bf16"]
    assert bf16["gated"] is gated and spec["artifacts"]["openvino/model.xml"]["inference_precision"] == \
        ("bf16" if gated else "fp32")
    assert any(line.startswith(f"variant openvino/bf16: {'gated' if gated else 'not gated'} (task gate") for line in said)
    if not gated:
        assert "short by" in bf16["why"]
    with Detector.load(out, threads=1) as det:
        assert (det.backend_name, det.backend.precision) == ("openvino", "bf16" if gated else "fp32")
        static = next(n for n in det.selection_notes if n.startswith("static: "))
        assert static.startswith(f"static: openvino/{'bf16' if gated else 'fp32'} is the first gated variant")


def test_an_unfused_graph_is_gated_on_normalised_gate_images(small_ckpt, tmp_path):
    """--no-fuse-pre takes float NCHW: the task gates feed it the normalised gate images, as the parity gate does."""
    out = tmp_path / "unfused"
    export_engine(ExportOptions(ckpt=small_ckpt, out=out, fuse_pre=False, target="openvino", parity_images=2))
    spec = json.loads((out / "stlm.json").read_text())
    assert spec["input"]["dtype"] == "float32" and spec["variants"]["openvino/fp32"]["gated"]
    assert spec["variants"]["openvino/bf16"]["gate"] in ("task", "none")  # tried where the CPU has BF16
