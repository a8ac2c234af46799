"""stlm-infer: outputs, partial failures, exit codes and one-line errors (CliRunner + a real subprocess)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from stlm_deploy import Detector
from stlm_deploy.cli import collect_inputs, main

from .conftest import sample_image

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    _write(d / "a.png", sample_image(80, 100, 1))
    _write(d / "sub" / "b.png", sample_image(64, 64, 2))
    _write(d / "sub" / "deeper" / "c.bmp", sample_image(50, 70, 3))
    (d / "notes.txt").write_text("not an image, ignored by the folder search")
    return d


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_folder_glob_and_outputs(engines, image_dir, tmp_path):
    out = tmp_path / "out"
    extra = _write(tmp_path / "more" / "a.png", sample_image(90, 60, 7))  # same name as images/a.png
    r = _run(["--engine", str(engines["fused"]), "--backend", "ort", "--save-maps", str(image_dir),
              str(tmp_path / "more" / "*.png"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = _csv(out)
    assert [Path(x["path"]).name for x in rows] == ["a.png", "b.png", "c.bmp", "a.png"]
    assert set(rows[0]) == {"path", "score", "is_anomalous"}
    det = Detector.load(engines["fused"], backend="ort")
    for row in rows:
        rgb = cv2.cvtColor(cv2.imread(row["path"]), cv2.COLOR_BGR2RGB)
        pred = det.predict(rgb)
        assert abs(float(row["score"]) - pred.score) < 1e-6
        assert row["is_anomalous"] == ("true" if pred.is_anomalous else "false")
    report = json.loads((out / "scores.json").read_text())
    assert report["backend"]["backend"] == "ort" and report["backend"]["artifact"].endswith("model.onnx")
    assert report["failed"] == [] and len(report["results"]) == 4
    keys = [res["overlay"] for res in report["results"]]
    assert keys == ["overlays/a.png", "overlays/sub/b.png", "overlays/sub/deeper/c.png", "overlays/a-2.png"]
    for res in report["results"]:
        src = cv2.imread(res["path"])
        ov = cv2.imread(str(out / res["overlay"]))
        assert ov.shape == src.shape
        m = np.load(out / res["map"])
        assert m.shape == src.shape[:2] and m.dtype == np.float32
        png = cv2.imread(str(out / res["map"]).replace(".npy", ".png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and png.shape == m.shape
    np.testing.assert_allclose(np.load(out / "maps" / "a-2.npy"),
                               det.predict(cv2.cvtColor(cv2.imread(str(extra)), cv2.COLOR_BGR2RGB)).anomaly_map)
    assert not [p for p in out.rglob("*.tmp")]


def test_unreadable_file_is_skipped_and_exit_1(engines, image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), "--no-overlays", str(image_dir),
                                  str(tmp_path / "missing.png"), "--out", str(out)])
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert any(ln.endswith("broken.png: cannot decode as an image (unsupported format, empty or corrupt file); "
                           "skipped") for ln in lines)
    assert any(ln.endswith("missing.png: no such file or directory; skipped") for ln in lines)
    assert len(_csv(out)) == 3 and not (out / "overlays").exists()
    failed = json.loads((out / "scores.json").read_text())["failed"]
    assert {Path(f["path"]).name for f in failed} == {"broken.png", "missing.png"}


def test_no_inputs_exit_2(engines, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), str(tmp_path / "empty"), "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("Error: no input images found in") and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Error: no INPUT given" in r.stderr


@pytest.mark.parametrize("engine_arg, needle", [
    ("does/not/exist", "does/not/exist: no such engine directory or file"),
    ("{images}", "not an engine directory (no stlm.json)"),
])
def test_bad_engine_is_one_line_error(image_dir, tmp_path, engine_arg, needle):
    r = CliRunner().invoke(main, ["--engine", engine_arg.format(images=image_dir), str(image_dir), "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert err.startswith("Error: ") and needle in err and len(err.splitlines()) == 1 and "Traceback" not in r.output


def test_engine_file_and_options(engines, image_dir, tmp_path):
    out = tmp_path / "out"
    r = _run(["--engine", str(engines["fused"] / "openvino" / "model.xml"), "--precision", "f32", "--threads", "1",
              "--batch-size", "2", str(image_dir / "a.png"), str(image_dir / "sub"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "scores.json").read_text())["backend"]
    assert info["backend"] == "openvino" and info["precision"] == "fp32" and info["selected_by"] == "auto"
    assert "openvino on" not in r.stdout and "stlm-infer: fused on openvino (fp32" in r.stderr
    assert len(_csv(out)) == 3
    assert _run(["--help"]).exit_code == 0


def test_collect_inputs_dedupes_and_reports(image_dir):
    files, problems = collect_inputs([str(image_dir), str(image_dir / "a.png"), str(image_dir / "*.jpg")])
    assert [k for _, k in files] == ["a", "sub/b", "sub/deeper/c"]
    assert problems == [f"{image_dir / '*.jpg'}: pattern matches no files"]


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # the package is installed: no PYTHONPATH needed
    return subprocess.run([sys.executable, "-m", "stlm_deploy.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_real_subprocess(engines, image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    p = _subprocess(["--engine", str(engines["plain"] / "model.onnx"), str(image_dir), "--out", str(out)], tmp_path)
    assert p.returncode == 1, p.stderr
    assert "broken.jpg: cannot decode as an image" in p.stderr and "Traceback" not in p.stderr
    assert len(_csv(out)) == 3 and len(list((out / "overlays").rglob("*.png"))) == 3
    assert "3 image(s) scored, 1 failed" in p.stderr
    (tmp_path / "nothing").mkdir()
    p = _subprocess(["--engine", str(engines["plain"]), str(tmp_path / "nothing"), "--out", str(out)], tmp_path)
    assert p.returncode == 2 and p.stderr.strip().startswith("Error: no input images found")
    assert len(p.stderr.strip().splitlines()) == 1
    p = _subprocess(["--engine", str(tmp_path / "nope"), str(image_dir), "--out", str(out)], tmp_path)
    assert p.returncode == 1 and p.stderr.strip() == "Error: nope: no such engine directory or file"  # cwd-relative
