"""Heat maps and overlays for humans (OpenCV only): what the CLI writes with ``--overlays``.

The map is drawn with a fixed scale (``vmin``..``vmax``, default the model's 0..1 range) rather than
per-image min/max, so a normal image looks calm instead of showing amplified noise.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .errors import InputError
from .preprocess import describe, resize_map

__all__ = ["heatmap", "overlay", "defect_contours"]


def _as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{name}: expected uint8 RGB array of shape (H, W, 3), got {describe(image)}")
    return image


def _as_map(anomaly_map: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.ndim != 2:
        raise InputError(f"anomaly_map: expected a 2-D float array (H, W), got {describe(anomaly_map)}")
    return resize_map(m, size) if size is not None else m


def heatmap(anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0,
            size: tuple[int, int] | None = None) -> np.ndarray:
    """JET colour image (uint8 RGB, (H, W, 3)) of ``anomaly_map`` scaled from vmin (blue) to vmax (red)."""
    m = _as_map(anomaly_map, size)
    span = float(vmax) - float(vmin)
    norm = (m - float(vmin)) / (span if span > 0 else 1.0)
    u8 = np.round(np.clip(np.nan_to_num(norm, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def defect_contours(anomaly_map: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Outlines (OpenCV contours, outer and holes) of the region where ``anomaly_map > threshold``."""
    mask = (np.asarray(anomaly_map, np.float32) > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return list(contours)


def colour_range(threshold: float | None) -> tuple[float, float]:
    """Colour scale for a map: [0, 2 x pixel threshold] (the threshold sits mid-palette, so "normal" is
    blue-green and "defect" red even for models whose maps stay far below 1), else [0, 1]."""
    if threshold is None or not threshold > 0:
        return 0.0, 1.0
    return 0.0, float(min(1.0, 2.0 * threshold))


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None = None, alpha: float = 0.5,
            vmin: float | None = None, vmax: float | None = None, contour_color: Sequence[int] = (255, 255, 255),
            thickness: int = 2) -> np.ndarray:
    """Heat map blended on the image (``alpha`` = heat-map weight) plus the defect outline.

    Colours span ``colour_range(threshold)`` unless ``vmin``/``vmax`` are given (the C++ runtime's
    ``stlm::overlay`` uses the same rule, so both draw the same picture).

    The map is resized to the image if needed. With ``threshold`` the outline of ``map > threshold``
    is drawn in ``contour_color`` (white: absent from the JET palette, so it stays visible).
    Returns uint8 RGB of the image's size.
    """
    img = _as_rgb(image_rgb)
    h, w = img.shape[:2]
    m = _as_map(anomaly_map, (h, w))
    lo, hi = colour_range(threshold)
    vmin = lo if vmin is None else vmin
    vmax = hi if vmax is None else vmax
    a = float(np.clip(alpha, 0.0, 1.0))
    out = cv2.addWeighted(np.ascontiguousarray(img), 1.0 - a, heatmap(m, vmin, vmax), a, 0.0)
    if threshold is not None:
        contours = defect_contours(m, threshold)
        if contours:
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in contour_color), int(thickness))
    return out
