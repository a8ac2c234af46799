"""backend="auto" runs the fastest *gated* variant stlm-bench timed on this machine (timings.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stlm_deploy import Detector
from stlm_deploy.backends.base import default_threads
from stlm_deploy.spec import load_spec, write_spec
from stlm_deploy.timings import TIMINGS_FILE, machine_key, measured_pick, record_timings

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R)   Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
"""


def test_machine_key_is_model_and_the_isa_flags_that_pick_kernels():
    assert machine_key(CPUINFO) == "Intel(R) Xeon(R) Processor [avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8]"
    assert machine_key("model name : AMD EPYC 9B14\nflags : avx2 avx512f avx512_bf16\n") == \
        "AMD EPYC 9B14 [avx2 avx512f avx512_bf16]"


def _write(eng: Path, variants: dict[str, float], *, threads: int | None = None, machine: str | None = None) -> None:
    spec = load_spec(eng)
    arts = {"ort/fp32": "model.onnx", "ort/fp16": "model.fp16.onnx", "ort/int8": "model.int8.onnx",
            "openvino/fp32": "openvino/model.xml", "openvino/bf16": "openvino/model.xml",
            "openvino/int8": "model.int8.xml"}
    rec = {"machine": machine or machine_key(), "threads": threads or default_threads(), "batch": 1,
           "variants": {k: {"p50_ms": ms, "artifact": arts[k], "sha256": spec.artifacts[arts[k]].sha256}
                        for k, ms in variants.items()}}
    (eng / TIMINGS_FILE).write_text(json.dumps({"format_version": 1, "records": [rec]}))


def _timing_note(det: Detector) -> str:
    return next(n for n in det.selection_notes if n.startswith("timings: "))


def test_auto_runs_the_fastest_timed_variant_and_says_why(engine_copy):
    eng = engine_copy("fused")  # model.onnx, model.fp16.onnx, openvino/model.xml (fp32 gate only)
    assert Detector.load(eng).backend_name == "openvino"  # static order without timings
    _write(eng, {"openvino/fp32": 9.0, "ort/fp32": 4.0, "ort/fp16": 6.0})
    det = Detector.load(eng)
    assert (det.backend_name, det.artifact.name, det.backend.precision) == ("ort", "model.onnx", "fp32")
    assert _timing_note(det).startswith("timings: ort/fp32 is the fastest gated variant timed here (4.0 ms p50; "
                                        "ort/fp16 6.0, openvino/fp32 9.0")
    # an explicit precision or backend is obeyed as before
    assert Detector.load(eng, precision="fp32").backend_name == "openvino"
    assert Detector.load(eng, backend="openvino").backend_name == "openvino"


