"""benchmarks/sharpness.py: the train/test sharpness ratio that motivated the resize policy and the
place of the augmentation (issue 11, cause 3)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from stlm_bench import sharpness


def test_blur_lowers_the_measure_and_the_crop_ignores_the_border():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert sharpness.mean_abs_laplacian(cv2.GaussianBlur(img, (5, 5), 1.5)) < 0.5 * sharpness.mean_abs_laplacian(img)
    framed = np.full((64, 64, 3), 114, np.uint8)
    framed[:4] = 0  # a hard edge only in the border
    assert sharpness.mean_abs_laplacian(framed, 0.7) == 0.0 < sharpness.mean_abs_laplacian(framed)


def test_bundled_sample_rotation_after_the_resize_blurs_training_images(sample_dir, tmp_path, capsys):
    assert sharpness.main(["--data", str(sample_dir), "--draws", "2", "--out-dir", str(tmp_path), "--name", "s"]) == 0
    rows = {(r["resize"], r["augmentation"]): r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert len(rows) == 6
    for policy in ("area", "bilinear"):  # the measured reason for warping at full resolution
        assert rows[(policy, "after the resize")]["ratio_crop_0.7"] > 1.3 > rows[(policy, "before the resize")]["ratio_crop_0.7"]
    assert "| area | before the resize |" in (tmp_path / "s.md").read_text()
    with pytest.raises(SystemExit, match="--augmentation: expected auto or one of"):
        sharpness.main(["--augmentation", "x"])
    with pytest.raises(SystemExit, match="expected good images"):
        sharpness.main(["--data", str(tmp_path), "--out-dir", str(tmp_path)])
    capsys.readouterr()
