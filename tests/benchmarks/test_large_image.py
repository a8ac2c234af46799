"""benchmarks/large_image.py: a synthetic image scored in a fresh process, its peak RSS reported."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stlm_bench import large_image
from tests.contract_engine import make_engine


def test_synthetic_image_is_deterministic_and_structured():
    a, b = large_image.synthetic_image(300, 700), large_image.synthetic_image(300, 700)
    assert a.shape == (300, 700, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.std() > 20


def test_scores_a_large_image_through_a_tiled_engine_and_reports_peak_rss(tmp_path, capsys):
    engine = make_engine(tmp_path, "tiled", work_size=160)
    out = tmp_path / "r.json"
    assert large_image.main(["--engine", str(engine), "--width", "900", "--height", "600", "--threads", "1",
                             "--backend", "ort", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["image"] == [600, 900, 3] and r["map_shape"] == [600, 900] and r["n_tiles"] == 6
    assert r["peak_rss_mib"] >= r["peak_rss_after_load_mib"] > 0 and r["tiling"]["work_size"] == 160
    with pytest.raises(SystemExit, match="--engine .*: no such engine"):
        large_image.main(["--engine", str(tmp_path / "missing")])
