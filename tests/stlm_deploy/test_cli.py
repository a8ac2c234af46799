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
    assert list(rows[0]) == ["path", "score", "normalized_score", "is_anomalous", "backend", "precision"]
    assert {(x["backend"], x["precision"]) for x in rows} == {("ort", "fp32")}  # every row says what ran
    jsonl = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert {(x["backend"], x["precision"]) for x in jsonl} == {("ort", "fp32")} and len(jsonl) == 4
    det = Detector.load(engines["fused"], backend="ort")
    for row in rows:
        rgb = cv2.cvtColor(cv2.imread(row["path"]), cv2.COLOR_BGR2RGB)
        pred = det.predict(rgb)
        assert abs(float(row["score"]) - pred.score) < 1e-6
        assert row["is_anomalous"] == ("true" if pred.is_anomalous else "false")
        assert abs(float(row["normalized_score"]) - pred.normalized_score) < 1e-6
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


# ---------------------------------------------------------------- issue 12 items 1, 4, 5: streaming, isolation
def _strict_json(path: Path):
    def refuse(token: str):
        raise ValueError(f"{path.name} holds a bare {token}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(ln, parse_constant=lambda t: 1 / 0) for ln in (out / "scores.jsonl").read_text().splitlines()]


def test_huge_png_among_five_good_images_is_one_line_and_the_rest_are_scored(engines, tmp_path):
    from tests.stlm_deploy.test_images import png_header_only

    d = tmp_path / "imgs"
    for i in range(5):
        _write(d / f"good{i}.png", sample_image(60 + i, 70, i))
    (d / "good2b.png").write_bytes(png_header_only(40000, 40000))  # sorted among the good ones
    out = tmp_path / "out"
    p = _subprocess(["--engine", str(engines["plain"]), str(d), "--out", str(out)], tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "cv2.error" not in p.stderr
    bad = [ln for ln in p.stderr.splitlines() if "good2b.png" in ln]
    assert bad == [f"{d / 'good2b.png'}: image is too large to decode (40000x40000 = 1,600,000,000 pixels, limit "
                   "64,000,000; raise max_pixels / --max-pixels to allow it); skipped"]
    assert [Path(r["path"]).name for r in _csv(out)] == [f"good{i}.png" for i in range(5)]
    assert "5 image(s) scored, 1 failed" in p.stderr
    doc = _strict_json(out / "scores.json")
    assert len(doc["results"]) == 5 and [Path(f["path"]).name for f in doc["failed"]] == ["good2b.png"]
    lines = _jsonl(out)
    assert len(lines) == 6 and [("error" in ln) for ln in lines] == [False, False, False, True, False, False]


def test_max_pixels_flag(engines, tmp_path):
    from tests.stlm_deploy.test_images import png_header_only

    d = tmp_path / "imgs"
    _write(d / "small.png", sample_image(40, 50, 1))   # 2,000 pixels
    _write(d / "large.png", sample_image(80, 100, 2))  # 8,000 pixels
    (d / "huge.png").write_bytes(png_header_only(40000, 40000))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), "--no-overlays", "--max-pixels", "5000",
                                  str(d), "--out", str(out)])
    assert r.exit_code == 1 and [Path(x["path"]).name for x in _csv(out)] == ["small.png"]
    assert any(ln.endswith("large.png: image is too large to decode (100x80 = 8,000 pixels, limit 5,000; raise "
                           "max_pixels / --max-pixels to allow it); skipped") for ln in r.stderr.splitlines())
    # 0 = no cap: the decoder gets the file, fails on it (OpenCV's own guard / truncated data): still one line
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), "--no-overlays", "--max-pixels", "0",
                                  str(d), "--out", str(out)])
    assert r.exit_code == 1 and sorted(Path(x["path"]).name for x in _csv(out)) == ["large.png", "small.png"]
    [line] = [ln for ln in r.stderr.splitlines() if "huge.png" in ln]
    assert line.startswith(f"{d / 'huge.png'}: cannot decode as an image") and line.endswith("; skipped")
    assert "--max-pixels INTEGER" in _run(["--help"]).output


