"""stlm.json: parsing, validation messages, forward compatibility, engine resolution, checksums."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from stlm_deploy.errors import DeployError, SpecError
from stlm_deploy.spec import (FORMAT_VERSION, EngineSpec, load_spec, normalize_precision, resolve_engine,
                              verify_artifacts, write_spec)

from .conftest import IMG


def _data(engine: Path) -> dict:
    return json.loads((engine / "stlm.json").read_text())


def _err(data: dict, where: str = "engines/x/stlm.json") -> str:
    with pytest.raises(SpecError) as ei:
        EngineSpec.from_dict(data, where=where)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(where + ": ")
    return msg


def test_roundtrip_is_lossless(engines):
    data = _data(engines["fused"])
    spec = EngineSpec.from_dict(data)
    assert spec.to_dict() == data
    assert spec.img_size == IMG and spec.input.fused_preprocessing and spec.batch == "dynamic"
    assert spec.output_names == ["anomaly_map", "score", "tlm_map"]
    assert spec.thresholds.image == 0.5 and spec.thresholds.pixel == 0.6
    assert set(spec.artifacts) == {"model.onnx", "model.fp16.onnx", "openvino/model.xml", "openvino/model.bin",
                                   "parity.json"}
    assert spec.artifacts["model.fp16.onnx"].precision == "fp16"
    assert spec.find_artifacts("onnx") == ["model.onnx", "model.fp16.onnx"]


def test_unknown_keys_survive_load_and_save(engine_copy):
    eng = engine_copy("plain")
    data = _data(eng)
    data["future_top_level"] = {"a": [1, 2]}
    data["input"]["future_input_key"] = "x"
    data["thresholds"]["per_region"] = [0.1, 0.2]
    data["artifacts"]["model.onnx"]["signed_by"] = "ci"
    data["outputs"][0]["unit"] = "probability"
    (eng / "stlm.json").write_text(json.dumps(data))
    spec = load_spec(eng)
    assert spec.extra == {"future_top_level": {"a": [1, 2]}}
    write_spec(eng, spec)
    again = _data(eng)
    assert again == data
    assert list(again)[-1] == "future_top_level"  # extras after the known fields


def test_create_follows_graph_contract():
    fused = EngineSpec.create("a", 256, opset=17)
    assert fused.input.shape == [-1, 256, 256, 3] and fused.input.dtype == "uint8" and fused.input.layout == "NHWC"
    unfused = EngineSpec.create("b", 512, opset=18, fused_preprocessing=False, batch=4, with_tlm=True)
    assert unfused.input.shape == [4, 3, 512, 512] and unfused.input.dtype == "float32"
    assert [o.shape for o in unfused.outputs] == [[4, 512, 512], [4], [4, 512, 512]]
    assert unfused.fixed_batch == 4 and fused.fixed_batch is None
    assert EngineSpec.from_dict(unfused.to_dict()).to_dict() == unfused.to_dict()


def test_img_size_message_is_exact(engines):
    data = _data(engines["plain"])
    data["img_size"] = 300
    assert _err(data) == "engines/x/stlm.json: field 'img_size' must be a positive multiple of 64, got 300"


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("input"), "field 'input' is missing"),
    (lambda d: d.update(format="onnx-model"), "field 'format' must be 'stlm-engine'"),
    (lambda d: d.update(format_version="1"), "field 'format_version' must be a positive integer, got \"1\""),
    (lambda d: d["input"].update(layout="NWHC"), "field 'input.layout' must be one of 'NHWC', 'NCHW', got \"NWHC\""),
    (lambda d: d["input"].update(channel_order="BGR"), "field 'input.channel_order' must be one of 'RGB'"),
    (lambda d: d["input"].update(fused_preprocessing="yes"), "field 'input.fused_preprocessing' must be true or false"),
    (lambda d: d["input"].update(shape=[-1, 3, 64, 64]), "field 'input.shape' must be [-1, 64, 64, 3] for fused_preprocessing true"),
    (lambda d: d["input"].update(shape=[-1, 64, "64", 3]), "field 'input.shape' must be a list of positive integers"),
    (lambda d: d.update(batch=2), "field 'input.shape' must be [2, 64, 64, 3]"),
    (lambda d: d.update(batch="dyn"), "field 'batch' must be \"dynamic\" or a positive integer, got \"dyn\""),
    (lambda d: d.update(top_k=0), "field 'top_k' must be an integer >= 1, got 0"),
    (lambda d: d["thresholds"].update(image="high"), "field 'thresholds.image' must be a number or null, got \"high\""),
    (lambda d: d["preprocessing"].update(std=[1, 0, 1]), "field 'preprocessing.std' must be a list of 3 positive numbers"),
    (lambda d: d["preprocessing"].update(resize="nearest"), "field 'preprocessing.resize' must be one of 'area', 'bilinear'"),
    (lambda d: d["source"].update(kind="hub"), "field 'source.kind' must be one of 'project', 'official'"),
    (lambda d: d["artifacts"]["model.onnx"].update(sha256="abc"), "field 'artifacts.model.onnx.sha256' must be 64 lowercase hex digits"),
    (lambda d: d["artifacts"]["model.onnx"].update(kind="pt"), "field 'artifacts.model.onnx.kind' must be one of 'onnx', 'openvino', 'tensorrt', 'json'"),
    (lambda d: d["artifacts"]["model.onnx"].update(precision="fp8"), "field 'artifacts.model.onnx.precision' must be one of"),
    (lambda d: d["artifacts"].update({"../evil.onnx": d["artifacts"]["model.onnx"]}), "key '../evil.onnx' must be a relative path"),
    (lambda d: d["outputs"].pop(1), "field 'outputs' must contain 'score'"),
    (lambda d: d["outputs"][0].update(shape=[-1, 32, 32]), "entry 'anomaly_map' must be float32 [-1, 64, 64]"),
    (lambda d: d.update(opset=0), "field 'opset' must be an integer >= 1"),
    (lambda d: d["tools"].update(onnx=1.16), "field 'tools.onnx' must be a version string"),
])
def test_validation_messages_name_file_and_field(engines, mutate, needle):
    data = copy.deepcopy(_data(engines["plain"]))
    mutate(data)
    assert needle in _err(data)


def test_top_level_must_be_object():
    assert "the top level must be a JSON object" in _err([1, 2])  # type: ignore[arg-type]


def test_newer_format_version_is_refused(engine_copy):
    eng = engine_copy("plain")
    data = _data(eng)
    data["format_version"] = FORMAT_VERSION + 1
    (eng / "stlm.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=rf"field 'format_version' is {FORMAT_VERSION + 1}, newer than this runtime "
                                        rf"supports \({FORMAT_VERSION}\): upgrade stlm-deploy"):
        load_spec(eng)


def test_invalid_json_and_missing_engine(tmp_path, engine_copy):
    eng = engine_copy("plain")
    (eng / "stlm.json").write_text('{"format": "stlm-engine",\n  oops}')
    with pytest.raises(SpecError, match=r"stlm\.json: not valid JSON \(.* at line 2 column 3\)"):
        load_spec(eng)
    with pytest.raises(SpecError, match="no such engine directory or file"):
        load_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"not an engine directory \(no stlm\.json\)"):
        load_spec(tmp_path / "empty")
    stray = tmp_path / "stray.onnx"
    stray.write_bytes(b"x")
    with pytest.raises(SpecError, match="not inside an engine directory"):
        resolve_engine(stray)


def test_resolve_engine_accepts_directory_or_any_file(engines):
    eng = engines["fused"]
    assert resolve_engine(eng) == (eng, None)
    assert resolve_engine(eng / "stlm.json") == (eng, None)
    assert resolve_engine(eng / "parity.json") == (eng, None)
    assert resolve_engine(eng / "model.fp16.onnx") == (eng, eng / "model.fp16.onnx")
    assert resolve_engine(eng / "openvino" / "model.xml") == (eng, eng / "openvino" / "model.xml")
    assert resolve_engine(eng / "openvino" / "model.bin") == (eng, eng / "openvino" / "model.xml")
    assert resolve_engine(eng / "openvino") == (eng, eng / "openvino" / "model.xml")
    for p in (eng, eng / "model.onnx", eng / "openvino" / "model.xml"):
        assert load_spec(p).name == "fused"


def test_verify_artifacts_detects_tampering(engine_copy, monkeypatch):
    eng = engine_copy("plain")
    spec = load_spec(eng)
    assert verify_artifacts(eng, spec) == ["model.onnx", "parity.json"]
    with open(eng / "model.onnx", "ab") as f:
        f.write(b"\0")
    monkeypatch.chdir(eng.parent.parent)  # messages use paths relative to the working directory
    with pytest.raises(DeployError) as ei:
        verify_artifacts(eng, spec, ["model.onnx"])
    assert re.fullmatch(r"engines/plain/model\.onnx: sha256 mismatch \(expected [0-9a-f]{12}\.\.\., found "
                        r"[0-9a-f]{12}\.\.\.\): the file was modified after export; re-export", str(ei.value))
    (eng / "parity.json").unlink()
    with pytest.raises(DeployError, match=r"engines/plain/parity\.json: listed in stlm\.json but missing"):
        verify_artifacts(eng, spec, ["parity.json"])
    with pytest.raises(SpecError, match=r"artifact 'model\.plan' is not listed in field 'artifacts'"):
        verify_artifacts(eng, spec, ["model.plan"])


def test_write_spec_validates_and_keeps_old_file(engine_copy):
    eng = engine_copy("plain")
    before = (eng / "stlm.json").read_bytes()
    spec = load_spec(eng)
    spec.img_size = 100
    with pytest.raises(SpecError, match="img_size"):
        write_spec(eng, spec)
    assert (eng / "stlm.json").read_bytes() == before
    assert not [p for p in eng.iterdir() if p.name.endswith(".tmp")]


def test_normalize_precision():
    assert [normalize_precision(p) for p in ("f32", "FP16", "bfloat16", "int8", None, "auto")] == \
        ["fp32", "fp16", "bf16", "int8", None, None]
    with pytest.raises(DeployError, match="precision: expected one of fp32, fp16, bf16, int8"):
        normalize_precision("fp8")


# ---------------------------------------------------------------- issue 12 item 1: never a silent "normal"
@pytest.mark.parametrize("old, new, field", [
    ('"image": 0.5', '"image": NaN', "thresholds.image"),
    ('"pixel": 0.6', '"pixel": Infinity', "thresholds.pixel"),
    ('"image": 0.5', '"image": 1e999', "thresholds.image"),  # overflows to inf in every JSON parser
    ("57.12", "-Infinity", "preprocessing.std[1]"),
    ("123.675", "NaN", "preprocessing.mean[0]"),
])
def test_nan_and_infinity_in_stlm_json_are_refused_naming_the_field(engine_copy, old, new, field):
    engine = engine_copy("fused")
    path = engine / "stlm.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError) as ei:
        load_spec(engine)
    msg = str(ei.value)
    assert "\n" not in msg and f"stlm.json: field '{field}' must be a finite number, got " in msg
    assert msg.split("got ")[-1] in ("NaN", "Infinity", "-Infinity")


def test_nan_in_an_unknown_field_is_refused_and_never_written(engine_copy):
    engine = engine_copy("fused")
    data = _data(engine)
    data["parity"]["max_abs_map"] = float("nan")
    msg = _err(data)
    assert "field 'parity.max_abs_map' must be a finite number, got NaN" in msg
    spec = load_spec(engine)
    spec.thresholds.image = float("inf")
    before = (engine / "stlm.json").read_text()
    with pytest.raises(SpecError, match="field 'thresholds.image' must be a finite number, got Infinity"):
        write_spec(engine, spec)
    assert (engine / "stlm.json").read_text() == before  # the good file is kept


# ------------------------------------------------------------------------------------------- variants
#: (variants value, the message both runtimes give); the C++ tests reuse these cases.
BAD_VARIANTS = [
    ([1], "field 'variants' must be a JSON object, got [1]"),
    ({"gpu/fp32": {"artifact": "model.onnx", "gated": True}},
     "field 'variants' key 'gpu/fp32' must be <backend>/<precision> with backend one of ort, openvino, tensorrt and "
     "precision one of fp32, fp16, bf16, int8"),
    ({"openvino/bf16": {"gated": True}}, "field 'variants.openvino/bf16.artifact' is missing (required)"),
    ({"openvino/bf16": {"artifact": "openvino/model.xml", "gated": "yes"}},
     "field 'variants.openvino/bf16.gated' must be true or false, got \"yes\""),
    ({"ort/fp32": {"artifact": "../model.onnx", "gated": True}},
     "field 'variants.ort/fp32.artifact' must be a relative path inside the engine directory (forward slashes, "
     "no '..'), got \"../model.onnx\""),
    ({"ort/fp32": "gated"}, "field 'variants.ort/fp32' must be a JSON object, got \"gated\""),
]


def test_variants_round_trip_and_say_why(engine_copy):
    """Issue 24: stlm.json says why each variant is or is not gated; older engines simply have no 'variants'."""
    eng = engine_copy("fused")
    assert load_spec(eng).variants == {} and "variants" not in _data(eng)
    spec = load_spec(eng)
    spec.set_variants({"openvino/bf16": {"artifact": "openvino/model.xml", "gated": True, "why": "task gate passed",
                                         "evidence": {"n_images": 10, "sufficient": False}},
                       "ort/int8": {"artifact": "model.int8.onnx", "gated": False, "why": "not built"}})
    write_spec(eng, spec)
    again = load_spec(eng)
    assert again.variants["openvino/bf16"].gated and again.variants["openvino/bf16"].why == "task gate passed"
    assert again.variants["openvino/bf16"].extra["evidence"]["sufficient"] is False
    assert again.to_dict() == _data(eng) and "variants" not in again.extra


@pytest.mark.parametrize("value,needle", BAD_VARIANTS)
def test_a_malformed_variants_entry_is_refused_naming_the_field(engines, value, needle):
    data = _data(engines["fused"])
    data["variants"] = value
    assert _err(data) == "engines/x/stlm.json: " + needle
