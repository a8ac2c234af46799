"""stlm-bench on a real exported engine: tables, parity numbers, JSON, plot, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from stlm_bench import bench
from stlm_bench.cli import main
from stlm_bench.measure import _percentile, time_fn


def test_percentiles_and_timing():
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _percentile([5.0], 99) == 5.0
    calls = []
    t = time_fn(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and t.runs == 4 and t.min_ms <= t.p50_ms <= t.p99_ms


def test_parity_numbers():
    ref_m = np.zeros((3, 4, 4))
    m = ref_m.copy()
    m[0, 0, 0] = 0.5
    p = bench.parity(ref_m, np.array([0.1, 0.2, 0.3]), m, np.array([0.1, 0.25, 0.3], np.float32))
    assert p["max_abs_map"] == 0.5 and p["mean_abs_map"] == pytest.approx(0.5 / 48)
    assert p["max_abs_score"] == pytest.approx(0.05) and p["spearman"] == pytest.approx(1.0)


def test_parse_variants(full_engine):
    d = full_engine.engine_dir
    labels = [v.label for v in bench.parse_variants("all", d)]
    assert labels[:2] == ["ort/fp32", "ort/fp16"] and "openvino/bf16" in labels and "openvino/fp32" in labels
    assert [v.label for v in bench.parse_variants("ort/fp32,openvino", d)] == ["ort/fp32", "openvino/default"]
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        bench.parse_variants("onnx/fp32", d)


def test_bench_cli_tables_json_and_plot(full_engine, small_ckpt, tmp_path):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    r = CliRunner().invoke(main, ["--engine", str(full_engine.engine_dir), "--reference", str(small_ckpt),
                                  "--backend", "ort/fp32,ort/fp16,openvino/fp32", "--batch", "1,2", "--runs", "2",
                                  "--warmup", "1", "--json", str(js), "--markdown", str(md), "--plot", str(png),
                                  "--no-record"])
    assert r.exit_code == 0, r.output
    assert "| pytorch/fp32 (eager) | fp32 | torch | 1 |" in r.output
    assert "| ort/fp32 | fp32 | CPUExecutionProvider | 2 |" in r.output
    report = json.loads(js.read_text())
    by = {x["label"]: x for x in report["results"]}
    assert by["ort/fp32"]["parity"]["max_abs_map"] <= 1e-4  # same gate as the export
    assert by["ort/fp16"]["parity"]["max_abs_map"] <= 5e-3
    assert by["openvino/fp32"]["precision_used"] == "fp32"
    assert set(by["ort/fp32"]["speedup_vs_eager_p50"]) == {"1", "2"}
    assert report["environment"]["threads"] >= 1 and "onnxruntime" in report["environment"]["packages"]
    assert md.read_text() in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_accuracy_on_labelled_data(full_engine, small_ckpt, sample_dir, tmp_path):
    js = tmp_path / "acc.json"
    r = CliRunner().invoke(main, ["--engine", str(full_engine.engine_dir), "--reference", str(small_ckpt),
                                  "--backend", "ort/fp32", "--runs", "1", "--warmup", "0", "--data", str(sample_dir),
                                  "--json", str(js), "--no-record"])
    assert r.exit_code == 0, r.output
    assert "| variant | i_auroc | p_auroc | aupro | p_ap | f1_max | agreement |" in r.output
    report = json.loads(js.read_text())
    ref, ort = report["reference"]["accuracy"], report["results"][0]["accuracy"]
    assert set(ref) >= {"i_auroc", "p_auroc", "aupro", "p_ap", "f1_max"}
    # the fp32 engine and the reference agree on the metrics of the same 10 labelled images
    for k in ("i_auroc", "p_auroc", "aupro", "p_ap", "f1_max"):
        assert ort[k] == pytest.approx(ref[k], abs=1e-3), k
    assert ref["agreement"] == 1.0 and ort["agreement"] == 1.0


def test_bench_int8_rows(int8_engine, small_ckpt, sample_dir):
    """int8 rows (ORT Q/DQ and the OpenVINO NNCF IR) with accuracy and decision agreement vs eager fp32."""
    d, _ = int8_engine
    assert {"ort/int8", "openvino/int8"} <= {v.label for v in bench.default_variants(d)}
    data = bench.load_labelled(str(sample_dir), "mvtec", None, 128)
    report = bench.run_bench(str(d), reference=str(small_ckpt), variants=bench.parse_variants("ort/int8,openvino/int8", d),
                             runs=1, warmup=0, threads=1, data=data)
    by = {x["label"]: x for x in report["results"]}
    for label, art in (("ort/int8", "model.int8.onnx"), ("openvino/int8", "model.int8.xml")):
        r = by[label]
        assert r["error"] is None and r["precision_used"] == "int8" and r["artifact"].endswith(art)
        assert 0.0 <= r["accuracy"]["agreement"] <= 1.0 and r["parity"]["max_abs_map"] < 0.05
    md = bench.markdown(report)
    assert "| ort/int8 | int8 |" in md and "agreement" in md


@pytest.mark.parametrize("args,msg", [
    (["--engine", "/nonexistent/engine"], "/nonexistent/engine"),
    (["--batch", "0"], "--batch"),
    (["--backend", "coreml"], "unknown backend 'coreml'"),
    (["--reference", "/nonexistent/x.ckpt"], "--reference: no such checkpoint file"),
])
def test_bench_errors_are_one_line(full_engine, args, msg):
    argv = ["--engine", str(full_engine.engine_dir), "--runs", "1"]
    argv = args + argv[2:] if args[0] == "--engine" else argv + args
    p = subprocess.run([sys.executable, "-m", "stlm_bench.cli", *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len([l for l in err if l.startswith("Error")]) == 1


# ------------------------------------------------------------------ issue 12 item 8: the reference is the engine's source
def test_bench_refuses_a_reference_that_is_not_the_engine_source(full_engine, small_ckpt, small_stlm, tmp_path):
    from stlm_deploy.files import sha256_file
    from stlm_train import save_checkpoint

    other = save_checkpoint(tmp_path / "other" / "model.ckpt", small_stlm, thresholds={"image": 0.1})  # other bytes
    base = ["--engine", str(full_engine.engine_dir), "--backend", "ort/fp32", "--runs", "1", "--warmup", "0",
            "--no-record"]
    p = subprocess.run([sys.executable, "-m", "stlm_bench.cli", *base, "--reference", str(other)],
                       capture_output=True, text=True, timeout=300)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"--reference {other}: sha256 {sha256_file(other)[:12]}... is not the checkpoint this engine was " \
           "exported from" in err[0] and "--allow-other-reference" in err[0]
    js = tmp_path / "other.json"
    r = CliRunner().invoke(main, [*base, "--reference", str(other), "--allow-other-reference", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["reference"]["is_engine_source"] is False
    r = CliRunner().invoke(main, [*base, "--reference", str(small_ckpt), "--json", str(js)])
    assert r.exit_code == 0, r.output
    ref = json.loads(js.read_text())["reference"]
    assert ref["is_engine_source"] is True and ref["sha256"] == full_engine.spec["source"]["sha256"] \
        == sha256_file(small_ckpt)


def test_bench_records_timings_that_auto_then_follows(full_engine, tmp_path):
    """stlm-bench writes ENGINE/timings.json; Detector.load(backend='auto') runs the fastest variant in it."""
    import shutil

    from stlm_deploy import Detector

    eng = tmp_path / "bottle"
    shutil.copytree(full_engine.engine_dir, eng)
    r = CliRunner().invoke(main, ["--engine", str(eng), "--no-reference", "--backend", "ort/fp32,openvino/fp32",
                                  "--runs", "2", "--warmup", "1", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "timings recorded in" in r.output
    rec = json.loads((eng / "timings.json").read_text())["records"][0]
    assert rec["threads"] == 1 and set(rec["variants"]) == {"ort/fp32", "openvino/fp32"}
    fastest = min(rec["variants"], key=lambda k: rec["variants"][k]["p50_ms"])
    det = Detector.load(eng, threads=1)
    assert f"{det.backend_name}/{det.backend.precision}" == fastest
    assert any(n.startswith(f"timings: {fastest} is the fastest gated variant") for n in det.selection_notes)
    det = Detector.load(eng, threads=2)  # timed at 1 thread only: the static order
    assert any("no timing for this machine" in n for n in det.selection_notes)


def test_bench_on_a_tiled_engine_reports_ms_per_image_and_per_tile(tiled_engine, tiled_ckpt, sample_dir, tmp_path):
    js = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["--engine", str(tiled_engine.engine_dir), "--reference", str(tiled_ckpt),
                                  "--backend", "ort/fp32,openvino/fp32", "--batch", "1,2", "--runs", "2",
                                  "--warmup", "1", "--data", str(sample_dir), "--json", str(js), "--no-record"])
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    tiles = report["tiling"]
    assert tiles["work_size"] == 256 and tiles["image_shape"] == [256, 256] and tiles["tiles_per_image"] == 9
    assert "Tiled engine: work size 256" in r.output and "ms/tile |" in r.output
    for entry in [report["reference"], *report["results"]]:
        for b, t in entry["timings"].items():  # one call = batch images x 9 tiles
            assert entry["ms_per_tile"][b] == pytest.approx(t["p50_ms"] / (int(b) * 9))
    by = {x["label"]: x for x in report["results"]}
    assert by["ort/fp32"]["parity"]["max_abs_map"] <= 1e-4  # vs the eager tiled reference, stitched alike
    assert by["ort/fp32"]["parity"]["max_abs_score"] <= 1e-4
    assert report["reference"]["accuracy"]["i_auroc"] == pytest.approx(by["ort/fp32"]["accuracy"]["i_auroc"],
                                                                       abs=1e-6)