def test_rows_are_appended_and_flushed_as_each_image_completes(engines, tmp_path):
    from stlm_deploy.batch import collect_inputs, score_files

    d = tmp_path / "imgs"
    for i in range(7):
        _write(d / f"{i}.png", sample_image(50, 60, i))
    (d / "3b.png").write_bytes(b"broken")
    files, _ = collect_inputs([str(d)])
    out = tmp_path / "out"
    on_disk: list[tuple[int, int]] = []

    def progress(_: int) -> None:  # what another process would see on disk right now
        on_disk.append((len(_csv(out)), len((out / "scores.jsonl").read_text().splitlines())))

    with Detector.load(engines["plain"], backend="ort") as det:
        result = score_files(det, files, out, batch_size=3, overlays=False, progress=progress)
    assert len(result.results) == 7 and len(result.failed) == 1
    # after the k-th finished file, k rows are already on disk (csv: results only; jsonl: results + failures)
    assert [j for _, j in on_disk] == list(range(1, 9))
    assert [c for c, _ in on_disk] == [1, 2, 3, 3, 4, 5, 6, 7]  # 3b.png fails while its chunk is read
    assert not (out / "scores.json").exists()  # written at the end by write_scores


def test_a_killed_run_keeps_every_finished_row(engines, tmp_path):
    import signal
    import time

    d = tmp_path / "imgs"
    for i in range(150):
        _write(d / f"{i:03d}.png", sample_image(600, 800, i % 7))
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.json").write_text('{"results": "of an earlier run"}\n')  # must not survive next to new rows
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "stlm_deploy.cli", "--engine", str(engines["plain"]), str(d),
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "scores.csv").is_file() and len(_csv(out)) >= 5:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "stlm-infer finished before it could be killed; use more images"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = _csv(out)
    assert 5 <= len(rows) < 150 and not (out / "scores.json").exists()
    assert [Path(r["path"]).name for r in rows] == [f"{i:03d}.png" for i in range(len(rows))]
    assert all(float(r["score"]) > 0 and r["is_anomalous"] == "" for r in rows)  # complete rows only
    assert len(_jsonl(out)) in (len(rows) - 1, len(rows))  # csv row first, then its jsonl line


def test_unexpected_exception_and_out_of_memory_are_one_line_each(engines, tmp_path, monkeypatch):
    from stlm_deploy.batch import collect_inputs, score_files

    d = tmp_path / "imgs"
    for i in range(4):
        _write(d / f"{i}.png", sample_image(64, 64 + i, i))
    files, _ = collect_inputs([str(d)])
    lines: list[str] = []
    with Detector.load(engines["plain"], backend="ort") as det:
        real = det.predict

        def predict(images, bgr=False):
            widths = {im.shape[1] for im in (images if isinstance(images, list) else [images])}
            if 65 in widths:
                raise ZeroDivisionError("division by zero\nin a plugin")
            if 66 in widths:
                raise MemoryError()
            return real(images, bgr=bgr)

        monkeypatch.setattr(det, "predict", predict)
        result = score_files(det, files, tmp_path / "out", batch_size=4, overlays=False, report=lines.append)
    assert [Path(r["path"]).name for r in result.results] == ["0.png", "3.png"]
    assert lines == [f"{d / '1.png'}: unexpected ZeroDivisionError while scoring (division by zero in a plugin); "
                     "skipped", f"{d / '2.png'}: out of memory while scoring; skipped"]


def test_scores_json_is_strict_json_when_a_backend_returns_nan(tmp_path):
    from tests.contract_engine import make_engine

    engine = make_engine(tmp_path / "engines", "poisoned", image_threshold=0.5, nan_on_white=True)
    d = tmp_path / "imgs"
    _write(d / "a.png", sample_image(64, 64, 1))
    _write(d / "white.png", np.full((64, 64, 3), 255, np.uint8))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--engine", str(engine), "--no-overlays", str(d), "--out", str(out)])
    assert r.exit_code == 1  # never a silent "normal": the NaN image is a failure, not a row
    [line] = [ln for ln in r.stderr.splitlines() if "white.png" in ln]
    assert "engine 'poisoned' on backend" in line and "returned NaN" in line and line.endswith("; skipped")
    assert [Path(x["path"]).name for x in _csv(out)] == ["a.png"]
    doc = _strict_json(out / "scores.json")
    assert [Path(f["path"]).name for f in doc["failed"]] == ["white.png"]
    assert "NaN" not in (out / "scores.json").read_text().replace("returned NaN", "")


def test_non_utf8_file_name_does_not_stop_the_run(engines, tmp_path):
    d = tmp_path / "imgs"
    _write(d / "a.png", sample_image(64, 64, 1))
    odd = os.fsdecode(bytes(d) + b"/caf\xe9.png")
    ok, buf = cv2.imencode(".png", sample_image(64, 64, 2))
    Path(odd).write_bytes(buf.tobytes())
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--engine", str(engines["plain"]), "--no-overlays", str(d), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = _csv(out)
    assert len(rows) == 2 and rows[1]["path"].endswith("caf\\udce9.png")
    doc = _strict_json(out / "scores.json")
    assert [os.fsencode(x["path"]) for x in doc["results"]][1].endswith(b"caf\xe9.png")
