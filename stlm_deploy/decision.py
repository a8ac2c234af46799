"""The one decision rule: (image score, anomaly map, :class:`~stlm_deploy.spec.Thresholds`) -> is_anomalous,
mask and normalized score. The Detector, the remote client (stlm-infer --url) and the server (stlm-serve)
all decide here, so a result means the same thing wherever it was computed.

    is_anomalous = score > thresholds.image          (strict; None without an image threshold)
    mask         = anomaly_map > thresholds.pixel    (strict; None without a pixel threshold)
    normalized   = clip((score - threshold) / (score_max - score_min) + 0.5, 0, 1)

``score_min``/``score_max`` are the lowest/highest image scores seen at calibration (held-out good
images and their pseudo-anomalous versions, recorded by stlm-train and copied into stlm.json's
``thresholds`` by stlm-export). Anomalib users know this convention: 0.5 is the decision boundary
whatever the model, so dashboards and alarms need not know each engine's raw scale.

Older engine directories without ``score_min``/``score_max``: the span falls back to
:data:`FALLBACK_SPAN` = 1, the range of the anomaly map (values in [0, 1], so scores too); the
threshold still maps to 0.5 and the order of scores is kept. Engines without an image threshold
have no normalized score (None; NaN on the server, where the output is a tensor).
The C++ runtime (``stlm_deploy/cpp/src/detector.cpp``) implements the same formula and fallback.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .spec import Thresholds

__all__ = ["FALLBACK_SPAN", "Decision", "decide", "score_span", "normalized_score", "normalize_scores"]

#: span used when stlm.json does not record score_min/score_max (engines exported before they existed)
FALLBACK_SPAN = 1.0


def score_span(thresholds: "Thresholds") -> float:
    """``score_max - score_min`` from calibration, else :data:`FALLBACK_SPAN`."""
    lo, hi = thresholds.score_min, thresholds.score_max
    if lo is None or hi is None or not hi > lo:
        return FALLBACK_SPAN
    return float(hi) - float(lo)


def normalize_scores(scores: np.ndarray, thresholds: "Thresholds") -> np.ndarray:
    """float32 normalized scores for an array of raw scores (NaN everywhere when there is no threshold)."""
    s = np.asarray(scores, dtype=np.float64)
    if thresholds.image is None:
        return np.full(s.shape, np.nan, dtype=np.float32)
    out = np.clip((s - float(thresholds.image)) / score_span(thresholds) + 0.5, 0.0, 1.0)
    return out.astype(np.float32)


def normalized_score(score: float, thresholds: "Thresholds") -> float | None:
    """One raw score -> its normalized score in [0, 1], or None when the engine has no image threshold."""
    if thresholds.image is None:
        return None
    return float(normalize_scores(np.asarray([score]), thresholds)[0])


class Decision(NamedTuple):
    """What the thresholds say about one image (field names are those of ``Prediction``)."""

    is_anomalous: bool | None
    mask: np.ndarray | None
    normalized_score: float | None


def decide(score: float, anomaly_map: np.ndarray | None, thresholds: "Thresholds") -> Decision:
    """The decision for one image; ``anomaly_map`` None (a server answer without a map): no mask."""
    t_img, t_pix = thresholds.image, thresholds.pixel
    return Decision(is_anomalous=None if t_img is None else bool(score > t_img),
                    mask=None if t_pix is None or anomaly_map is None else anomaly_map > t_pix,
                    normalized_score=normalized_score(score, thresholds))
