"""Tiny REAL engines for the runtime tests.

The fixture graph obeys the fused-graph contract with trivially checkable numbers:
``anomaly_map = mean_c(image) / 255`` (so it is in [0, 1]) and ``score = mean(top_k(anomaly_map))``;
the unfused variant takes the normalised NCHW float input and undoes ``(x - mean) / std`` first, so
both variants must give the same numbers once the runtime normalises correctly.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from tests.contract_engine import IMG, OPSET, TOP_K, build_onnx, make_engine, sample_image  # noqa: F401 (re-exported)


def reference(images: list[np.ndarray], img_size: int = IMG, top_k: int = TOP_K,
              bgr: bool = False) -> tuple[list[np.ndarray], list[float]]:
    """What the runtime must return for the fixture graph, computed with numpy + the documented resize
    (the fixture engines are written with the default ``area`` policy: INTER_AREA when shrinking both
    sides, INTER_LINEAR otherwise)."""
    maps, scores = [], []
    for im in images:
        rgb = cv2.cvtColor(im, cv2.COLOR_BGR2RGB) if bgr else im
        shrinking = rgb.shape[0] >= img_size and rgb.shape[1] >= img_size
        flag = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        small = cv2.resize(rgb, (img_size, img_size), interpolation=flag) \
            if rgb.shape[:2] != (img_size, img_size) else rgb
        m = small.astype(np.float32).mean(axis=2) / 255.0
        scores.append(float(np.sort(m.ravel())[-top_k:].mean()))
        hh, ww = im.shape[:2]
        maps.append(m if (hh, ww) == (img_size, img_size) else
                    cv2.resize(m, (ww, hh), interpolation=cv2.INTER_LINEAR))
    return maps, scores


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only engines shared by the session (copy before modifying: see ``engine_copy``)."""
    root = tmp_path_factory.mktemp("engines")
    return {
        "fused": make_engine(root, "fused", fp16=True, openvino_ir=True, with_tlm=True,
                             image_threshold=0.5, pixel_threshold=0.6),
        "plain": make_engine(root, "plain"),
        "unfused": make_engine(root, "unfused", fused=False),
        "fixed": make_engine(root, "fixed", batch=2),
    }


@pytest.fixture
def engine_copy(engines: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a session engine that a test may tamper with."""
    def copy(name: str) -> Path:
        dst = tmp_path / "engines" / name
        shutil.copytree(engines[name], dst)
        return dst
    return copy
