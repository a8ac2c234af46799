"""Metrics against scikit-learn and against hand-worked AUPRO cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from stlm_train.metrics import (
    aupro,
    compute_metrics,
    f1_max,
    fnr_at_threshold,
    fpr_at_threshold,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pro_curve,
    threshold_from_good,
)


def _random_maps(seed: int = 0, n: int = 6, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n // 2):
        y, x = rng.integers(2, size - 12, 2)
        masks[i, y : y + rng.integers(3, 10), x : x + rng.integers(3, 10)] = 1
        masks[i, size - 3 :, :4] = 1  # a second, small region
    maps = rng.random(masks.shape).astype(np.float32) + 0.6 * masks
    return maps, masks


# ------------------------------------------------------------------------ against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # coarse values -> many ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_and_ap_match_sklearn() -> None:
    maps, masks = _random_maps()
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    coarse = np.round(maps, 1)  # ties
    assert pixel_ap(coarse, masks) == pytest.approx(average_precision_score(y, coarse.ravel()), abs=1e-12)
    # maps with a channel axis and torch-like lists are accepted
    assert pixel_auroc(maps[:, None], masks[:, None]) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_auroc(list(maps), list(masks)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_f1_max_matches_precision_recall_curve() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.4 * labels, 2)
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    assert f1_max(scores, labels) == pytest.approx(float(f1.max()), abs=1e-12)
    assert f1_max([0.1, 0.9], [0, 1]) == 1.0


def test_perfect_and_inverted_image_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(scores, labels) == 1.0
    assert image_auroc(-scores, labels) == 0.0


# ------------------------------------------------------------------------------------- AUPRO


def test_aupro_hand_worked_two_regions() -> None:
    # One 1x8 image. Region A = pixels 0-1 (2 px), region B = pixel 6 (1 px), 5 normal pixels.
    mask = np.array([[[1, 1, 0, 0, 0, 0, 1, 0]]])
    amap = np.array([[[0.9, 0.5, 0.1, 0.2, 0.3, 0.6, 0.4, 0.4]]])
    # score >= t, thresholds high to low:
    #   t=0.9: A 1/2, B 0 -> PRO 0.25, FPR 0
    #   t=0.6: normal px 5 on        -> PRO 0.25, FPR 0.2
    #   t=0.5: A 2/2                 -> PRO 0.5,  FPR 0.2
    #   t=0.4: B on, normal px 7 on  -> PRO 1.0,  FPR 0.4   (one segment (0.2,0.5)->(0.4,1))
    # Area to FPR 0.3: 0.2*0.25 + 0.1*(0.5 + 0.75)/2 = 0.05 + 0.0625 = 0.1125; / 0.3 = 0.375
    fpr, pro = pro_curve(amap, mask)
    np.testing.assert_allclose(fpr[:5], [0.0, 0.0, 0.2, 0.2, 0.4])
    np.testing.assert_allclose(pro[:5], [0.0, 0.25, 0.25, 0.5, 1.0])
    assert aupro(amap, mask) == pytest.approx(0.375, abs=1e-12)
    # With a 0.2 limit no interpolation is needed: 0.2*0.25 / 0.2
    assert aupro(amap, mask, fpr_limit=0.2) == pytest.approx(0.25, abs=1e-12)


def test_aupro_regions_do_not_connect_across_images() -> None:
    # Image 0: a 1-px region found at t=1. Image 1: a 2-px region at the same place, never found
    # before FPR 1. Separate regions: PRO(t=1) = (1 + 0)/2 = 0.5. Curve (0,0),(0,0.5),(1,1):
    # area to 0.3 = 0.3*(0.5 + 0.65)/2 = 0.1725; / 0.3 = 0.575. (Merged: PRO 1/3 -> different.)
    masks = np.zeros((2, 3, 3), np.uint8)
    masks[0, 1, 1] = 1
    masks[1, 1, 1] = masks[1, 1, 2] = 1
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def test_aupro_perfect_and_inverted() -> None:
    _, masks = _random_maps(1)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0, abs=1e-9)
    # continuous maps that separate perfectly: still 1 (quantile-threshold path)
    rng = np.random.default_rng(0)
    smooth = rng.random(masks.shape) * 0.4 + 0.6 * masks
    assert aupro(smooth, masks) == pytest.approx(1.0, abs=1e-9)
    assert aupro(-smooth, masks) < 0.01


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Exact curve over every distinct score, one threshold at a time (slow, obvious)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    regions, n = ndimage.label(masks > 0, structure=structure)
    normal = maps[masks == 0]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        on = maps >= t
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([on[regions == r].mean() for r in range(1, n + 1)])))
    x, y = np.array(xs), np.array(ys)
    keep = x <= limit
    xi, yi = x[keep], y[keep]
    j = int(keep.sum())
    if xi[-1] < limit:
        yl = y[j - 1] + (limit - x[j - 1]) * (y[j] - y[j - 1]) / (x[j] - x[j - 1])
        xi, yi = np.r_[xi, limit], np.r_[yi, yl]
    return float(np.sum(np.diff(xi) * (yi[1:] + yi[:-1]) / 2) / limit)


def test_aupro_matches_exact_reference() -> None:
    maps, masks = _random_maps(3, n=4, size=20)
    maps = np.round(maps, 2)  # ~160 distinct values: the exact path
    assert aupro(maps, masks) == pytest.approx(_reference_aupro(maps, masks), abs=1e-9)
    fine = _random_maps(5, n=4, size=20)[0]  # 1600 distinct values
    exact = _reference_aupro(fine, masks)
    assert aupro(fine, masks, num_thresholds=5000) == pytest.approx(exact, abs=1e-9)
    assert aupro(fine, masks) == pytest.approx(exact, abs=5e-3)  # 200 quantile thresholds


def test_aupro_memory_friendly_on_large_input() -> None:
    maps, masks = _random_maps(7, n=40, size=128)
    value = aupro(maps, masks)
    assert 0.0 < value < 1.0


# ------------------------------------------------------------------------ thresholds and dict


def test_threshold_from_good_and_rates() -> None:
    good = np.linspace(0.0, 1.0, 1001)
    thr = threshold_from_good(good, quantile=0.99)
    assert thr == pytest.approx(0.99 + 1e-6)
    assert threshold_from_good(np.full(5, 0.2)) > 0.2  # equal good scores stay below
    scores = np.array([0.1, 0.5, 0.6, 0.9, 0.95])
    labels = np.array([0, 0, 1, 1, 1])
    assert fnr_at_threshold(scores, labels, 0.6) == pytest.approx(1 / 3)
    assert fpr_at_threshold(scores, labels, 0.3) == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        threshold_from_good([], 0.99)


def test_compute_metrics_keys_and_nan_without_warnings() -> None:
    maps, masks = _random_maps(2)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    out = compute_metrics(scores, labels, maps, masks, image_threshold=0.9)
    assert set(out) == {"i_auroc", "p_auroc", "aupro", "p_ap", "f1_max", "fnr", "fpr"}
    assert out["p_auroc"] == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    assert out["p_ap"] == pytest.approx(pixel_ap(maps, masks), abs=1e-12)
    assert out["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert all(isinstance(v, float) for v in out.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good_only = compute_metrics(scores[3:], np.zeros(3), maps[3:], np.zeros_like(masks[3:]))
        assert set(good_only) == {"i_auroc", "p_auroc", "aupro", "p_ap", "f1_max"}
        assert all(np.isnan(v) for v in good_only.values())
        no_maps = compute_metrics(scores, labels)
        assert np.isnan(no_maps["p_auroc"]) and not np.isnan(no_maps["i_auroc"])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="N x H x W"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, float("nan")], [0, 1])
