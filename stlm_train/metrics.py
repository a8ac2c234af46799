"""Anomaly-detection metrics: I-AUROC, P-AUROC, AUPRO@0.3, P-AP, F1-max, FNR at a threshold.

All metrics are plain numpy (plus scipy's connected-component labelling), vectorised and careful
with memory, because pixel metrics see N x H x W maps (200 x 256 x 256 = 13 M pixels). AUROC and AP
share one sort of the scores and reproduce scikit-learn's definitions (ties handled the same way).
Undefined values (only one class present, no defect pixels, ...) are NaN, without warnings.

Convention: higher score = more anomalous; a sample is flagged anomalous when ``score > threshold``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from scipy import ndimage

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# input handling


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)) and x and (hasattr(x[0], "shape") or hasattr(x[0], "detach")):
        x = np.stack([_as_array(v, name) for v in x])  # a list of per-image maps
    arr = np.asarray(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _scores(x: Any, name: str) -> np.ndarray:
    arr = _as_array(x, name)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    arr = arr.ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _binary(x: Any, name: str) -> np.ndarray:
    arr = _as_array(x, name).ravel()
    return arr > 0.5 if np.issubdtype(arr.dtype, np.floating) else arr > 0


def _maps_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """N x H x W maps and boolean masks (a singleton channel axis is dropped)."""
    m = _as_array(maps, "maps")
    g = _as_array(masks, "masks")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim == 2 and g.ndim == 2:  # a single map
        m, g = m[None], g[None]
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps {m.shape} and masks {g.shape} must both be N x H x W")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN or infinite values")
    g = g > 0.5 if np.issubdtype(g.dtype, np.floating) else g > 0
    return m, g


def _counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) at every distinct threshold, high to low."""
    order = np.argsort(scores)[::-1]  # descending; ties are collapsed below, so order inside is free
    s = scores[order]
    y = positive[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # end index of each distinct value
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps


def _two_classes(positive: np.ndarray) -> bool:
    n_pos = int(np.count_nonzero(positive))
    return 0 < n_pos < positive.size


# ----------------------------------------------------------------------------------------------
# metrics


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    if not _two_classes(positive):
        return NAN
    return _auroc_from_counts(*_counts(scores, positive))


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    if not _two_classes(positive):
        return NAN
    return _ap_from_counts(*_counts(scores, positive))


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_steps * precision))


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores against image labels (1 = anomalous)."""
    return _auroc(_scores(scores, "scores"), _binary(labels, "labels"))


def pixel_auroc(maps: Any, masks: Any) -> float:
    """ROC AUC over every pixel of every map against the ground-truth masks."""
    m, g = _maps_masks(maps, masks)
    return _auroc(m.ravel(), g.ravel())


def pixel_ap(maps: Any, masks: Any) -> float:
    """Average precision over all pixels (scikit-learn's step definition)."""
    m, g = _maps_masks(maps, masks)
    return _average_precision(m.ravel(), g.ravel())


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 over all thresholds, i.e. the F1 a perfectly tuned image threshold would reach."""
    s, y = _scores(scores, "scores"), _binary(labels, "labels")
    if not np.any(y):
        return NAN
    tps, fps = _counts(s, y)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def fnr_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """Fraction of anomalous samples missed (``score <= threshold``); NaN without anomalies."""
    s, y = _scores(scores, "scores"), _binary(labels, "labels")
    if not np.any(y):
        return NAN
    return float(np.mean(s[y] <= threshold))


def fpr_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    """Fraction of good samples flagged (``score > threshold``); NaN without good samples."""
    s, y = _scores(scores, "scores"), _binary(labels, "labels")
    if np.all(y):
        return NAN
    return float(np.mean(s[~y] > threshold))


def threshold_from_good(scores: Any, quantile: float = 0.995, margin: float = 1e-6) -> float:
    """Image threshold chosen on held-out *good* images only: a high quantile of their scores.

    Returns ``quantile(scores, q) + margin``; the tiny margin keeps a good image whose score equals
    the quantile (with few images, often the maximum) below the threshold. No anomalous image is
    needed, which is the situation on a real production line.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    s = _scores(scores, "good scores")
    return float(np.quantile(s, quantile)) + float(margin)


def _label_regions(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions (8-connectivity, as the MVTec AD evaluation), never across images."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # connect within an image only
    labels, n = ndimage.label(gt, structure=structure)
    return labels, int(n)


def pro_curve(
    maps: Any, masks: Any, num_thresholds: int = 200, fpr_limit: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, mean per-region overlap) points, FPR ascending, starting at (0, 0).

    Thresholds: every distinct map value when there are at most ``num_thresholds`` of them (exact
    curve), else quantiles of the normal-pixel scores spaced evenly in FPR over [0, fpr_limit], the
    value just above every normal score (the FPR = 0 point) and the global minimum (so the curve
    crosses fpr_limit and can be interpolated there). Per-region counts come from one
    ``np.bincount`` over (region, threshold bin): memory is O(pixels + regions x thresholds), never
    pixels x thresholds.
    """
    m, g = _maps_masks(maps, masks)
    regions, n_regions = _label_regions(g)
    normal = np.sort(m[~g])
    if n_regions == 0 or normal.size == 0:
        return np.array([0.0]), np.array([0.0])
    region_ids = regions[g] - 1  # 0-based region index of every defect pixel
    region_scores = m[g]
    region_sizes = np.bincount(region_ids, minlength=n_regions).astype(np.float64)

    distinct = np.unique(np.r_[normal[:: max(1, normal.size // 4096)], region_scores[:4096]])
    lo = min(float(normal[0]), float(region_scores.min()))
    if distinct.size <= num_thresholds:
        distinct = np.unique(m)  # cheap check first; confirm on the full maps
    if distinct.size <= num_thresholds:
        thresholds = distinct
    else:
        fprs = np.linspace(0.0, fpr_limit, num_thresholds)[1:]
        n = normal.size
        idx = np.clip(n - np.ceil(fprs * n).astype(np.int64), 0, n - 1)
        above_normal = np.nextafter(normal[-1], np.inf)  # the last threshold with FPR exactly 0
        thresholds = np.unique(np.r_[normal[idx], lo, above_normal])
    # thresholds ascending; a pixel is "on" at threshold t when score >= t.
    n_t = thresholds.size
    fp = normal.size - np.searchsorted(normal, thresholds, side="left")
    fpr = fp / normal.size
    bins = np.searchsorted(thresholds, region_scores, side="right")  # pixel is on for t_0..t_{b-1}
    hist = np.bincount(region_ids * (n_t + 1) + bins, minlength=n_regions * (n_t + 1))
    hist = hist.reshape(n_regions, n_t + 1)
    on = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # on[r, k] = #pixels with score >= t_k
    pro = (on / region_sizes[:, None]).mean(axis=0)
    # thresholds descending -> FPR ascending; prepend the "above every score" point (0, 0).
    return np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]]


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) from x[0] to exactly x_max, interpolating the last point."""
    i = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:i], y[:i]
    if i < x.size and xs[-1] < x_max:
        t = (x_max - x[i - 1]) / (x[i] - x[i - 1])
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[i - 1] + t * (y[i] - y[i - 1])]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, divided by ``fpr_limit``.

    Each connected defect region counts equally however small (unlike P-AUROC), which is why this
    metric is reported for localisation. 1.0 = every region fully found before any false positive.
    NaN when there are no defect or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, g = _maps_masks(maps, masks)
    if not _two_classes(g.ravel()):
        return NAN
    fpr, pro = pro_curve(m, g, num_thresholds=num_thresholds, fpr_limit=fpr_limit)
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


