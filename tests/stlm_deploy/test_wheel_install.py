"""The runtime-only install, as an edge box gets it: ``pip install '<wheel>[cpu]'`` into a fresh venv.

The wheel is built once per session (``pip wheel . --no-deps``, not editable), installed with pip's
cache into a new virtual environment, and must bring no torch, onnx, scikit-learn or scipy. There,
``stlm-infer`` scores a folder on the engine the full install exported (same scores as the full
install), ``stlm-bench`` benchmarks it and says the eager reference was skipped, and the training
and export commands exit 2 with one line naming their extra. Skipped only when pip cannot reach the
package registry.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import cv2
import pytest

from .conftest import sample_image

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnx", "sklearn", "scipy")
_NO_REGISTRY = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                          r"ConnectTimeout|No matching distribution found")


def _run(cmd: list[str], timeout: int, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with only ``stlm-deploy[cpu]`` from a freshly built wheel; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources: setuptools builds in-tree, and a stale build/ folder in the
    # checkout would leak removed modules into the wheel (and a test must not write into the repo).
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                             ".pytest_cache", "__pycache__", "engines"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), str(src)],
                 timeout=300)
    if built.returncode != 0 and _NO_REGISTRY.search(built.stderr):
        pytest.skip("pip cannot reach the package registry to build the wheel: " + built.stderr.strip()[-200:])
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("stlm_deploy-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bindir = env_dir / "bin"
    inst = _run([str(bindir / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[cpu]"], timeout=420)
    if inst.returncode != 0 and _NO_REGISTRY.search(inst.stderr):
        pytest.skip("pip cannot reach the package registry: " + inst.stderr.strip()[-200:])
    assert inst.returncode == 0, inst.stderr[-3000:]
    return bindir


def _clean_env() -> dict[str, str]:
    """The test process's environment without anything that points into the full install."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def test_runtime_install_has_no_heavy_packages(runtime_venv):
    probe = "import importlib.util as u, json; print(json.dumps({m: bool(u.find_spec(m)) for m in %r}))" % (
        HEAVY + ("numpy", "cv2", "click", "onnxruntime", "stlm_deploy"),)
    p = _run([str(runtime_venv / "python"), "-c", probe], timeout=60, env=_clean_env(), cwd=runtime_venv)
    found = json.loads(p.stdout)
    assert not any(found[m] for m in HEAVY), found
    assert all(found[m] for m in ("numpy", "cv2", "click", "onnxruntime", "stlm_deploy")), found


def test_wheel_install_scores_a_folder_like_the_full_install(runtime_venv, full_engine, tmp_path):
    from stlm_deploy import Detector

    images = tmp_path / "images"
    images.mkdir()
    rgbs = {f"img{i}.png": sample_image(90 + 10 * i, 120, i) for i in range(3)}
    for name, rgb in rgbs.items():
        assert cv2.imwrite(str(images / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    p = _run([str(runtime_venv / "stlm-infer"), "--engine", str(full_engine.engine_dir), "--backend", "ort",
              str(images), "--out", str(out)], timeout=300, env=_clean_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "scores.csv", newline="") as f:
        rows = {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(f)}
    assert set(rows) == set(rgbs) and len(list((out / "overlays").glob("*.png"))) == 3
    det = Detector.load(full_engine.engine_dir, backend="ort")  # the full install, in this process
    for name, rgb in rgbs.items():
        assert rows[name] == pytest.approx(det.predict(rgb).score, abs=1e-6), name


def test_wheel_install_benchmarks_without_torch(runtime_venv, full_engine, small_ckpt, tmp_path):
    js = tmp_path / "bench.json"
    p = _run([str(runtime_venv / "stlm-bench"), "--engine", str(full_engine.engine_dir), "--reference",
              str(small_ckpt), "--backend", "ort/fp32", "--runs", "1", "--warmup", "0", "--json", str(js),
              "--no-record"],
             timeout=300, env=_clean_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PyTorch eager reference skipped: torch is not installed" in p.stderr
    report = json.loads(js.read_text())
    assert "reference" not in report and report["results"][0]["error"] is None


@pytest.mark.parametrize("command, args, extra", [
    ("stlm-train", ["--data", "builtin", "--out", "run"], "train"),
    ("stlm-eval", ["--ckpt", "{ckpt}", "--data", "builtin"], "train"),
    ("stlm-export", ["--ckpt", "{ckpt}", "--img-size", "128"], "export"),
])
def test_commands_without_their_extra_exit_2_naming_it(runtime_venv, small_ckpt, tmp_path, command, args, extra):
    argv = [a.format(ckpt=small_ckpt) for a in args]
    p = _run([str(runtime_venv / command), *argv], timeout=120, env=_clean_env(), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"Error: {command} needs the '{extra}' extra (")
    assert f"pip install 'stlm-deploy[{extra}]'" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "engines").exists()  # no work was started
    help_ = _run([str(runtime_venv / command), "--help"], timeout=60, env=_clean_env(), cwd=tmp_path)
    assert help_.returncode == 0 and "--help" in help_.stdout


def test_bench_plot_without_its_extra_exits_2_before_benchmarking(runtime_venv, full_engine, tmp_path):
    p = _run([str(runtime_venv / "stlm-bench"), "--engine", str(full_engine.engine_dir), "--plot",
              str(tmp_path / "b.png")], timeout=120, env=_clean_env(), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("Error: stlm-bench --plot needs the 'bench' extra (matplotlib not installed): "
                                "pip install 'stlm-deploy[bench]'")
