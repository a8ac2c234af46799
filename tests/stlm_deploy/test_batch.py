"""stlm_deploy.batch: the library behind stlm-infer, called directly (per-file fault isolation, outputs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stlm_deploy import DeployError, Detector
from stlm_deploy.batch import collect_inputs, score_files, write_scores

from .conftest import reference, sample_image


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_score_files_isolates_failures_and_writes_outputs(engines, tmp_path: Path, batch_size: int):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rgbs = {"a": sample_image(70, 90, 1), "sub/b": sample_image(64, 64, 2), "c": sample_image(50, 40, 3)}
    for key, rgb in rgbs.items():
        assert cv2.imwrite(str(src / f"{key}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (src / "broken.png").write_bytes(b"not a png")
    files, problems = collect_inputs([str(src)])
    assert problems == [] and [k for _, k in files] == ["a", "broken", "c", "sub/b"]
    lines: list[str] = []
    done: list[int] = []
    out = tmp_path / "out"
    with Detector.load(engines["fused"], backend="ort") as det:
        result = score_files(det, files, out, batch_size=batch_size, save_maps=True, report=lines.append,
                             progress=done.append)
        write_scores(out, det, result)
    assert sum(done) == 4 and len(result.failed) == 1 and result.failed[0]["path"].endswith("broken.png")
    assert len(lines) == 1 and lines[0].endswith("broken.png: cannot decode as an image (unsupported format, "
                                                 "empty or corrupt file); skipped")
    _, want = reference(list(rgbs.values()))
    got = {Path(r["path"]).relative_to(src).with_suffix("").as_posix(): r["score"] for r in result.results}
    assert got == pytest.approx(dict(zip(rgbs, want)), abs=1e-6)
    for key in rgbs:
        assert (out / "overlays" / f"{key}.png").is_file()
        assert np.load(out / "maps" / f"{key}.npy").shape == rgbs[key].shape[:2]
    with open(out / "scores.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert json.loads((out / "scores.json").read_text())["failed"] == result.failed


def test_pixel_cap_is_a_detector_and_score_files_option(engines, tmp_path: Path):
    src = tmp_path / "in"
    src.mkdir()
    for name, (h, w) in {"small": (40, 50), "large": (80, 100)}.items():  # 2,000 and 8,000 pixels
        assert cv2.imwrite(str(src / f"{name}.png"), sample_image(h, w, 1))
    files, _ = collect_inputs([str(src)])
    with Detector.load(engines["plain"], backend="ort") as det:
        assert det.max_pixels == 64_000_000 and det.info()["max_pixels"] == 64_000_000
        assert len(score_files(det, files, tmp_path / "a", overlays=False).results) == 2
        r = score_files(det, files, tmp_path / "b", overlays=False, max_pixels=5000)
        assert [Path(x["path"]).name for x in r.results] == ["small.png"]
        assert "large.png: image is too large to decode (100x80 = 8,000 pixels, limit 5,000" in r.failed[0]["error"]
    with Detector.load(engines["plain"], backend="ort", max_pixels=5000) as det:  # the detector's cap is the default
        r = score_files(det, files, tmp_path / "c", overlays=False)
        assert [Path(x["path"]).name for x in r.results] == ["small.png"] and len(r.failed) == 1
        assert len(score_files(det, files, tmp_path / "d", overlays=False, max_pixels=None).results) == 2
    with pytest.raises(DeployError, match="max_pixels: expected a pixel count"):
        Detector.load(engines["plain"], backend="ort", max_pixels=-1)
