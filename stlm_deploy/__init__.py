"""stlm-deploy runtime: run exported STLM engines without PyTorch.

>>> from stlm_deploy import Detector
>>> det = Detector.load("engines/bottle", backend="auto")
>>> pred = det.predict(image_rgb_uint8)   # pred.score, pred.anomaly_map, pred.is_anomalous
"""
from __future__ import annotations

from .detector import Detector, Prediction
from .errors import BackendUnavailable, DeployError, InputError, NonFiniteOutput, SpecError
from .spec import EngineSpec, load_spec, write_spec

__all__ = ["Detector", "Prediction", "EngineSpec", "load_spec", "write_spec", "DeployError", "SpecError",
           "InputError", "BackendUnavailable", "NonFiniteOutput"]
