"""stlm_deploy.files: the one image-extension list and the atomic writes every package uses."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

import stlm_deploy.cli
import stlm_export.calib
import stlm_train.data.io
from stlm_deploy import files

from .conftest import sample_image


def test_one_image_extension_list_for_training_calibration_and_inference():
    assert stlm_train.data.io.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert stlm_export.calib.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert stlm_deploy.cli.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS


def test_a_webp_is_an_image_everywhere(tmp_path: Path):
    """Once accepted for calibration but ignored as training data: now one answer for all three."""
    from stlm_deploy.batch import collect_inputs

    rgb = sample_image(40, 48, 1)
    assert cv2.imwrite(str(tmp_path / "a.webp"), rgb) and cv2.imwrite(str(tmp_path / "b.png"), rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    names = ["a.webp", "b.png"]
    assert [p.name for p in stlm_train.data.io.list_images(tmp_path)] == names
    assert [p.name for p in stlm_export.calib.find_images(tmp_path)] == names
    assert [p.name for p, _ in collect_inputs([str(tmp_path)])[0]] == names
    assert stlm_train.data.io.read_image_rgb(tmp_path / "a.webp").shape == (40, 48, 3)


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path: Path):
    dest = tmp_path / "sub" / "x.json"
    files.atomic_write_json(dest, {"a": 1})
    assert json.loads(dest.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with files.atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(dest.read_text()) == {"a": 1} and sorted(p.name for p in dest.parent.iterdir()) == ["x.json"]

