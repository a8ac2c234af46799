"""Tiling: the arithmetic of stlm_deploy.tiling against brute force, the stlm.json contract, and tiled Detectors
against the fixture graph's numpy value (map = mean_c(work image) / 255, so the stitched map of any correct
tiling is that map exactly)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from stlm_deploy import Detector, Prediction
from stlm_deploy.errors import SpecError
from stlm_deploy import spec as spec_module
from stlm_deploy.preprocess import resize_map
from stlm_deploy.spec import load_spec, write_spec
from stlm_deploy.tiling import (MAX_TILE_OVERLAP, Stitcher, Tiling, axis_positions, check_tiling, gate_maps,
                                stitch_tiles, topk_mean)

from .conftest import IMG, TOP_K, make_engine, sample_image

WORK = 160  # tiled fixture engines: tiles of IMG = 64 px, long side 160


# ------------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("length, tile, stride, expected", [
    (256, 256, 192, [0]), (448, 256, 192, [0, 192]), (500, 256, 192, [0, 122, 244]),
    (160, 64, 48, [0, 48, 96]), (161, 64, 48, [0, 32, 64, 97]), (65, 64, 48, [0, 1])])
def test_axis_positions_by_hand(length, tile, stride, expected):
    assert axis_positions(length, tile, stride) == expected


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.89])
@pytest.mark.parametrize("length", [64, 65, 100, 127, 160, 333, 1000])
def test_tiles_cover_the_axis_flush_and_overlap_at_least_as_asked(length, overlap):
    t = Tiling(64, 1000, overlap)
    pos = axis_positions(length, 64, t.stride)
    assert pos[0] == 0 and pos[-1] == length - 64 and pos == sorted(set(pos))
    gaps = np.diff(pos)
    assert (gaps <= t.stride).all()  # neighbours share at least overlap * tile pixels
    assert (64 - gaps >= np.floor(64 * overlap) - 1e-9).all()
    if len(pos) > 2:  # evenly spread: gaps differ by at most one pixel
        assert gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize("hw, work, expected", [((400, 300), 512, (512, 384)), ((300, 400), 512, (384, 512)),
                                                ((900, 900), 512, (512, 512)), ((100, 1000), 512, (256, 512)),
                                                ((5000, 4000), 768, (768, 614)), ((33, 41), 768, (618, 768))])
def test_work_shape_keeps_the_aspect_and_no_side_is_below_the_tile(hw, work, expected):
    assert Tiling(256, work).work_shape(*hw) == expected


@pytest.mark.parametrize("tile, work, overlap, blend, field", [
    (256, 128, 0.25, "mean", "work_size"), (256, 512, 0.9, "mean", "tile_overlap"),
    (256, 512, -0.1, "mean", "tile_overlap"), (256, 512, float("nan"), "mean", "tile_overlap"),
    (256, 512, 0.25, "max", "tile_blend"), (256, 0, 0.25, "mean", "work_size")])
def test_bad_tilings_are_named(tile, work, overlap, blend, field):
    problems = check_tiling(tile, work, overlap, blend)
    assert len(problems) == 1 and problems[0].startswith(field + ": ")
    with pytest.raises(ValueError, match=field):
        Tiling(tile, work, overlap, blend)
    assert check_tiling(256, 256, 0.0) == [] and check_tiling(256, 512, MAX_TILE_OVERLAP - 1e-6) == []


def test_stitcher_is_the_per_pixel_mean_of_the_covering_tiles():
    t = Tiling(64, 200, 0.3)
    hw = (150, 200)
    grid = t.grid(hw)
    rng = np.random.default_rng(0)
    maps = rng.random((len(grid), 64, 64)).astype(np.float32)
    st = Stitcher(t, hw)
    st.add(grid[:3], maps[:3])  # any chunking gives the same map
    st.add(grid[3:], maps[3:])
    got = st.result()
    expected = np.zeros(hw, np.float32)
    for y in range(hw[0]):  # brute force: every pixel, every tile
        for x in range(0, hw[1], 7):
            vals = [m[y - ty, x - tx] for (ty, tx), m in zip(grid, maps) if ty <= y < ty + 64 and tx <= x < tx + 64]
            expected[y, x] = np.float32(np.mean(np.asarray(vals, np.float64)))
    np.testing.assert_array_equal(got[:, ::7], expected[:, ::7])
    [res] = stitch_tiles({"anomaly_map": maps, "score": np.zeros(len(grid))}, [hw], t, 5)
    np.testing.assert_array_equal(res.maps["anomaly_map"], got)
    assert res.score == topk_mean(got, 5) and res.n_tiles == len(grid)


def test_topk_mean_and_gate_maps():
    m = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert topk_mean(m, 3) == np.float32((11 + 10 + 9) / 7 / 3)
    assert topk_mean(m, 1) == m.max()
    a, b = np.ones((2, 3), np.float32), np.zeros((4, 1), np.float32)
    assert gate_maps([a, a]).shape == (2, 2, 3)
    assert gate_maps([a, b]).shape == (1, 1, 10)


# ------------------------------------------------------------------------------------------- stlm.json
@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    return {"plain": make_engine(root, "tiled", work_size=WORK, with_tlm=True, image_threshold=0.5, pixel_threshold=0.6),
            "fixed": make_engine(root, "tiled_fixed", work_size=WORK, batch=2),
            "unfused": make_engine(root, "tiled_unfused", work_size=WORK, fused=False, openvino_ir=True)}


def test_tiled_engines_are_format_version_2_untiled_stay_1(tiled, engines):
    data = json.loads((tiled["plain"] / "stlm.json").read_text())
    assert data["format_version"] == 2
    assert {k: data["preprocessing"][k] for k in ("work_size", "tile_overlap", "tile_blend")} == \
        {"work_size": WORK, "tile_overlap": 0.25, "tile_blend": "mean"}
    plain = json.loads((engines["plain"] / "stlm.json").read_text())
    assert plain["format_version"] == 1 and "work_size" not in plain["preprocessing"]
    assert load_spec(tiled["plain"]).tiling == Tiling(IMG, WORK, 0.25)


def test_an_older_reader_refuses_a_tiled_engine_by_its_version(tiled, engines, monkeypatch):
    monkeypatch.setattr(spec_module, "FORMAT_VERSION", 1)  # what every reader before tiling checks against
    with pytest.raises(SpecError, match=r"field 'format_version' is 2, newer than this runtime supports \(1\)"):
        load_spec(tiled["plain"])
    load_spec(engines["plain"])  # untiled engines still load


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["preprocessing"].update(work_size=32), r"field 'preprocessing.work_size' must be at least the tile "
                                                        r"size 64"),
    (lambda d: d["preprocessing"].update(tile_overlap=0.95), r"field 'preprocessing.tile_overlap' must be a number in "
                                                             r"\[0, 0.9\), got 0.95"),
    (lambda d: d["preprocessing"].update(tile_blend="max"), r"field 'preprocessing.tile_blend' must be one of 'mean'"),
    (lambda d: d["preprocessing"].pop("tile_overlap"), r"field 'preprocessing.tile_overlap' is missing"),
    (lambda d: d["preprocessing"].pop("work_size"), r"field 'preprocessing.work_size' must be given with "
                                                    r"tile_overlap, tile_blend"),
    (lambda d: d.update(format_version=1), r"field 'format_version' must be 2 or more for a tiled engine"),
    (lambda d: d.update(format_version=3), r"field 'format_version' is 3, newer than this runtime supports \(2\)"),
])
def test_bad_tiling_fields_are_one_line_errors(tiled, tmp_path, edit, message):
    data = json.loads((tiled["plain"] / "stlm.json").read_text())
    edit(data)
    (tmp_path / "stlm.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=message) as e:
        load_spec(tmp_path)
    assert "\n" not in str(e.value) and "stlm.json" in str(e.value)


def test_set_tiling_round_trips_and_untiles(tiled, tmp_path):
    spec = load_spec(tiled["plain"])
    spec.set_tiling(None)
    assert spec.format_version == 1 and "work_size" not in spec.to_dict()["preprocessing"]
    spec.set_tiling(Tiling(IMG, 640, 0.5))
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path).tiling == Tiling(IMG, 640, 0.5)


# ------------------------------------------------------------------------------------------- Detector
def expected_tiled(image: np.ndarray, work: int = WORK) -> tuple[np.ndarray, float, np.ndarray]:
    """(map at the image size, score, work map) of the fixture graph on a tiled engine, by numpy alone."""
    h, w = image.shape[:2]
    wh, ww = Tiling(IMG, work).work_shape(h, w)
    flag = cv2.INTER_AREA if (wh <= h and ww <= w) else cv2.INTER_LINEAR
    small = cv2.resize(image, (ww, wh), interpolation=flag) if (wh, ww) != (h, w) else image
    m = small.astype(np.float32).mean(axis=2) / 255.0
    score = float(np.sort(m.ravel())[-TOP_K:].astype(np.float64).mean())
    return resize_map(m, (h, w)), score, m


SIZES = [(400, 300), (64, 64), (90, 500), (160, 160), (37, 53)]


@pytest.mark.parametrize("name, backend", [("plain", "ort"), ("fixed", "ort"), ("unfused", "openvino")])
def test_tiled_detector_returns_the_stitched_map_at_the_image_size(tiled, name, backend):
    det = Detector.load(tiled[name], backend=backend, precision="fp32" if backend == "openvino" else None)
    imgs = [sample_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    preds = det.predict(imgs)
    for p, im in zip(preds, imgs):
        m, score, work = expected_tiled(im)
        assert isinstance(p, Prediction) and p.anomaly_map.shape == im.shape[:2]
        np.testing.assert_allclose(p.anomaly_map, m, atol=1e-5)
        assert abs(p.score - score) < 1e-5
        assert p.n_tiles == len(Tiling(IMG, WORK).grid(work.shape))
    assert preds[0].n_tiles > 1 and det.info()["tiling"] == {"work_size": WORK, "tile_overlap": 0.25,
                                                             "tile_blend": "mean"}
    det.close()


def test_tiled_extras_thresholds_and_bgr(tiled):
    det = Detector.load(tiled["plain"], backend="ort")
    im = sample_image(300, 220, seed=3)
    p = det.predict(im[:, :, ::-1].copy(), bgr=True)
    m, score, _ = expected_tiled(im)
    np.testing.assert_allclose(p.anomaly_map, m, atol=1e-5)
    np.testing.assert_allclose(p.tlm_map, 1.0 - m, atol=1e-5)  # every per-pixel output is stitched
    assert p.is_anomalous == (p.score > 0.5) and np.array_equal(p.mask, p.anomaly_map > 0.6)
    det.close()


def test_tiles_run_in_bounded_chunks(tiled):
    det = Detector.load(tiled["plain"], backend="ort", batch_size=3)
    seen: list[int] = []
    infer = det.backend.infer

    def spy(feeds):
        seen.append(next(iter(feeds.values())).shape[0])
        return infer(feeds)

    det.backend.infer = spy
    p = det.predict(sample_image(400, 300, seed=1))
    assert sum(seen) == p.n_tiles and max(seen) == 3 and len(seen) == -(-p.n_tiles // 3)
    det.close()


def test_stlm_infer_scores_a_tiled_engine_like_the_detector(tiled, tmp_path):
    import csv

    from click.testing import CliRunner

    from stlm_deploy.cli import main

    imgs = {f"im{i}.png": sample_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:3])}
    for name, im in imgs.items():
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--engine", str(tiled["plain"]), "--backend", "ort", "--save-maps",
                                  *(str(tmp_path / n) for n in imgs), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with open(out / "scores.csv", newline="") as f:
        rows = {p["path"].rsplit("/", 1)[-1]: float(p["score"]) for p in csv.DictReader(f)}
    for name, im in imgs.items():
        assert abs(rows[name] - expected_tiled(im)[1]) < 1e-5
