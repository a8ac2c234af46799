"""Tiled engines in the C++ runtime: the same stitched map and score as the Python runtime (and as numpy on the
fixture graph), the same one-line refusals of bad tiling fields, and an untiled engine unchanged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import CppBuild, make_engine
from .test_cpp_runtime import run_app, stderr_lines, write_images

STITCH_TOL = 1e-5  # the bound for Python vs C++ vs server (measured: 0 on these engines)
WORK = 160
SIZES = [(400, 300), (64, 64), (90, 500), (37, 53), (160, 160)]


@pytest.fixture(scope="module")
def tiled_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("cpp_tiled")
    return {"fused": make_engine(root, "tiled", openvino_ir=True, with_tlm=True, work_size=WORK, image_threshold=0.5,
                                 pixel_threshold=0.55, score_range=(0.3, 0.8)),
            "unfused": make_engine(root, "tiled_unfused", openvino_ir=True, fused=False, work_size=WORK,
                                   tile_overlap=0.5),
            "fixed": make_engine(root, "tiled_fixed", openvino_ir=True, batch=2, work_size=WORK)}


@pytest.mark.parametrize("name", ["fused", "unfused", "fixed"])
def test_tiled_cpp_matches_python_within_1e5(cpp_build: CppBuild, tiled_engines: dict[str, Path], tmp_path: Path,
                                            name: str) -> None:
    from stlm_deploy import Detector
    from tests.stlm_deploy.test_tiling import expected_tiled

    engine = tiled_engines[name]
    images = write_images(tmp_path / "imgs", SIZES)
    maps = tmp_path / "maps"
    proc = run_app(cpp_build, engine, *images, "--json", "--save-maps", maps, "--backend", "openvino",
                   "--batch-size", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    doc = json.loads(proc.stdout)
    det = Detector.load(engine, backend="openvino", precision="fp32", batch_size=3)
    try:
        for r in doc["results"]:
            bgr = cv2.imread(r["path"], cv2.IMREAD_COLOR)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            py = det.predict(bgr, bgr=True)
            cmap = np.load(r["map"])
            assert cmap.shape == bgr.shape[:2] == py.anomaly_map.shape
            assert float(np.abs(cmap - py.anomaly_map).max()) <= STITCH_TOL, r["path"]
            assert abs(r["score"] - py.score) <= STITCH_TOL
            assert r["n_tiles"] == py.n_tiles
            assert r["is_anomalous"] == py.is_anomalous
            if py.normalized_score is not None:
                assert abs(r["normalized_score"] - py.normalized_score) <= STITCH_TOL
            m, score, _ = expected_tiled(rgb, WORK)  # both against numpy, not only against each other
            assert float(np.abs(cmap - m).max()) <= 1e-4 and abs(r["score"] - score) <= 1e-5
        assert max(r["n_tiles"] for r in doc["results"]) > 1
    finally:
        det.close()


@pytest.mark.parametrize("edit", [
    lambda d: d["preprocessing"].update(work_size=32),
    lambda d: d["preprocessing"].update(tile_overlap=0.95),
    lambda d: d["preprocessing"].update(tile_overlap=-0.1),
    lambda d: d["preprocessing"].update(tile_blend="max"),
    lambda d: d["preprocessing"].pop("tile_blend"),
    lambda d: d["preprocessing"].pop("work_size"),
    lambda d: d.update(format_version=1),
    lambda d: d.update(format_version=3),
])
def test_bad_tiling_fields_are_refused_in_cpp_as_in_python(cpp_build: CppBuild, tiled_engines: dict[str, Path],
                                                           tmp_path: Path, edit) -> None:
    from stlm_deploy.errors import SpecError
    from stlm_deploy.spec import load_spec

    engine = tmp_path / "engine"
    shutil.copytree(tiled_engines["fused"], engine)
    data = json.loads((engine / "stlm.json").read_text())
    edit(data)
    (engine / "stlm.json").write_text(json.dumps(data))
    with pytest.raises(SpecError) as py:
        load_spec(engine)
    py_msg = str(py.value).split("stlm.json: ", 1)[1]
    [img] = write_images(tmp_path / "imgs", [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    [line] = stderr_lines(proc)
    assert proc.returncode == 1 and proc.stdout == ""
    assert line.endswith("stlm.json: " + py_msg), (py_msg, line)
