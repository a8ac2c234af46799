"""benchmarks/families.py: a family really trains, evaluates, exports and gets timed; the table says so.

One family (STFPM) keeps it under a minute: STLM goes through the same ``run_family``."""
from __future__ import annotations

import json

import pytest

from stlm_bench import families


@pytest.mark.slow
def test_a_family_trains_exports_and_is_timed(tmp_path, sample_dir, capsys):
    argv = ["--data", str(sample_dir), "--configs", "stfpm", "--img-size", "64", "--time-budget", "0.01",
            "--runs", "1", "--name", "t", "--out-dir", str(tmp_path)]
    assert families.main(argv) == 0
    rows = {r["family"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert set(rows) == {"stfpm"}
    for r in rows.values():
        assert r["steps"] >= 1 and 0.0 <= r["i_auroc"] <= 1.0 and r["gflop"] > 0
        assert all(p["pass"] for p in r["export_parity"].values())
        assert set(r["ms_per_image"]) == {"pytorch/fp32", *families.ENGINE_VARIANTS}
        assert all(v is None or v > 0 for v in r["ms_per_image"].values())
    # STFPM deploys teacher + student: exactly two ResNet-18 trunks up to layer3
    assert rows["stfpm"]["params"] == 2 * 2_782_784 and rows["stfpm"]["batch_size"] == 4  # 32 capped at 4 images
    md = (tmp_path / "t.md").read_text()
    assert "| stfpm (stfpm) | builtin | 4 |" in md and "load average" in md
    capsys.readouterr()
