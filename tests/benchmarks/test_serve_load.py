"""benchmarks/serve_load.py end to end at a tiny size: real stlm-serve subprocess, HTTP clients, results files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="needs the serve extra")

from tests.contract_engine import make_engine  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.timeout(240)]


def test_serve_load_counts_every_request_and_reads_tritons_batch_stats(tmp_path: Path) -> None:
    from stlm_bench.serve_load import main

    engine = make_engine(tmp_path / "e", "tiny", image_threshold=0.5, score_range=(0.3, 0.8))
    rc = main(["--engine", str(engine), "--backend", "ort", "--clients", "3", "--requests", "4", "--protocols",
               "http", "--images", str(tmp_path / "none"), "--n-images", "4", "--baseline-rounds", "1",
               "--out-dir", str(tmp_path / "results"), "--name", "tiny"])
    report = json.loads((tmp_path / "results" / "tiny.json").read_text())
    [run] = report["runs"]
    assert run["sent"] == run["ok"] == 12 and run["errors"] == 0 and run["lost"] == 0
    # Triton's statistics account for every image: sum(batch size x executions) == requests answered
    assert sum(int(b) * n for b, n in run["batches"].items()) == 12
    assert report["in_process"]["batch_1"]["images"] == 4 and report["server_exit_code"] == 0
    assert rc == (0 if report["largest_batch"] > 1 else 1)
    assert "stlm-serve http" in (tmp_path / "results" / "tiny.md").read_text()
