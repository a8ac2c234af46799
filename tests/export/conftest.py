"""Fixtures for the export tests (the shared model/engine fixtures live in tests/conftest.py)."""
from __future__ import annotations

import pytest


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