def test_ungated_bf16_and_stale_or_foreign_records_are_ignored(engine_copy):
    eng = engine_copy("fused")
    spec = load_spec(eng)
    spec.artifacts["openvino/model.xml"].precision = "fp16"  # as exported: fp16 weight storage, fp32 inference
    write_spec(eng, spec)
    _write(eng, {"openvino/bf16": 1.0, "openvino/fp32": 9.0, "ort/fp32": 12.0})
    det = Detector.load(eng)  # bf16 was never gated for this IR: fp32 OpenVINO is the fastest that counts
    assert (det.backend_name, det.backend.precision) == ("openvino", "fp32")
    assert _timing_note(det) == ("timings: openvino/fp32 is the fastest gated variant timed here (9.0 ms p50; "
                                 "ort/fp32 12.0; faster but not gated: openvino/bf16 1.0; timings.json)")

    spec = load_spec(eng)
    spec.artifacts["openvino/model.xml"].extra["inference_precision"] = "bf16"
    write_spec(eng, spec)
    pick = measured_pick(eng, load_spec(eng), default_threads(), ["openvino", "ort"])
    assert (pick.backend, pick.precision) == ("openvino", "bf16")  # gated now, so it counts

    _write(eng, {"ort/fp32": 1.0, "openvino/fp32": 9.0})
    data = json.loads((eng / TIMINGS_FILE).read_text())
    data["records"][0]["variants"]["ort/fp32"]["sha256"] = "0" * 64  # model.onnx re-exported since
    (eng / TIMINGS_FILE).write_text(json.dumps(data))
    assert Detector.load(eng).backend_name == "openvino"

    _write(eng, {"ort/fp32": 1.0}, threads=default_threads() + 3)
    assert "no timing for this machine" in _timing_note(Detector.load(eng))
    data = json.loads((eng / TIMINGS_FILE).read_text())
    data["records"][0]["threads"] = float(default_threads())  # not an integer: C++ does not match it either
    (eng / TIMINGS_FILE).write_text(json.dumps(data))
    assert "no timing for this machine" in _timing_note(Detector.load(eng))
    _write(eng, {"ort/fp32": 1.0}, machine="Some Other CPU [avx2]")
    det = Detector.load(eng)
    assert det.backend_name == "openvino" and "no timing for this machine" in _timing_note(det)
    assert measured_pick(eng, load_spec(eng), default_threads(), ["openvino"]).backend is None
    _write(eng, {"ort/fp32": 1.0})
    assert measured_pick(eng, load_spec(eng), default_threads(), ["openvino"]).backend is None  # ORT not here


@pytest.mark.parametrize("text,msg", [
    ("{not json", "not readable JSON"),
    ('{"records": 3}', "field 'records' must be a list"),
    ('{"records": [{"machine": "M", "threads": 1, "variants": {"ort/fp32": {"p50_ms": -1, "artifact": "x"}}}]}',
     "field 'variants.ort/fp32' must have a positive p50_ms"),
])
def test_a_damaged_timings_file_is_reported_and_the_static_order_used(engine_copy, text, msg):
    eng = engine_copy("fused")
    (eng / TIMINGS_FILE).write_text(text.replace('"M"', json.dumps(machine_key())).replace(
        '"threads": 1', f'"threads": {default_threads()}'))
    det = Detector.load(eng)
    assert det.backend_name == "openvino"
    note = _timing_note(det)
    assert msg in note and TIMINGS_FILE in note and note.endswith("static order") and "\n" not in note


def test_record_timings_keeps_other_machines_and_refreshes_this_one(engine_copy):
    eng = engine_copy("fused")
    spec = load_spec(eng)
    _write(eng, {"ort/fp32": 1.0}, machine="Other CPU [avx2]")

    def report(ms: float) -> dict:
        return {"environment": {"threads": 2}, "results": [
            {"backend": "ort", "requested_precision": "fp32", "precision_used": "fp32", "artifact": "model.onnx",
             "timings": {1: {"p50_ms": ms}}, "error": None},
            {"backend": "openvino", "requested_precision": "bf16", "precision_used": "fp32",  # downgraded: skipped
             "artifact": "openvino/model.xml", "timings": {1: {"p50_ms": 1.0}}, "error": None},
            {"backend": "ort", "requested_precision": "fp16", "precision_used": None, "artifact": None,
             "timings": {}, "error": "cannot run"}]}

    record_timings(eng, spec, report(5.0))
    record_timings(eng, spec, report(7.0))
    records = json.loads((eng / TIMINGS_FILE).read_text())["records"]
    assert [r["machine"] for r in records] == ["Other CPU [avx2]", machine_key()]
    mine = records[1]
    assert mine["threads"] == 2 and mine["img_size"] == spec.img_size
    assert {k: v for k, v in mine["variants"]["ort/fp32"].items() if k != "measured_at"} == \
        {"p50_ms": 7.0, "artifact": "model.onnx", "sha256": spec.artifacts["model.onnx"].sha256}
    assert set(mine["variants"]) == {"ort/fp32"}
    # a later partial run (stlm-bench --backend openvino/fp32) adds to the record, it does not drop ort/fp32
    record_timings(eng, spec, {"environment": {"threads": 2}, "results": [
        {"backend": "openvino", "requested_precision": "fp32", "precision_used": "fp32",
         "artifact": str(eng / "openvino" / "model.xml"), "timings": {"1": {"p50_ms": 3.0}}, "error": None}]})
    mine = json.loads((eng / TIMINGS_FILE).read_text())["records"][1]
    assert {k: v["p50_ms"] for k, v in mine["variants"].items()} == {"ort/fp32": 7.0, "openvino/fp32": 3.0}
    assert mine["variants"]["openvino/fp32"]["artifact"] == "openvino/model.xml"
    assert record_timings(eng, spec, {"results": []}) is None