def compute_metrics(
    image_scores: Any,
    labels: Any,
    maps: Any = None,
    masks: Any = None,
    image_threshold: Optional[float] = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All evaluation numbers in one dict: ``i_auroc, p_auroc, aupro, p_ap, f1_max`` (+ ``fnr`` and
    ``fpr`` when ``image_threshold`` is given). Pixel metrics are NaN when maps/masks are None.
    """
    out = {
        "i_auroc": image_auroc(image_scores, labels),
        "p_auroc": NAN,
        "aupro": NAN,
        "p_ap": NAN,
        "f1_max": f1_max(image_scores, labels),
    }
    if maps is not None and masks is not None:
        m, g = _maps_masks(maps, masks)
        if _two_classes(g.ravel()):
            counts = _counts(m.ravel(), g.ravel())  # one sort of all pixels for both metrics
            out["p_auroc"] = _auroc_from_counts(*counts)
            out["p_ap"] = _ap_from_counts(*counts)
            out["aupro"] = aupro(m, g, fpr_limit=fpr_limit)
    if image_threshold is not None:
        out["fnr"] = fnr_at_threshold(image_scores, labels, image_threshold)
        out["fpr"] = fpr_at_threshold(image_scores, labels, image_threshold)
    return {k: (float(v) if not math.isnan(v) else NAN) for k, v in out.items()}


__all__ = [
    "aupro",
    "compute_metrics",
    "f1_max",
    "fnr_at_threshold",
    "fpr_at_threshold",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pro_curve",
    "threshold_from_good",
]
