"""Fixtures for the export tests: the ``stlm_export`` import shim, a small randomised model and one
full export (fp32 + fp16 + OpenVINO, with the TLM output) shared by every test that reads an engine."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

try:  # after `pip install -e .` setup.cfg maps stlm_export -> export/
    import stlm_export  # noqa: F401
except ImportError:  # PYTHONPATH=<repo> only: `export` is the package
    sys.modules.setdefault("stlm_export", importlib.import_module("export"))

import torch  # noqa: E402

from stlm_train import STLM, get_config, save_checkpoint  # noqa: E402
from tests.model.helpers import randomize  # noqa: E402

THRESHOLDS = {"image": 0.61, "pixel": 0.7, "method": "held-out good (test fixture)", "tlm_image": 0.2,
              "tlm_pixel": 0.3, "n_images": 2}


@pytest.fixture(scope="session")
def small_stlm() -> STLM:
    """The `small` config at 128 px with seeded non-trivial weights (zero inits hide bugs)."""
    torch.manual_seed(0)
    return randomize(STLM(get_config("small")), 1).eval()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, small_stlm) -> Path:
    """A project checkpoint in a run folder (so the default engine name is the folder's)."""
    path = tmp_path_factory.mktemp("runs") / "bottle" / "model.ckpt"
    save_checkpoint(path, small_stlm, thresholds=dict(THRESHOLDS))
    return path


@pytest.fixture(scope="session")
def small_images():
    """4 parity images at 128 px (the bundled real sample when present, else generated)."""
    from stlm_export.calib import calibration_images

    return calibration_images(None, 128, 4)


@pytest.fixture(scope="session")
def dynamic_export(small_stlm):
    """Default graph (fused pre, dynamic batch, no TLM), simplified, in memory."""
    from stlm_export.onnx_export import export_onnx

    return export_onnx(small_stlm, simplify=True)


@pytest.fixture(scope="session")
def full_engine(tmp_path_factory, small_ckpt):
    """One complete export: model.onnx, model.fp16.onnx, openvino/, parity + Polygraphy files."""
    from stlm_export.pipeline import ExportOptions, export_engine

    out = tmp_path_factory.mktemp("engines") / "bottle"
    return export_engine(ExportOptions(ckpt=small_ckpt, out=out, fp16=True, with_tlm=True, parity_images=6))