def test_record_timings_from_a_relative_engine_path(engine_copy, monkeypatch):
    """`stlm-bench --engine engines/x` (README) reports artifacts as engines/x/model.onnx: still recorded."""
    eng = engine_copy("fused")
    spec = load_spec(eng)
    monkeypatch.chdir(eng.parent)
    rel = Path(eng.name)
    path = record_timings(rel, spec, {"environment": {"threads": 2}, "results": [
        {"backend": "ort", "requested_precision": "fp32", "precision_used": "fp32",
         "artifact": f"{eng.name}/model.onnx", "timings": {"1": {"p50_ms": 4.0}}, "error": None}]})
    assert path is not None
    mine = [r for r in json.loads((eng / TIMINGS_FILE).read_text())["records"] if r["machine"] == machine_key()][0]
    assert mine["variants"]["ort/fp32"]["artifact"] == "model.onnx"
    assert mine["variants"]["ort/fp32"]["sha256"] == spec.artifacts["model.onnx"].sha256


def test_int8_is_picked_only_when_the_gate_published_it(int8_engine, tmp_path):
    import shutil

    src, _ = int8_engine
    eng = tmp_path / "e"
    shutil.copytree(src, eng)
    spec = load_spec(eng)
    ir = next(k for k, a in spec.artifacts.items() if a.kind == "openvino" and a.precision == "int8"
              and k.endswith(".xml"))
    rec = {"machine": machine_key(), "threads": default_threads(), "variants": {
        "openvino/int8": {"p50_ms": 2.0, "artifact": ir, "sha256": spec.artifacts[ir].sha256},
        "openvino/fp32": {"p50_ms": 5.0, "artifact": "openvino/model.xml",
                          "sha256": spec.artifacts["openvino/model.xml"].sha256}}}
    (eng / TIMINGS_FILE).write_text(json.dumps({"format_version": 1, "records": [rec]}))
    det = Detector.load(eng)
    assert det.backend_name == "openvino" and det.artifact.name == Path(ir).name
    assert "openvino/int8 is the fastest gated variant" in _timing_note(det)
    del spec.artifacts[ir]  # as if the INT8 gate had failed: nothing published, nothing picked
    write_spec(eng, spec)
    det = Detector.load(eng, verify=False)
    assert det.artifact.name == "model.xml"


# ----------------------------------------------------------------------------- without timings.json
AMX = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8"}
EPYC = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}


def _gate(eng: Path, **gated: bool) -> None:
    """stlm.json 'variants' as stlm-export writes it: label -> gated (artifacts: the conventional files)."""
    from stlm_deploy.timings import variant_artifact

    spec = load_spec(eng)
    spec.set_variants({label.replace("_", "/"): {"artifact": variant_artifact(spec, label.replace("_", "/")),
                                                 "gated": ok, "why": "test"} for label, ok in gated.items()})
    write_spec(eng, spec)


