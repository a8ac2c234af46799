"""stlm-export command line: every bad input is one `Error: ...` line and a non-zero exit, never a traceback."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from stlm_export.cli import main
from stlm_export.tensorrt_build import tensorrt_available


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _one_error_line(result) -> str:
    err = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return err[0]


def test_help():
    r = _run(["--help"])
    assert r.exit_code == 0 and "--ckpt" in r.output and "--fp16" in r.output and "--target" in r.output


def test_missing_checkpoint(tmp_path):
    line = _one_error_line(_run(["--ckpt", str(tmp_path / "nope.ckpt")]))
    assert "nope.ckpt" in line and "no such checkpoint file" in line


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"this is not a torch file")
    line = _one_error_line(_run(["--ckpt", str(bad)]))
    assert "junk.pth" in line


@pytest.mark.parametrize("value,needle", [("100", "--img-size: must be a positive multiple of 64"),
                                          ("abc", "'--img-size'")])
def test_bad_img_size(small_ckpt, value, needle):
    assert needle in _one_error_line(_run(["--ckpt", str(small_ckpt), "--img-size", value]))


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_batch(small_ckpt, value):
    assert "--batch" in _one_error_line(_run(["--ckpt", str(small_ckpt), "--batch", value]))


def test_unknown_target(small_ckpt):
    line = _one_error_line(_run(["--ckpt", str(small_ckpt), "--target", "coreml"]))
    assert "--target" in line and "coreml" in line


def test_bad_opset(small_ckpt):
    assert "--opset" in _one_error_line(_run(["--ckpt", str(small_ckpt), "--opset", "13"]))


def test_int8_without_calibration_images(small_ckpt, tmp_path):
    """Checked before anything is exported: an empty folder, and a checkpoint without recorded training data."""
    def last_error(args):
        r = _run(args)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.stderr.strip().splitlines()[-1].startswith("Error: "), r.stderr
        return r.stderr.strip().splitlines()[-1]

    line = last_error(["--ckpt", str(small_ckpt), "--out", str(tmp_path / "e"), "--int8", "--calib-data", str(tmp_path)])
    assert "--calib-data" in line and "no images" in line
    line = last_error(["--ckpt", str(small_ckpt), "--out", str(tmp_path / "e"), "--int8"])
    assert "--int8" in line and "--calib-data" in line
    assert not (tmp_path / "e").exists()


def test_calib_data_must_exist(small_ckpt, tmp_path):
    line = _one_error_line(_run(["--ckpt", str(small_ckpt), "--calib-data", str(tmp_path / "missing")]))
    assert "--calib-data" in line and "missing" in line


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
@pytest.mark.parametrize("target", ["tensorrt"])
def test_tensorrt_without_tensorrt(small_ckpt, target):
    line = _one_error_line(_run(["--ckpt", str(small_ckpt), "--target", target]))
    assert "pip install 'stlm-deploy[trt]'" in line and "GPU" in line


def test_success_prints_the_engine_dir(small_ckpt, tmp_path):
    out = tmp_path / "e"
    r = _run(["--ckpt", str(small_ckpt), "--out", str(out), "--target", "onnx", "--no-verify", "--no-simplify",
              "--no-fuse-pre", "--batch", "dynamic", "--name", "demo"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    spec = json.loads((out / "stlm.json").read_text())
    assert spec["name"] == "demo" and spec["input"]["dtype"] == "float32" and spec["input"]["layout"] == "NCHW"


def test_checkpoint_errors_name_the_file(tmp_path):
    """An official state dict with a key group missing: the error names the file, not '<state dict>'."""
    import torch

    from tests.stlm_train.test_checkpoint import official_layout

    sd = official_layout()
    sd["segmentation_net"] = {k: v for k, v in sd["segmentation_net"].items() if not k.startswith("head.0.aspp")}
    ckpt = tmp_path / "missing_key.pt"
    torch.save(sd, ckpt)
    line = _one_error_line(_run(["--ckpt", str(ckpt), "--img-size", "256"]))
    assert line.startswith(f"Error: {ckpt}: missing keys segmentation_net.head.0.aspp"), line
    assert "<state dict>" not in line
