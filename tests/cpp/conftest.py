"""Fixtures for the C++ runtime tests: one CMake build per session and tiny REAL engine directories.

The engine graph obeys the fused-graph contract with trivially checkable numbers (opset 17):
``anomaly_map = mean_c(image) / 255`` and ``score = mean(top_k(anomaly_map))``; the unfused variant takes
the normalised NCHW float input and undoes ``(x - mean) / std`` inside the graph, so a runtime that
normalises wrongly gives visibly wrong numbers. stlm.json is written with ``stlm_deploy.spec``
(``EngineSpec.create`` + ``add_artifact`` + ``write_spec``), exactly as the exporter does, and every engine
carries an OpenVINO IR (``openvino.convert_model`` + ``save_model``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.contract_engine import IMG, OPSET, TOP_K, build_onnx, make_engine, sample_image  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]
CPP_DIR = REPO / "stlm_deploy" / "cpp"
APT_LIST = REPO / ".ci" / "apt-packages.txt"
# Headers the apt packages of .ci/apt-packages.txt provide (checked before building, to skip clearly).
REQUIRED_HEADERS = {
    "opencv2/core.hpp (libopencv-core-dev)": ["opencv4/opencv2/core.hpp", "opencv2/core.hpp"],
    "opencv2/imgproc.hpp (libopencv-imgproc-dev)": ["opencv4/opencv2/imgproc.hpp", "opencv2/imgproc.hpp"],
    "opencv2/imgcodecs.hpp (libopencv-imgcodecs-dev)": ["opencv4/opencv2/imgcodecs.hpp", "opencv2/imgcodecs.hpp"],
    "nlohmann/json.hpp (nlohmann-json3-dev)": ["nlohmann/json.hpp"],
    "openssl/evp.h (libssl-dev)": ["openssl/evp.h"],
}
INCLUDE_ROOTS = [Path("/usr/include"), Path("/usr/local/include")]


@dataclass
class CppBuild:
    app: Path
    build_dir: Path
    seconds: float
    backends: list[str]


def _missing_build_prerequisites() -> list[str]:
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++17 compiler (g++)")
    for what, rels in REQUIRED_HEADERS.items():
        if not any((root / rel).is_file() for root in INCLUDE_ROOTS for rel in rels):
            missing.append(what)
    return missing


@pytest.fixture(scope="session")
def cpp_build() -> CppBuild:
    """Configure + build stlm_deploy/cpp once per session (build.sh: Release, ccache, -j2)."""
    missing = _missing_build_prerequisites()
    if missing:
        pytest.skip("C++ build prerequisites missing: " + ", ".join(missing) +
                    f" (apt-get install $(cat {APT_LIST.relative_to(REPO)}))")
    pytest.importorskip("openvino", reason="the C++ build takes OpenVINO's headers/CMake config from the Python "
                                           "package (pip install -e '.[dev]')")
    build_dir = Path(os.environ.get("STLM_CPP_BUILD_DIR", CPP_DIR / "build"))
    env = {**os.environ, "PYTHON": sys.executable, "BUILD_DIR": str(build_dir)}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(CPP_DIR / "build.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"C++ build failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    app = build_dir / "stlm_infer_cpp"
    assert app.is_file(), f"build succeeded but {app} is missing"
    listed = subprocess.run([str(app), "--list-backends"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return CppBuild(app, build_dir, seconds, listed.stdout.split())


# ----------------------------------------------------------------------------------------- engines
@pytest.fixture(scope="session")
def cpp_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only engines shared by the session (copy one before tampering with it)."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("cpp_engines")
    return {
        "fused": make_engine(root, "fused", openvino_ir=True, with_tlm=True, image_threshold=0.74, pixel_threshold=0.55,
                             score_range=(0.62, 0.81)),
        "unfused": make_engine(root, "unfused", openvino_ir=True, fused=False, image_threshold=0.45, pixel_threshold=0.55),
        "unfused16": make_engine(root, "unfused16", openvino_ir=True, fused=False, half_input=True),
        "fixed": make_engine(root, "fixed", openvino_ir=True, batch=2),
    }