def test_cpu_class_keys_the_static_preference():
    from stlm_deploy.timings import STATIC_PREFERENCE, cpu_class

    assert [cpu_class(f) for f in (AMX, EPYC, {"avx2", "avx_vnni"}, {"avx2"}, set())] == \
        ["amx", "avx512_bf16", "vnni", "other", "other"]
    assert STATIC_PREFERENCE["amx"][0] == "openvino/bf16"  # AMX: bf16 beats the INT8 IR (docs/int8.md)
    assert STATIC_PREFERENCE["avx512_bf16"][:2] == ("openvino/int8", "openvino/bf16")  # measured on the EPYC
    assert all(order[-2:] == ("openvino/fp32", "ort/fp32") for order in STATIC_PREFERENCE.values())


def test_static_pick_runs_the_first_gated_variant_for_the_cpu(engine_copy):
    """Right after stlm-export (no timings.json) auto runs the export's gated bf16, not the fp32 IR (issue 24)."""
    from stlm_deploy.timings import static_pick

    eng = engine_copy("fused")  # model.onnx, model.fp16.onnx, openvino/model.xml
    _gate(eng, ort_fp32=True, openvino_fp32=True, openvino_bf16=True, openvino_fp16=True, ort_fp16=True)
    spec = load_spec(eng)
    both = ["openvino", "ort"]
    assert (static_pick(spec, both, AMX).backend, static_pick(spec, both, AMX).precision) == ("openvino", "bf16")
    assert static_pick(spec, both, EPYC).precision == "bf16"  # no INT8 IR in this engine
    assert static_pick(spec, both, {"avx2"}).precision == "fp32"  # a CPU without BF16 never gets bf16
    ort_only = static_pick(spec, ["ort"], AMX)  # no OpenVINO installed
    assert (ort_only.backend, ort_only.precision) == ("ort", "fp32")
    note = static_pick(spec, both, EPYC).note
    assert note == ("openvino/bf16 is the first gated variant of the static preference for this CPU (avx512_bf16: "
                    "openvino/int8 > openvino/bf16 > openvino/fp32 > ort/fp32)")
    _gate(eng, ort_fp32=True, openvino_fp32=True, openvino_bf16=False)  # the task gate failed bf16
    assert static_pick(load_spec(eng), both, AMX).precision == "fp32"
    # an engine from before 'variants': bf16 counts where the IR records it as its inference precision
    spec = load_spec(eng)
    spec.variants = {}
    spec.artifacts["openvino/model.xml"].extra["inference_precision"] = "bf16"
    assert static_pick(spec, both, AMX).precision == "bf16"
    spec.artifacts["openvino/model.xml"].extra["inference_precision"] = "fp32"
    assert static_pick(spec, both, AMX).precision == "fp32"
    assert static_pick(spec, both, AMX | {"amx_fp16"}).precision == "fp32"  # fp16 weights do not gate fp16 inference


def test_auto_right_after_export_and_timings_still_override(engine_copy):
    """Detector.load: the static pick when no timing applies, says so with the evidence; stlm-bench's timings win."""
    import openvino as ov

    from stlm_deploy.timings import cpu_model_and_flags, static_pick

    eng = engine_copy("fused")
    _gate(eng, ort_fp32=True, openvino_fp32=True, openvino_bf16=True)
    spec = load_spec(eng)
    spec.variants["openvino/bf16"].extra["evidence"] = {"n_images": 10, "sufficient": False}
    write_spec(eng, spec)
    det = Detector.load(eng)
    expected = static_pick(load_spec(eng), ["openvino", "ort"])
    bf16_here = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") and \
        bool(cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"})
    assert (det.backend_name, det.backend.precision) == ("openvino", "bf16" if bf16_here else "fp32")
    static = next(n for n in det.selection_notes if n.startswith("static: "))
    assert static == f"static: {expected.note}"
    if bf16_here:
        assert static.endswith("; gated on weak evidence (10 images, see stlm.json variants)")
    _write(eng, {"ort/fp32": 1.0, "openvino/bf16": 9.0})
    det = Detector.load(eng)
    assert det.backend_name == "ort" and not any(n.startswith("static: ") for n in det.selection_notes)
