"""benchmarks/cpu_levers.py on a real small engine: every lever runs and the kernel study is recorded."""
from __future__ import annotations

import json

import pytest

from stlm_bench import cpu_levers


@pytest.mark.timeout(1200)  # the shared int8_engine fixture is built inside this budget when run alone
def test_levers_time_every_variant_and_record_the_kernels(int8_engine, tmp_path):
    d, _ = int8_engine
    out = tmp_path / "levers.json"
    assert cpu_levers.main(["--engine", str(d), "--threads", "1", "--runs", "1", "--int8-variants",
                            "--json", str(out), "--markdown", str(tmp_path / "levers.md")]) == 0
    rows = json.loads(out.read_text())["rows"]
    levers = {(r["engine"], r["lever"]) for r in rows}
    assert ("ort fp32", "batch dim pinned to 1") in levers
    assert any("static batch 1" in lever for _, lever in levers)
    kernels = {r["lever"]: r["kernels"] for r in rows if r.get("kernels")}
    assert kernels["dynamic MatMul (DynamicQuantizeMatMul)"].get("DynamicQuantizeMatMul", 0) > 0
    assert kernels["static Q/DQ U8S8 (same op set)"].get("QLinearMatMul", 0) > 0
    assert all(r["p50_ms"] > 0 for r in rows if "p50_ms" in r)
    assert "ONNX Runtime kernels after its graph optimisation" in (tmp_path / "levers.md").read_text()
