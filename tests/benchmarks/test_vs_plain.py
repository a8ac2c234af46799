"""benchmarks/vs_plain.py: the project's engine beside the plain conversion of the official graph, one run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stlm_bench import vs_plain


def test_the_plain_graph_is_the_official_numerics_on_the_same_weights(small_stlm, tmp_path):
    """torch.onnx.export of the per-stream official graph reproduces the PyTorch model within 1e-4."""
    import onnxruntime as ort
    import torch

    path = vs_plain.export_plain(small_stlm, tmp_path / "plain.onnx")
    s = small_stlm.cfg.img_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8))
    with torch.no_grad():
        xf = small_stlm.normalize(x)
        ref = small_stlm(xf)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [[1, 3, s, s]]  # the exporter's default: static batch 1
    amap, score = sess.run(None, {"x": xf.numpy()})
    assert np.abs(amap - ref.anomaly_map.numpy()).max() <= 1e-4 and np.abs(score - ref.score.numpy()).max() <= 1e-4
    import onnx

    names = {n.name.split("/")[1] for n in onnx.load(str(path)).graph.node if n.name.startswith("/")}
    assert {"plain", "denoising", "decoder", "fa_head"} <= names  # stages map like the engine's graph


def test_one_run_writes_the_tables(full_engine, small_ckpt, tmp_path):
    out = tmp_path / "results"
    assert vs_plain.main(["--ckpt", str(small_ckpt), "--sizes", "128", "--engine", f"128={full_engine.engine_dir}",
                          "--threads", "1", "--runs", "1", "--warmup", "0", "--profile-runs", "1",
                          "--out-dir", str(out), "--name", "t", "--smoke", "--work", str(tmp_path / "w")]) == 0
    report = json.loads((out / "t.json").read_text())
    [sec] = report["sizes"]
    rows = {r["label"]: r for r in sec["rows"]}
    assert report["smoke"] and sec["img_size"] == 128
    assert {"pytorch eager fp32", "engine ort/fp32", "engine openvino/fp32", "plain torch.onnx.export, onnxruntime fp32",
            "plain torch.onnx.export, openvino fp32"} <= set(rows)
    assert any(k.startswith("auto after export -> ") for k in rows)
    assert rows["engine ort/fp32"]["gated"] is True and rows["engine ort/fp32"]["max_abs_map_vs_ort_fp32"] == 0.0
    for label in ("pytorch eager fp32", "plain torch.onnx.export, onnxruntime fp32"):
        assert rows[label]["max_abs_map_vs_ort_fp32"] <= 1e-4  # same weights, same numbers
    assert all(r["runs"] == 1 and r["p50_ms"] > 0 for r in rows.values())
    prof = sec["profile"]
    assert {"engine onnxruntime fp32", "plain onnxruntime fp32", "engine openvino fp32"} <= set(prof["stages"])
    assert prof["stages"]["plain onnxruntime fp32"]["plain"] > 0 and prof["ops"]["plain openvino fp32"]
    md = (out / "t.md").read_text()
    assert "**Smoke run**" in md and "| engine ort/fp32 | yes |" in md and "kernel time by op type" in md


def test_bad_arguments_are_one_line(full_engine, small_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--engine 256=.*img_size is 128, not 256"):
        vs_plain.main(["--ckpt", str(small_ckpt), "--sizes", "256", "--engine", f"256={full_engine.engine_dir}",
                       "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        vs_plain.main(["--ckpt", str(small_ckpt), "--sizes", "300"])
    assert e.value.code == 2 and "sizes must be positive multiples of 64" in capsys.readouterr().err
