"""The C++ runtime (stlm_deploy/cpp) against the Python runtime: same scores, maps and decisions.

Builds the library + ``stlm_infer_cpp`` once per session (``build.sh``), runs the app on generated PNGs of
several sizes and on the bundled real MVTec sample, and compares with ``stlm_deploy.Detector`` on the
same engine and backend (OpenVINO, fp32): max |Δscore| and max |Δmap| must be <= 1e-4 (measured: 0 and
~6e-8). Also checks every documented failure: one stderr line, exit code != 0, other images processed.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import IMG, TOP_K, CppBuild, sample_image

TOL = 1e-4
SIZES = [(64, 64), (80, 100), (200, 300), (37, 53), (480, 640)]  # (H, W): equal, up, down, odd, wide


def run_app(build: CppBuild, *args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.app), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def write_images(folder: Path, sizes=SIZES, gray: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"gen_{h}x{w}.png"
        cv2.imwrite(str(p), cv2.cvtColor(sample_image(h, w, seed=i), cv2.COLOR_RGB2BGR))
        paths.append(p)
    if gray:  # a 1-channel PNG: both runtimes read it with IMREAD_COLOR (gray -> BGR)
        p = folder / "gen_gray_90x70.png"
        cv2.imwrite(str(p), cv2.cvtColor(sample_image(90, 70, seed=9), cv2.COLOR_RGB2GRAY))
        paths.append(p)
    return paths


def analytic(bgr: np.ndarray) -> float:
    """The fixture graph's score computed with numpy (independent of both runtimes)."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    # the fixture engines use the default "area" policy: INTER_AREA when shrinking both sides, else INTER_LINEAR
    flag = cv2.INTER_AREA if rgb.shape[0] >= IMG and rgb.shape[1] >= IMG else cv2.INTER_LINEAR
    small = rgb if rgb.shape[:2] == (IMG, IMG) else cv2.resize(rgb, (IMG, IMG), interpolation=flag)
    m = small.astype(np.float32).mean(axis=2) / 255.0
    return float(np.sort(m.ravel())[-TOP_K:].mean())


def compare_with_python(build: CppBuild, engine: Path, images: list[Path], tmp: Path, backend: str = "openvino",
                        extra: tuple[str, ...] = (), analytic_tol: float = 1e-5) -> dict[str, float]:
    """Run the app (--json --save-maps) and the Python Detector on the same files; return the max deltas.

    The C++ score is also checked against the graph's analytic value (``analytic_tol``: float16 inputs
    quantise the normalised image, so they get a looser bound there, never in the C++/Python parity).
    """
    from stlm_deploy import Detector

    maps = tmp / f"maps_{engine.name}_{backend}"
    proc = run_app(build, engine, *images, "--json", "--save-maps", maps, "--backend", backend, *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["backend"] == backend and doc["failed"] == []
    assert [r["path"] for r in doc["results"]] == [str(p) for p in images]
    det = Detector.load(engine, backend=backend, precision="fp32")  # the same backend on the Python side
    d_score = d_map = d_analytic = 0.0
    try:
        for r in doc["results"]:
            bgr = cv2.imread(r["path"], cv2.IMREAD_COLOR)
            ref = det.predict(bgr, bgr=True)
            cmap = np.load(r["map"])
            assert cmap.dtype == np.float32 and cmap.shape == bgr.shape[:2] == (r["height"], r["width"])
            assert ref.anomaly_map.shape == cmap.shape
            d_score = max(d_score, abs(r["score"] - ref.score))
            d_map = max(d_map, float(np.abs(cmap - ref.anomaly_map).max()))
            d_analytic = max(d_analytic, abs(r["score"] - analytic(bgr)))
            assert r["is_anomalous"] == ref.is_anomalous, r["path"]
            if ref.normalized_score is None:
                assert r["normalized_score"] is None
            else:  # same formula and fallback span (engines without score_min/score_max) as the Python runtime
                d_score = max(d_score, abs(r["normalized_score"] - ref.normalized_score))
    finally:
        det.close()
    assert d_score <= TOL, f"max |dscore| {d_score:.3g} > {TOL}"
    assert d_map <= TOL, f"max |dmap| {d_map:.3g} > {TOL}"
    assert d_analytic <= analytic_tol, f"C++ score differs from the analytic value by {d_analytic:.3g}"
    return {"score": d_score, "map": d_map}


# ---------------------------------------------------------------------------------------- the app itself
def test_help_and_compiled_backends(cpp_build: CppBuild) -> None:
    proc = run_app(cpp_build, "--help")
    assert proc.returncode == 0 and "usage: stlm_infer_cpp ENGINE IMAGE..." in proc.stdout
    assert "openvino" in cpp_build.backends
    usage = run_app(cpp_build, "--bogus")
    assert usage.returncode == 2 and len(stderr_lines(usage)) == 1


def test_backend_not_compiled_is_one_line(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    missing = [b for b in ("tensorrt", "ort") if b not in cpp_build.backends]
    if not missing:
        pytest.skip("every backend is compiled into this build")
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, cpp_engines["fused"], img, "--backend", missing[0])
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = stderr_lines(proc)
    assert f"backend '{missing[0]}' is not compiled into this build" in line


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["fused", "unfused", "unfused16", "fixed"])
def test_parity_generated_images(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path, name: str) -> None:
    images = write_images(tmp_path / "imgs")
    compare_with_python(cpp_build, cpp_engines[name], images, tmp_path,
                        analytic_tol=5e-4 if name == "unfused16" else 1e-5)


