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
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CPP_DIR = REPO / "stlm_deploy" / "cpp"
APT_LIST = REPO / ".ci" / "apt-packages.txt"
IMG = 64
TOP_K = 100
OPSET = 17
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
def build_onnx(path: Path, *, fused: bool = True, batch: int | None = None, with_tlm: bool = False,
               half_input: bool = False) -> Path:
    """A contract-conforming ONNX model (see the module docstring); ``half_input``: unfused float16 input."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    from stlm_deploy.spec import DEFAULT_MEAN, DEFAULT_STD

    n: Any = batch if batch else "N"
    s = IMG
    inits = [h.make_tensor("c255", T.FLOAT, [], [255.0]), h.make_tensor("flat_shape", T.INT64, [2], [0, -1]),
             h.make_tensor("k", T.INT64, [1], [TOP_K])]
    nodes = []
    if fused:
        inp = h.make_tensor_value_info("image", T.UINT8, [n, s, s, 3])
        nodes += [h.make_node("Cast", ["image"], ["xf"], to=T.FLOAT),
                  h.make_node("ReduceMean", ["xf"], ["m"], axes=[3], keepdims=0)]
    else:
        inp = h.make_tensor_value_info("image", T.FLOAT16 if half_input else T.FLOAT, [n, 3, s, s])
        inits += [h.make_tensor("std", T.FLOAT, [1, 3, 1, 1], list(DEFAULT_STD)),
                  h.make_tensor("mean", T.FLOAT, [1, 3, 1, 1], list(DEFAULT_MEAN))]
        if half_input:
            nodes.append(h.make_node("Cast", ["image"], ["x32"], to=T.FLOAT))
        nodes += [h.make_node("Mul", ["x32" if half_input else "image", "std"], ["xs"]),
                  h.make_node("Add", ["xs", "mean"], ["xf"]),
                  h.make_node("ReduceMean", ["xf"], ["m"], axes=[1], keepdims=0)]
    nodes += [h.make_node("Div", ["m", "c255"], ["anomaly_map"]),
              h.make_node("Reshape", ["anomaly_map", "flat_shape"], ["flat"]),
              h.make_node("TopK", ["flat", "k"], ["top", "top_idx"], axis=1),
              h.make_node("ReduceMean", ["top"], ["score"], axes=[1], keepdims=0)]
    outputs = [h.make_tensor_value_info("anomaly_map", T.FLOAT, [n, s, s]),
               h.make_tensor_value_info("score", T.FLOAT, [n])]
    if with_tlm:
        inits.append(h.make_tensor("one", T.FLOAT, [], [1.0]))
        nodes.append(h.make_node("Sub", ["one", "anomaly_map"], ["tlm_map"]))
        outputs.append(h.make_tensor_value_info("tlm_map", T.FLOAT, [n, s, s]))
    graph = h.make_graph(nodes, "tiny_stlm_cpp", [inp], outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="stlm-cpp-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_engine(root: Path, name: str, *, fused: bool = True, batch: int | str = "dynamic", with_tlm: bool = False,
                half_input: bool = False, image_threshold: float | None = None,
                pixel_threshold: float | None = None) -> Path:
    """An engine directory as stlm-export writes it: model.onnx, openvino/model.{xml,bin}, stlm.json."""
    import onnx
    import openvino as ov

    from stlm_deploy.spec import EngineSpec, write_spec

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    build_onnx(d / "model.onnx", fused=fused, batch=None if batch == "dynamic" else int(batch), with_tlm=with_tlm,
               half_input=half_input)
    (d / "openvino").mkdir(exist_ok=True)
    ov.save_model(ov.convert_model(str(d / "model.onnx")), str(d / "openvino" / "model.xml"), compress_to_fp16=False)
    spec = EngineSpec.create(name, IMG, opset=OPSET, fused_preprocessing=fused, batch=batch, with_tlm=with_tlm,
                             top_k=TOP_K, tools={"onnx": onnx.__version__, "openvino": ov.__version__})
    if half_input:
        spec.input.dtype = "float16"
    spec.thresholds.image, spec.thresholds.pixel = image_threshold, pixel_threshold
    spec.thresholds.method = "test" if image_threshold is not None else "none"
    spec.add_artifact(d, "model.onnx", "onnx", "fp32")
    spec.add_artifact(d, "openvino/model.xml", "openvino", "fp32")
    spec.add_artifact(d, "openvino/model.bin", "openvino", "fp32")
    write_spec(d, spec)
    return d


@pytest.fixture(scope="session")
def cpp_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only engines shared by the session (copy one before tampering with it)."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("cpp_engines")
    return {
        "fused": make_engine(root, "fused", with_tlm=True, image_threshold=0.74, pixel_threshold=0.55),
        "unfused": make_engine(root, "unfused", fused=False, image_threshold=0.45, pixel_threshold=0.55),
        "unfused16": make_engine(root, "unfused16", fused=False, half_input=True),
        "fixed": make_engine(root, "fixed", batch=2),
    }


def sample_image(h: int, w: int, seed: int = 0):
    """A structured RGB uint8 image (gradient + blobs + noise) so top-k and both resizes are non-trivial."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx / max(w - 1, 1) * 120 + yy / max(h - 1, 1) * 60).astype(np.float32)
    img = np.stack([base, base * 0.8 + 20, 180 - base], axis=2)
    for _ in range(3):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(h, w) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(100, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
