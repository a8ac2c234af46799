"""End-to-end export: engine directory contents, stlm.json, metadata, parity gate, atomicity, Polygraphy."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from stlm_deploy.files import sha256_file
from stlm_export.onnx_export import read_metadata
from stlm_export.pipeline import ExportError, ExportOptions, ParityGateError, default_name, export_engine
from stlm_export.gate import POLYGRAPHY_TOLERANCE, Tolerance
from stlm_train import STLM, get_config
from stlm_train.checkpoint import official_state_dict
from tests.stlm_train.helpers import randomize

from tests.conftest import THRESHOLDS


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_engine_directory_and_checksums(full_engine, small_ckpt):
    d = full_engine.engine_dir
    spec = json.loads((d / "stlm.json").read_text())
    files = set(_tree(d)) - {"stlm.json"}
    assert files == set(spec["artifacts"]) == {"model.onnx", "model.fp16.onnx", "openvino/model.xml",
                                               "openvino/model.bin", "parity.json", "inputs.json", "outputs.json"}
    for rel, art in spec["artifacts"].items():
        assert art["sha256"] == sha256_file(d / rel), rel
        assert art["bytes"] == (d / rel).stat().st_size
    kinds = {rel: (a["kind"], a["precision"]) for rel, a in spec["artifacts"].items()}
    assert kinds["model.onnx"] == ("onnx", "fp32") and kinds["model.fp16.onnx"] == ("onnx", "fp16")
    assert kinds["openvino/model.xml"] == ("openvino", "fp32") and kinds["parity.json"] == ("json", None)
    assert spec["artifacts"]["openvino/model.xml"]["inference_precision"] in ("bf16", "fp32")
    # the published directory is readable by others (not mkdtemp's 0700)
    assert (d.stat().st_mode & 0o055) == (0o755 & ~_umask() & 0o055)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_stlm_json_fields(full_engine, small_ckpt):
    from stlm_deploy.spec import load_spec, verify_artifacts

    d = full_engine.engine_dir
    spec = json.loads((d / "stlm.json").read_text())
    parsed = load_spec(d)  # the runtime's own validation
    assert verify_artifacts(d, parsed)
    assert spec["format"] == "stlm-engine" and spec["format_version"] == 1 and spec["model_family"] == "stlm"
    assert spec["name"] == "bottle" == default_name(small_ckpt)
    assert spec["img_size"] == 128 and spec["top_k"] == 100 and spec["opset"] == 17 and spec["batch"] == "dynamic"
    assert spec["input"] == {"name": "image", "dtype": "uint8", "shape": [-1, 128, 128, 3], "layout": "NHWC",
                             "channel_order": "RGB", "fused_preprocessing": True}
    assert [o["name"] for o in spec["outputs"]] == ["anomaly_map", "score", "tlm_map"]
    assert spec["outputs"][1] == {"name": "score", "dtype": "float32", "shape": [-1]}
    assert spec["preprocessing"] == {"resize": "area", "mean": [123.675, 116.28, 103.53],
                                     "std": [58.395, 57.12, 57.375]}
    assert spec["thresholds"]["image"] == THRESHOLDS["image"] and spec["thresholds"]["pixel"] == THRESHOLDS["pixel"]
    assert spec["thresholds"]["method"] == THRESHOLDS["method"] and spec["thresholds"]["tlm_image"] == 0.2
    assert (spec["thresholds"]["score_min"], spec["thresholds"]["score_max"]) == (0.4, 0.9)  # normalized-score span
    assert spec["source"] == {"checkpoint": str(small_ckpt), "sha256": sha256_file(small_ckpt), "kind": "project"}
    assert {"torch", "onnx", "onnxruntime", "openvino", "onnxslim", "onnxconverter_common"} <= set(spec["tools"])
    assert spec["trtexec"].startswith("trtexec --onnx=model.onnx --saveEngine=model.plan --minShapes=image:1x128x128x3")
    assert "--fp16" in spec["trtexec"] and "--layerPrecisions=" in spec["trtexec"]
    assert spec["parity"]["passed"] is True and set(spec["parity"]["summary"]) == \
        {"model.onnx", "model.fp16.onnx", "openvino/model.xml"}
    assert spec["created"]


def test_metadata_props_mirror_stlm_json(full_engine):
    d = full_engine.engine_dir
    spec = json.loads((d / "stlm.json").read_text())
    expected = {k: v for k, v in spec.items() if k not in ("artifacts", "parity", "variants")}
    for rel, prec in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16")):
        meta = read_metadata(d / rel)
        assert json.loads(meta["stlm.json"]) == expected, rel
        assert meta["stlm.precision"] == prec
        for key in ("name", "img_size", "top_k", "opset", "batch", "format", "format_version", "model_family"):
            assert meta[f"stlm.{key}"] == str(spec[key]), key
        assert meta["stlm.input.layout"] == "NHWC" and meta["stlm.outputs"] == "anomaly_map,score,tlm_map"
        assert json.loads(meta["stlm.thresholds.image"]) == spec["thresholds"]["image"]
        assert meta["stlm.source.sha256"] == spec["source"]["sha256"]


def test_parity_report(full_engine):
    d = full_engine.engine_dir
    parity = json.loads((d / "parity.json").read_text())
    assert parity["passed"] and parity["n_images"] == 6
    recs = {r["artifact"]: r for r in parity["artifacts"]}
    assert set(recs) == {"model.onnx", "model.fp16.onnx", "openvino/model.xml"}
    fp32 = recs["model.onnx"]
    assert fp32["max_abs_map"] <= 1e-4 and fp32["max_abs_score"] <= 1e-4 and fp32["max_abs_tlm"] <= 1e-4
    assert fp32["tolerance"]["map"] == 1e-4 and fp32["backend"] == "onnxruntime-cpu"
    ov = recs["openvino/model.xml"]
    assert ov["pass"] and ov["max_abs_map"] <= 1e-4 and ov["tolerance"]["map"] == 1e-4
    assert ov["inference_precision"] == "fp32" and ov["weights"] == "fp32"
    for r in recs.values():
        assert r["n_images"] == 6 and r["image_source"] == parity["image_source"]
        assert set(r) >= {"backend", "precision", "max_abs_map", "mean_abs_map", "max_abs_score", "spearman",
                          "rank_flips", "tolerance", "pass"}
    assert parity["graph"]["nodes"] == full_engine.graph["nodes"] and parity["fp16_policy"]["kept_fp32_count"] > 0


def test_polygraphy_replays_the_reference(full_engine):
    """`polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs outputs.json` passes."""
    d = full_engine.engine_dir
    exe = Path(sys.executable).with_name("polygraphy")
    if not exe.exists():
        pytest.skip(f"polygraphy CLI not found next to {sys.executable}")
    cmd = [str(exe), "run", "model.onnx", "--onnxrt", "--load-inputs", "inputs.json", "--load-outputs",
           "outputs.json", "--atol", str(POLYGRAPHY_TOLERANCE), "--rtol", str(POLYGRAPHY_TOLERANCE)]
    documented = json.loads((d / "parity.json").read_text())["polygraphy"]["command"]
    assert documented == ("polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs outputs.json "
                          f"--atol {POLYGRAPHY_TOLERANCE:g} --rtol {POLYGRAPHY_TOLERANCE:g}")
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_runtime_detector_reads_the_engine(full_engine, small_stlm, small_images):
    """The torch-free runtime loads what export wrote and reproduces the PyTorch maps."""
    from stlm_deploy import Detector

    det = Detector.load(full_engine.engine_dir, backend="ort")
    img = small_images.images[0]
    pred = det.predict(img)
    ref = small_stlm.predict(torch.from_numpy(img[None]))
    assert np.abs(pred.anomaly_map - ref.anomaly_map[0].numpy()).max() <= 1e-4
    assert abs(pred.score - float(ref.score[0])) <= 1e-4


def _small_opts(ckpt: Path, out: Path, **kw) -> ExportOptions:
    base = dict(ckpt=ckpt, out=out, target="onnx", simplify=False, parity_images=2)
    base.update(kw)
    return ExportOptions(**base)


def test_failed_gate_publishes_nothing_and_keeps_the_old_engine(full_engine, small_ckpt, tmp_path):
    existing = tmp_path / "bottle"
    shutil.copytree(full_engine.engine_dir, existing)
    before = _tree(existing)
    impossible = {"fp32": Tolerance(map=1e-12, score=1e-12, tlm=1e-12, rank_order=False)}
    with pytest.raises(ParityGateError, match=r"parity gate failed, nothing published: model.onnx .*FAIL"):
        export_engine(_small_opts(small_ckpt, existing, tolerances=impossible))
    assert _tree(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottle"]  # no temp or backup folder left behind


def test_the_openvino_ir_keeps_fp32_weights_and_is_gated_on_its_batch_1_compilation(small_ckpt, tmp_path):
    """Issue 24: fp16-compressed weights bought no CPU speed and are compiled less exactly for batch 1, so the IR
    keeps fp32 weights, is gated at the fp32 tolerance, and the runtime runs single images on a batch-1 compilation;
    an IR stored with fp16 weights (an older engine) stays on the dynamic compilation it was gated on."""
    from stlm_deploy import Detector

    out = tmp_path / "e"
    export_engine(_small_opts(small_ckpt, out, target="openvino"))
    spec = json.loads((out / "stlm.json").read_text())
    ir = spec["artifacts"]["openvino/model.xml"]
    assert ir["precision"] == "fp32"
    rec = {r["artifact"]: r for r in json.loads((out / "parity.json").read_text())["artifacts"]}["openvino/model.xml"]
    assert rec["pass"] and rec["weights"] == "fp32" and rec["tolerance"]["map"] == 1e-4 and rec["max_abs_map"] <= 1e-4
    assert (out / "openvino" / "model.bin").stat().st_size > 0.8 * (out / "model.onnx").stat().st_size
    with Detector.load(out, backend="openvino", precision="fp32") as det:
        assert det.backend.compiled_shapes == ["batch 1"]
    from stlm_deploy.spec import load_spec, write_spec

    old = load_spec(out)
    for rel in ("openvino/model.xml", "openvino/model.bin"):
        old.artifacts[rel].precision = "fp16"  # as engines from before issue 24 recorded their IR
    write_spec(out, old)
    with Detector.load(out, backend="openvino", precision="fp32") as det:
        assert det.backend.compiled_shapes == ["as exported"]


def test_interrupted_export_leaves_no_partial_directory(small_ckpt, tmp_path, monkeypatch):
    import stlm_export.pipeline as pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert_fp16", boom)  # after model.onnx was written into the temp dir
    out = tmp_path / "engines" / "x"
    with pytest.raises(KeyboardInterrupt):
        export_engine(_small_opts(small_ckpt, out, fp16=True, verify=False))
    assert not out.exists() and list((tmp_path / "engines").iterdir()) == []


def test_default_name_fixed_batch_no_verify(small_ckpt, tmp_path, monkeypatch):
    import builtins
    import io

    opened: list[str] = []  # issue 12: the checkpoint is read once; its sha256 is that of the bytes loaded
    real_open = builtins.open

    def spy(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file) == Path(small_ckpt):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    res = export_engine(ExportOptions(ckpt=small_ckpt, engines_root=tmp_path, target="onnx", simplify=False,
                                      verify=False, batch="2"))
    monkeypatch.undo()
    assert opened == [str(small_ckpt)]
    assert res.engine_dir == tmp_path / "bottle"
    spec = json.loads((res.engine_dir / "stlm.json").read_text())
    assert spec["source"]["sha256"] == sha256_file(small_ckpt)
    assert spec["batch"] == 2 and spec["input"]["shape"] == [2, 128, 128, 3]
    assert spec["parity"] == {"verified": False, "passed": None, "summary": {}}
    assert set(spec["artifacts"]) == {"model.onnx"}
    assert "--minShapes" not in spec["trtexec"] and "--fp16" not in spec["trtexec"]
    inp = onnx.load(str(res.engine_dir / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [2, 128, 128, 3]


def test_out_must_be_an_engine_directory(small_ckpt, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an engine directory"):
        export_engine(_small_opts(small_ckpt, tmp_path / "home"))
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_official_state_dict_paper_config_at_256(tmp_path):
    """An official-layout file (all 1,105 keys) exported at 256 px: fp32 parity on real images."""
    from tests.stlm_train.test_checkpoint import official_layout

    model = randomize(STLM(get_config("paper", 256)), 7).eval()
    sd = official_layout(3)
    for top, part in official_state_dict(model).items():
        sd[top].update(part)  # sane weights for every key that reaches the map; unused keys stay
    assert sum(len(v) for v in sd.values()) == 1105
    ckpt = tmp_path / "stlm_bottle.pth"
    torch.save(sd, ckpt)
    res = export_engine(ExportOptions(ckpt=ckpt, img_size=256, engines_root=tmp_path / "engines", target="onnx",
                                      parity_images=3))
    assert res.engine_dir.name == "stlm_bottle"
    spec = res.spec
    assert spec["source"]["kind"] == "official" and spec["img_size"] == 256
    assert spec["thresholds"] == {"image": None, "pixel": None, "method": "none"}
    rec = res.parity[0]
    assert rec["artifact"] == "model.onnx" and rec["pass"] and rec["max_abs_map"] <= 1e-4
    assert res.graph["torch_params"] == 16_518_825
    from .test_graph import _expected_onnx_params

    assert abs(res.graph["params"] - _expected_onnx_params(model)) <= 1e-3 * res.graph["params"]


def test_kill_9_during_an_export_leaves_the_previous_engine_loadable(full_engine, small_ckpt, tmp_path):
    """SIGKILL stlm-export at its publish step (the finished temp directory holds stlm.json: fsync and swap
    follow) and at a random earlier moment: engines/<name> is always a complete, verifiable engine."""
    import random
    import signal
    import time

    from stlm_deploy import Detector
    from stlm_deploy.files import remove_stale_temps

    out = tmp_path / "bottle"
    shutil.copytree(full_engine.engine_dir, out)
    old_spec = (out / "stlm.json").read_text()
    cmd = [sys.executable, "-m", "stlm_export.cli", "--ckpt", str(small_ckpt), "--out", str(out), "--no-verify",
           "--target", "onnx", "--no-simplify", "--batch", "2"]

    def temp_with_spec() -> bool:
        return any((p / "stlm.json").is_file() for p in tmp_path.glob(".bottle.*.tmp"))

    rng = random.Random(3)
    for moment in ("publish", "random"):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() < deadline:
            if moment == "publish" and temp_with_spec():
                break
            if moment == "random" and time.monotonic() - start > rng.uniform(1.0, 8.0):
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        assert proc.returncode in (-signal.SIGKILL, 0)
        with Detector.load(out, backend="ort") as det:  # verifies every checksum it uses
            assert np.isfinite(det.predict(np.zeros((130, 140, 3), np.uint8)).score)
        spec = json.loads((out / "stlm.json").read_text())
        assert (out / "stlm.json").read_text() == old_spec or spec["batch"] == 2
    remove_stale_temps(out)  # what the next export does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottle"]
