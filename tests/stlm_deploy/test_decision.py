"""The decision rule: strict thresholds, normalized score (threshold -> 0.5, span = calibration score range,
fallback 1, clipped to [0, 1])."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stlm_deploy import Detector
from stlm_deploy.errors import SpecError
from stlm_deploy.decision import FALLBACK_SPAN, decide, normalize_scores, normalized_score
from stlm_deploy.spec import SPEC_FILENAME, Thresholds, load_spec
from tests.contract_engine import make_engine, sample_image


def test_formula_clip_and_fallback() -> None:
    t = Thresholds(image=0.6, score_min=0.2, score_max=1.0)
    assert normalized_score(0.6, t) == pytest.approx(0.5)
    assert normalized_score(0.8, t) == pytest.approx(0.75)  # (0.8 - 0.6) / 0.8 + 0.5
    assert normalized_score(0.0, t) == pytest.approx(0.0) and normalized_score(5.0, t) == pytest.approx(1.0)
    old = Thresholds(image=0.6)  # stlm.json written before score_min/score_max existed
    assert FALLBACK_SPAN == 1.0 and normalized_score(0.7, old) == pytest.approx(0.6)
    assert normalized_score(0.7, Thresholds()) is None
    assert np.isnan(normalize_scores(np.array([0.1, 0.2]), Thresholds())).all()
    scores = np.linspace(0, 1, 11)
    assert np.all(np.diff(normalize_scores(scores, t)) >= 0)  # order kept


def test_decide_is_strict_and_says_none_without_a_threshold() -> None:
    amap = np.array([[0.2, 0.5], [0.7, 0.5]], np.float32)
    d = decide(0.6, amap, Thresholds(image=0.6, pixel=0.5, score_min=0.2, score_max=1.0))
    assert d.is_anomalous is False and d.normalized_score == pytest.approx(0.5)
    assert d.mask.tolist() == [[False, False], [True, False]]
    assert decide(0.61, amap, Thresholds(image=0.6)).is_anomalous is True
    assert decide(0.61, None, Thresholds(image=0.6, pixel=0.5)).mask is None  # a server answer without a map
    assert decide(0.9, amap, Thresholds()) == (None, None, None)


def test_spec_round_trip_and_validation(tmp_path: Path) -> None:
    d = make_engine(tmp_path, "e", image_threshold=0.5, score_range=(0.25, 0.75))
    t = load_spec(d).thresholds
    assert (t.score_min, t.score_max) == (0.25, 0.75)
    data = json.loads((d / SPEC_FILENAME).read_text())
    data["thresholds"]["score_max"] = 0.25
    (d / SPEC_FILENAME).write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"thresholds.score_max' must be greater than score_min"):
        load_spec(d)
    del data["thresholds"]["score_max"]
    (d / SPEC_FILENAME).write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"thresholds.score_max' must be given together"):
        load_spec(d)
    old = make_engine(tmp_path, "old", image_threshold=0.5)
    assert "score_min" not in json.loads((old / SPEC_FILENAME).read_text())["thresholds"]  # older files unchanged


def test_detector_prediction_keeps_raw_score(tmp_path: Path) -> None:
    d = make_engine(tmp_path, "e", image_threshold=0.5, score_range=(0.3, 0.9))
    with Detector.load(d, backend="ort") as det:
        p = det.predict(sample_image(70, 90, 3))
    assert p.normalized_score == pytest.approx(min(1.0, max(0.0, (p.score - 0.5) / 0.6 + 0.5)), abs=1e-6)
    assert p.is_anomalous == (p.normalized_score > 0.5)