def test_parity_other_compiled_backends(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    others = [b for b in cpp_build.backends if b == "ort"]  # tensorrt needs a plan (GPU export), not built here
    if not others:
        pytest.skip("ONNX Runtime backend not compiled (configure with -DONNXRUNTIME_ROOT=...)")
    images = write_images(tmp_path / "imgs")
    for backend in others:
        compare_with_python(cpp_build, cpp_engines["fused"], images, tmp_path, backend=backend)


def test_parity_real_mvtec_sample(cpp_build: CppBuild, cpp_engines: dict[str, Path], sample_dir: Path,
                                  tmp_path: Path) -> None:
    images = sorted((sample_dir / "test").glob("*/*.png"))
    if not images:
        pytest.skip(f"no test/*/*.png under {sample_dir}")
    deltas = compare_with_python(cpp_build, cpp_engines["fused"], images, tmp_path)
    assert deltas["score"] <= TOL and deltas["map"] <= TOL


def test_text_output_and_decisions(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    from stlm_deploy import Detector

    images = write_images(tmp_path / "imgs", gray=False)
    proc = run_app(cpp_build, cpp_engines["fused"], *images)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == len(images)
    with Detector.load(cpp_engines["fused"], backend="openvino", precision="fp32") as det:
        for line, path in zip(lines, images):
            p, score, decision, normalized = line.split(" ")
            ref = det.predict(cv2.imread(str(path)), bgr=True)
            assert p == str(path) and abs(float(score) - ref.score) < 1e-6
            assert abs(float(normalized) - ref.normalized_score) < 1e-6
            assert decision == ("anomalous" if ref.is_anomalous else "normal")
    uncalibrated = run_app(cpp_build, cpp_engines["fixed"], images[0])  # thresholds.image is null
    assert uncalibrated.returncode == 0 and uncalibrated.stdout.split()[-1] == "none"


def test_artifact_path_as_engine(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    [img] = write_images(tmp_path, [(100, 80)], gray=False)
    via_dir = run_app(cpp_build, cpp_engines["fused"], img, "--json")
    via_xml = run_app(cpp_build, cpp_engines["fused"] / "openvino" / "model.xml", img, "--json")
    assert via_dir.returncode == via_xml.returncode == 0
    a, b = json.loads(via_dir.stdout), json.loads(via_xml.stdout)
    assert b["artifact"] == "openvino/model.xml"
    assert a["results"][0]["score"] == b["results"][0]["score"]


def test_overlays_match_python(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    from stlm_deploy import Detector
    from stlm_deploy.visualize import overlay

    images = write_images(tmp_path / "imgs", [(200, 300), (480, 640)], gray=False)
    out = tmp_path / "overlays"
    proc = run_app(cpp_build, cpp_engines["fused"], *images, "--out", out)
    assert proc.returncode == 0, proc.stderr
    with Detector.load(cpp_engines["fused"], backend="openvino", precision="fp32") as det:
        for path in images:
            written = cv2.imread(str(out / f"{path.stem}.png"))
            bgr = cv2.imread(str(path))
            assert written is not None and written.shape == bgr.shape
            pred = det.predict(bgr, bgr=True)
            ref = cv2.cvtColor(overlay(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pred.anomaly_map,
                                       threshold=det.spec.thresholds.pixel), cv2.COLOR_RGB2BGR)
            diff = np.abs(written.astype(np.int16) - ref)
            # heat-map rounding of 1-ulp map differences may move a few pixels by 1-2 levels
            assert diff.max() <= 3 and (diff > 0).mean() < 1e-3
            assert (written == 255).all(axis=2).any()  # the white defect outline is drawn (pixel threshold set)


def test_bench_reports_median_latency(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    images = write_images(tmp_path, [(200, 300)], gray=False)
    text = run_app(cpp_build, cpp_engines["fused"], *images, "--bench", "5")
    assert text.returncode == 0 and text.stdout.strip().endswith("ms")
    doc = json.loads(run_app(cpp_build, cpp_engines["fused"], *images, "--bench", "5", "--json").stdout)
    lat = doc["results"][0]["latency_ms"]
    assert lat["runs"] == 5 and lat["median"] > 0


# ------------------------------------------------------------------------------------------ failures
def test_missing_engine_dir(cpp_build: CppBuild, tmp_path: Path) -> None:
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, tmp_path / "no_such_engine", img)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = stderr_lines(proc)
    assert "no_such_engine: no such engine directory or file" in line


def test_missing_image_others_processed(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    good = write_images(tmp_path, [(64, 64), (80, 100)], gray=False)
    missing = tmp_path / "missing.png"
    proc = run_app(cpp_build, cpp_engines["fused"], good[0], missing, good[1])
    assert proc.returncode == 1
    assert [ln.split(" ")[0] for ln in proc.stdout.splitlines()] == [str(good[0]), str(good[1])]
    [line] = stderr_lines(proc)
    assert line.startswith(f"{missing}: no such file or directory")


def test_unreadable_image_others_processed(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    [good] = write_images(tmp_path, [(64, 64)], gray=False)
    bad = tmp_path / "text.png"
    bad.write_text("this is not a PNG\n")
    proc = run_app(cpp_build, cpp_engines["fused"], bad, good, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [r["path"] for r in doc["results"]] == [str(good)]
    assert doc["failed"][0]["path"] == str(bad)
    [line] = stderr_lines(proc)
    assert line.startswith(f"{bad}: cannot decode as an image")


@pytest.mark.parametrize("victim", ["openvino/model.bin", "openvino/model.xml"])
def test_checksum_mismatch(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path, victim: str) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    with open(engine / victim, "ab") as f:
        f.write(b"\n" if victim.endswith(".xml") else b"\0")
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = stderr_lines(proc)
    assert f"{victim}: sha256 mismatch" in line and "modified after export" in line
    assert run_app(cpp_build, engine, img, "--no-verify").returncode == 0  # the check is what stopped it


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d.update(format_version=3), "field 'format_version' is 3, newer than this runtime supports (2)"),
    (lambda d: d.update(format="something-else"), "field 'format' must be 'stlm-engine'"),
    (lambda d: d.update(img_size=100), "field 'img_size' must be a positive multiple of 64"),
    (lambda d: d["artifacts"]["openvino/model.xml"].update(sha256="xyz"), "must be 64 lowercase hex digits"),
    (lambda d: d["input"].update(dtype="float32"), "field 'input.dtype' must be \"uint8\""),
    (None, "not valid JSON"),
])
def test_mismatched_engine(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path, edit, expected) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    spec_path = engine / "stlm.json"
    if edit is None:
        spec_path.write_text("{\"format\": \"stlm-engine\",\n")
    else:
        data = json.loads(spec_path.read_text())
        edit(data)
        spec_path.write_text(json.dumps(data, indent=2))
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = stderr_lines(proc)
    assert "stlm.json" in line and expected in line, line


def test_missing_artifact_file(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    (engine / "openvino" / "model.bin").unlink()
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    assert proc.returncode == 1
    [line] = stderr_lines(proc)
    assert "openvino/model.bin: listed in stlm.json but missing" in line


# ---------------------------------------------------------------- issue 12: never a silent "normal", valid JSON
@pytest.mark.parametrize("old, new, field, shown", [
    ('"image": 0.74', '"image": NaN', "thresholds.image", "NaN"),
    ('"pixel": 0.55', '"pixel": Infinity', "thresholds.pixel", "Infinity"),
    ('"image": 0.74', '"image": 1e999', "thresholds.image", "Infinity"),  # overflows while parsing
    ("57.12", "-Infinity", "preprocessing.std[1]", "-Infinity"),
])
def test_nonfinite_in_stlm_json_is_refused_naming_the_field(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                             tmp_path: Path, old, new, field, shown) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    spec = engine / "stlm.json"
    text = spec.read_text()
    assert old in text
    spec.write_text(text.replace(old, new, 1))
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = stderr_lines(proc)
    assert line.endswith(f"stlm.json: field '{field}' must be a finite number, got {shown}"), line


def test_nan_inside_a_string_is_not_a_number(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    data = json.loads((engine / "stlm.json").read_text())
    data["thresholds"]["method"] = "NaN-free \"Infinity\" check, -Infinity"
    (engine / "stlm.json").write_text(json.dumps(data))
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    assert run_app(cpp_build, engine, img).returncode == 0


def test_nonfinite_output_is_an_error_never_a_normal(cpp_build: CppBuild, tmp_path: Path) -> None:
    from tests.contract_engine import make_engine

    engine = make_engine(tmp_path / "engines", "poisoned", openvino_ir=True, image_threshold=0.5, nan_on_white=True)
    [good] = write_images(tmp_path, [(64, 64)], gray=False)
    white = tmp_path / "white.png"
    cv2.imwrite(str(white), np.full((70, 80, 3), 255, np.uint8))
    proc = run_app(cpp_build, engine, white, good, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [r["path"] for r in doc["results"]] == [str(good)] and doc["results"][0]["is_anomalous"] is not None
    [line] = stderr_lines(proc)
    assert line.startswith(f"{white}: ") and line.endswith("; skipped")
    assert "engine 'poisoned' on backend openvino (precision fp32) returned NaN in output 'anomaly_map'" in line
    assert doc["failed"][0]["path"] == str(white)


def test_json_survives_non_utf8_file_names(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    import os

    folder = tmp_path / "imgs"
    [good] = write_images(folder, [(64, 64)], gray=False)
    odd = os.fsencode(folder) + b"/caf\xe9_\xff.png"
    with open(odd, "wb") as f:
        f.write(good.read_bytes())
    proc = subprocess.run([os.fsencode(cpp_build.app), os.fsencode(cpp_engines["fused"]), odd, good, b"--json"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.decode("utf-8"), parse_constant=lambda t: 1 / 0)  # strict UTF-8 JSON
    paths = [r["path"] for r in doc["results"]]
    assert paths[0].endswith("caf\ufffd_\ufffd.png") and paths[1] == str(good)
    assert doc["results"][0]["score"] == doc["results"][1]["score"]  # the same pixels


def test_chunk_size_follows_the_batch_limit(cpp_build: CppBuild, cpp_engines: dict[str, Path], tmp_path: Path) -> None:
    [img] = write_images(tmp_path, [(64, 64)], gray=False)

    def chunk(engine: Path, *extra: str) -> int:
        proc = run_app(cpp_build, engine, img, "--verbose", *extra)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stderr.split("; chunk ")[1].split()[0])

    assert chunk(cpp_engines["fused"]) == 8          # dynamic engine: default chunk, never the whole list
    assert chunk(cpp_engines["fused"], "--batch-size", "3") == 3
    assert chunk(cpp_engines["fixed"], "--batch-size", "3") == 2  # a fixed batch is the engine's


def test_huge_png_is_refused_from_its_header_and_the_rest_are_processed(cpp_build: CppBuild,
                                                                        cpp_engines: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    from tests.stlm_deploy.test_images import png_header_only

    good = write_images(tmp_path / "imgs", [(64, 64), (80, 100)], gray=False)
    huge = tmp_path / "imgs" / "huge.png"
    huge.write_bytes(png_header_only(40000, 40000))
    proc = run_app(cpp_build, cpp_engines["fused"], good[0], huge, good[1], "--json")
    assert proc.returncode == 1
    assert [r["path"] for r in json.loads(proc.stdout)["results"]] == [str(p) for p in good]
    [line] = stderr_lines(proc)
    assert line == (f"{huge}: image is too large to decode (40000x40000 = 1,600,000,000 pixels, limit 64,000,000; "
                    "raise --max-pixels to allow it); skipped")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp"])
def test_max_pixels_reads_the_header_of_each_format(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                    tmp_path: Path, ext: str) -> None:
    img = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(img), sample_image(37, 53, 1))  # 1,961 pixels
    refused = run_app(cpp_build, cpp_engines["fused"], img, "--max-pixels", "1960")
    assert refused.returncode == 1
    [line] = stderr_lines(refused)
    assert line.startswith(f"{img}: image is too large to decode (53x37 = 1,961 pixels, limit 1,960;")
    assert run_app(cpp_build, cpp_engines["fused"], img, "--max-pixels", "1961").returncode == 0


# ------------------------------------------------------------------- issue 12 item 3: the writer checks every step
def test_a_failed_write_of_a_map_is_one_line_and_never_published(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """A file-size limit makes the write fail: a buffered ofstream only noticed it at close (unchecked), so a
    truncated map was renamed into place and the exit code was 0."""
    [small] = write_images(tmp_path / "imgs", [(20, 20)], gray=False)  # map .npy: 1,728 bytes > the 1,024 limit
    maps = tmp_path / "maps"
    maps.mkdir()
    limited = ['bash', '-c', 'trap "" XFSZ; ulimit -f 1; exec "$@"', "_", str(cpp_build.app)]
    proc = subprocess.run([*limited, str(cpp_engines["fused"]), str(small), "--save-maps", str(maps), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [line] = stderr_lines(proc)
    assert str(maps / "gen_20x20.npy") in line and "cannot write (write: File too large)" in line, line
    assert list(maps.iterdir()) == []  # neither a truncated map nor a temp file is left
    ok = run_app(cpp_build, cpp_engines["fused"], small, "--save-maps", maps)
    assert ok.returncode == 0 and np.load(maps / "gen_20x20.npy").shape == (20, 20)


# --------------------------------------------------------- issue 12 item 7: one default everywhere, results say what ran
def _python_pick(engine: Path) -> tuple[str, str | None, str]:
    from stlm_deploy import Detector

    with Detector.load(engine) as det:  # all defaults, like the app without options
        info = det.info()
    return info["backend"], info["precision"], Path(info["artifact"]).relative_to(engine).as_posix()


@pytest.mark.parametrize("recorded", [None, "bf16", "fp32"])
def test_auto_picks_the_same_backend_and_precision_in_python_and_cpp(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                                     tmp_path: Path, recorded: str | None) -> None:
    """Default settings on the same engine: Python once ran OpenVINO at the device default (bf16 on this CPU)
    while C++ asked for f32. Now both follow the IR's recorded inference_precision (else fp32)."""
    import openvino as ov

    from stlm_deploy.spec import load_spec, write_spec

    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    if recorded:
        spec = load_spec(engine)
        spec.artifacts["openvino/model.xml"].extra["inference_precision"] = recorded
        write_spec(engine, spec)
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    expected = "bf16" if recorded == "bf16" and has_bf16 else "fp32"
    images = write_images(tmp_path / "imgs", [(64, 64), (80, 100)], gray=False)
    proc = run_app(cpp_build, engine, *images, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    cpp = (doc["backend"], doc["precision"], doc["artifact"])
    assert cpp == _python_pick(engine) == ("openvino", expected, "openvino/model.xml")
    assert {(r["backend"], r["precision"]) for r in doc["results"]} == {("openvino", expected)}
    from stlm_deploy import Detector

    with Detector.load(engine) as det:
        preds = [det.predict(cv2.imread(str(p)), bgr=True) for p in images]
    assert [(p.backend, p.precision) for p in preds] == [("openvino", expected)] * 2
    assert max(abs(r["score"] - p.score) for r, p in zip(doc["results"], preds)) <= TOL


def test_a_bad_recorded_inference_precision_is_refused_naming_the_field(cpp_build: CppBuild,
                                                                        cpp_engines: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    from stlm_deploy import Detector
    from stlm_deploy.errors import SpecError

    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    data = json.loads((engine / "stlm.json").read_text())
    data["artifacts"]["openvino/model.xml"]["inference_precision"] = "fp64"
    (engine / "stlm.json").write_text(json.dumps(data))
    [img] = write_images(tmp_path, [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img)
    [line] = stderr_lines(proc)
    field = "field 'artifacts.openvino/model.xml.inference_precision' must be"
    assert proc.returncode == 1 and field in line, line
    with pytest.raises(SpecError, match=re.escape(field)):
        Detector.load(engine)


def test_stfpm_engine_runs_unchanged_and_matches_python(cpp_build: CppBuild, tmp_path: Path) -> None:
    """An STFPM engine (teacher + student in one graph, score = max in-graph) through the same C++ app."""
    pytest.importorskip("torch")
    from stlm_export.pipeline import ExportOptions, export_engine
    from stlm_train import save_checkpoint
    from tests.stlm_train.helpers import built_stfpm

    ckpt = tmp_path / "stfpm_run" / "model.ckpt"
    save_checkpoint(ckpt, built_stfpm(img_size=64), thresholds={"image": 5.0, "pixel": 4.0, "method": "test"})
    engine = export_engine(ExportOptions(ckpt=ckpt, out=tmp_path / "stfpm", target="openvino",
                                         parity_images=2)).engine_dir
    assert json.loads((engine / "stlm.json").read_text())["model_family"] == "stfpm"
    images = write_images(tmp_path / "imgs", SIZES[:3], gray=False)
    # the analytic score belongs to the fixture graphs; here the Python runtime is the reference
    compare_with_python(cpp_build, engine, images, tmp_path, analytic_tol=float("inf"))


def test_int8_ir_parity_with_python(cpp_build: CppBuild, int8_engine, sample_dir: Path, tmp_path: Path):
    """The NNCF INT8 IR is just another IR: --precision int8 picks it, runs its float remainder at the
    recorded inference_precision (as Python does), and matches the Python runtime on the real sample."""
    from stlm_deploy import Detector

    engine, _ = int8_engine
    images = sorted((sample_dir / "test").rglob("*.png"))[:3]
    maps = tmp_path / "maps_int8"
    proc = run_app(cpp_build, engine, *images, "--json", "--save-maps", maps, "--backend", "openvino",
                   "--precision", "int8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["failed"] == [] and doc["precision"] == "int8" and doc["artifact"].endswith("model.int8.xml")
    with Detector.load(engine, backend="openvino", precision="int8") as det:
        assert det.info()["precision"] == "int8"
        for r in doc["results"]:
            bgr = cv2.imread(r["path"], cv2.IMREAD_COLOR)
            ref = det.predict(bgr, bgr=True)
            assert abs(r["score"] - ref.score) <= TOL
            assert float(np.abs(np.load(r["map"]) - ref.anomaly_map).max()) <= TOL


def _timings_record(engine: Path, variants: dict[str, tuple[float, str]]) -> None:
    """ENGINE/timings.json as stlm-bench writes it, for this machine and the default thread count."""
    from stlm_deploy.backends.base import default_threads
    from stlm_deploy.spec import load_spec
    from stlm_deploy.timings import machine_key

    spec = load_spec(engine)
    rec = {"machine": machine_key(), "threads": default_threads(), "batch": 1, "variants": {
        label: {"p50_ms": ms, "artifact": art, "sha256": spec.artifacts[art].sha256}
        for label, (ms, art) in variants.items()}}
    (engine / "timings.json").write_text(json.dumps({"format_version": 1, "records": [rec]}))


def test_auto_follows_the_timings_in_python_and_cpp(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """stlm-bench measured fp32 faster than the gated bf16 on this machine: both runtimes run fp32, and both
    ignore a record of another machine, a stale artifact or a damaged file (the recorded precision again)."""
    from stlm_deploy.spec import load_spec, write_spec
    from stlm_deploy.timings import machine_key

    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    spec = load_spec(engine)
    spec.artifacts["openvino/model.xml"].extra["inference_precision"] = "bf16"
    write_spec(engine, spec)
    [img] = write_images(tmp_path / "imgs", [(64, 64)], gray=False)
    ir = "openvino/model.xml"

    def both() -> tuple[str, str]:
        proc = run_app(cpp_build, engine, img, "--json", "--verbose")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        notes = [ln.split("note: ", 1)[1] for ln in proc.stderr.splitlines() if "note: timings: " in ln]
        assert (doc["backend"], doc["precision"], doc["artifact"]) == _python_pick(engine)
        return doc["precision"], notes[0]

    _timings_record(engine, {"openvino/fp32": (5.0, ir), "openvino/bf16": (9.0, ir)})
    precision, note = both()
    assert precision == "fp32"
    assert note == "timings: openvino/fp32 is the fastest gated variant timed here (5.0 ms p50; openvino/bf16 9.0; " \
                   "timings.json)"
    _timings_record(engine, {"openvino/fp32": (9.0, ir), "openvino/bf16": (5.0, ir)})
    assert both()[1].startswith("timings: openvino/bf16 is the fastest")
    data = json.loads((engine / "timings.json").read_text())
    data["records"][0]["machine"] = "Other CPU [avx2]"
    (engine / "timings.json").write_text(json.dumps(data))
    assert f"no timing for this machine ({machine_key()}," in both()[1]
    (engine / "timings.json").write_text("{broken")
    assert "not readable JSON" in both()[1]


@pytest.mark.parametrize("bf16_gated", [True, False])
def test_auto_follows_the_export_variants_in_python_and_cpp(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                            tmp_path: Path, bf16_gated: bool) -> None:
    """Right after stlm-export (no timings.json) both runtimes run the first gated variant of the static
    preference for this CPU and say so in the same words; 'variants' decides, not the legacy field."""
    import openvino as ov

    from stlm_deploy import Detector
    from stlm_deploy.spec import load_spec, write_spec
    from stlm_deploy.timings import cpu_model_and_flags

    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    spec = load_spec(engine)
    ir = "openvino/model.xml"
    spec.artifacts[ir].extra["inference_precision"] = "fp32"  # what an older runtime would run
    spec.set_variants({"ort/fp32": {"artifact": "model.onnx", "gated": True, "why": "parity"},
                       "openvino/fp32": {"artifact": ir, "gated": True, "why": "parity"},
                       "openvino/bf16": {"artifact": ir, "gated": bf16_gated, "why": "task gate",
                                         "evidence": {"n_images": 10, "sufficient": False}}})
    write_spec(engine, spec)
    [img] = write_images(tmp_path / "imgs", [(64, 64)], gray=False)
    proc = run_app(cpp_build, engine, img, "--json", "--verbose")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    bf16_here = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") and \
        bool(cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"})
    expected = "bf16" if bf16_gated and bf16_here else "fp32"
    assert (doc["backend"], doc["precision"], doc["artifact"]) == _python_pick(engine) == ("openvino", expected, ir)
    cpp_note = next(ln.split("note: ", 1)[1] for ln in proc.stderr.splitlines() if "note: static: " in ln)
    with Detector.load(engine) as det:
        py_note = next(n for n in det.selection_notes if n.startswith("static: "))
    assert cpp_note == py_note and cpp_note.startswith(f"static: openvino/{expected} is the first gated variant")
    assert cpp_note.endswith("; gated on weak evidence (10 images, see stlm.json variants)") == (expected == "bf16")


def test_a_malformed_variants_entry_is_refused_in_cpp_as_in_python(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from tests.stlm_deploy.test_spec import BAD_VARIANTS

    [img] = write_images(tmp_path / "imgs", [(64, 64)], gray=False)
    for i, (value, needle) in enumerate(BAD_VARIANTS):
        engine = tmp_path / f"engine{i}"
        shutil.copytree(cpp_engines["fused"], engine)
        data = json.loads((engine / "stlm.json").read_text())
        data["variants"] = value
        (engine / "stlm.json").write_text(json.dumps(data))
        proc = run_app(cpp_build, engine, img)
        [line] = stderr_lines(proc)
        assert proc.returncode == 1 and line.endswith("stlm.json: " + needle), (needle, line)
