"""Threshold targets: each rule keeps its promise on the scores it was chosen on, and refuses data it cannot use."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stlm_deploy.thresholds import ThresholdError, choose_threshold, parse_target

scores = st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=1, max_size=40)
rates = st.floats(0, 0.95)


def test_parse_target_forms_and_errors():
    assert str(parse_target("F1")) == "f1"
    assert str(parse_target("fpr<=0.05")) == "fpr<=0.05"
    assert parse_target("fnr=10%").rate == pytest.approx(0.1)
    assert parse_target("fpr:0").rate == 0.0
    for bad in ("auc", "fpr<=1.5", "fnr<=", "fpr>=0.1"):
        with pytest.raises(ThresholdError, match="--target"):
            parse_target(bad)


def test_known_values():
    good, bad = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6])
    c = choose_threshold(good, bad, "f1")
    assert c.threshold == pytest.approx(0.325) and c.f1 == pytest.approx(6 / 7) and c.fnr == 0.0
    assert choose_threshold(good, bad, "fpr<=0").threshold == 0.4  # the highest good score: none flagged
    assert choose_threshold(good, bad, "fpr<=0.25").threshold == 0.3  # one good image of four may be flagged
    assert choose_threshold(good, bad, "fnr<=0.34").threshold == pytest.approx(0.45)  # one miss allowed


@settings(max_examples=200, deadline=None)
@given(scores, scores, rates)
def test_rates_are_kept(good, bad, rate):
    g, b = np.asarray(good), np.asarray(bad)
    fpr = choose_threshold(g, None, f"fpr<={rate}")
    assert fpr.fpr <= rate + 1e-12 and fpr.n_defective == 0
    fnr = choose_threshold(g, b, f"fnr<={rate}")
    assert fnr.fnr <= rate + 1e-12
    f1 = choose_threshold(g, b, "f1")
    # no other cut between observed scores does better
    cuts = np.unique(np.concatenate([g, b, g - 1e-6, b - 1e-6]))
    best = max(2 * (b > t).sum() / max(2 * (b > t).sum() + (g > t).sum() + (b <= t).sum(), 1) for t in cuts)
    assert f1.f1 >= best - 1e-9


def test_good_images_only_never_floods_the_line():
    """A max-false-alarm target on good images only is judged on them alone: the threshold stays at the top of
    the good scores, not at the lowest score (a line without defective samples yet)."""
    good = np.linspace(0.2, 0.3, 50)
    c = choose_threshold(good, [], "fpr<=0.02")
    assert c.fpr <= 0.02 and c.threshold >= np.quantile(good, 0.97)


@pytest.mark.parametrize("target,good,bad,needle", [
    ("f1", [0.1], [], "needs defective images"),
    ("fnr<=0.1", [0.1], [], "needs defective images"),
    ("f1", [], [0.5], "needs good images"),
    ("fpr<=0.1", [], [0.5], "needs good images"),
])
def test_missing_class_is_one_line(target, good, bad, needle):
    with pytest.raises(ThresholdError, match=needle) as e:
        choose_threshold(good, bad, target)
    assert "\n" not in str(e.value)
