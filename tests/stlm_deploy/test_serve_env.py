"""Pure parts of stlm-serve (no server): the libpython fix and the inference callable's request handling."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from stlm_deploy import Detector
from stlm_deploy.errors import DeployError
from stlm_deploy.serving.server import DetectorModel, python_library_env
from tests.contract_engine import make_engine, sample_image


def test_libdir_goes_first_once() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    env = python_library_env({"LD_LIBRARY_PATH": f"/opt/x{os.pathsep}{libdir}"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/x"]
    assert python_library_env({})["LD_LIBRARY_PATH"] == libdir


def test_callable_splits_a_dynamic_batch_back_per_request(tmp_path: Path) -> None:
    d = make_engine(tmp_path, "e", image_threshold=0.5, score_range=(0.3, 0.9))
    with Detector.load(d, backend="ort") as det:
        model = DetectorModel(det)
        a = np.stack([sample_image(40, 50, 1), sample_image(40, 50, 2)])
        b = sample_image(60, 30, 3)[None]
        reqs = [SimpleNamespace(data={"image": a}, requested_output_names=["score", "anomaly_map"]),
                SimpleNamespace(data={"image": b}, requested_output_names=["score", "is_anomalous"])]
        out = model(reqs)
        ref = det.predict([*a, b[0]])
        assert out[0]["score"].shape == (2, 1) and out[0]["anomaly_map"].shape == (2, 40, 50)
        assert "anomaly_map" not in out[1]  # not requested: never computed into the response
        got = np.concatenate([out[0]["score"], out[1]["score"]]).ravel()
        np.testing.assert_allclose(got, [p.score for p in ref], atol=1e-6)
        with pytest.raises(DeployError, match="no input"):
            model([SimpleNamespace(data={}, requested_output_names=["score"])])
        with pytest.raises(DeployError, match=r"must be UINT8 \[N,H,W,3\]"):
            model([SimpleNamespace(data={"image": a[..., :2]}, requested_output_names=["score"])])
