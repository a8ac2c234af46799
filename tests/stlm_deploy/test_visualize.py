"""Heat maps and overlays: shape/dtype, colour scale, and that the outline sits on the defect border."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from stlm_deploy.errors import InputError
from stlm_deploy.visualize import defect_contours, heatmap, overlay

from .conftest import sample_image


def _blob_map(h: int = 120, w: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.full((h, w), 0.1, np.float32)
    m[(yy - 60) ** 2 + (xx - 50) ** 2 < 20 ** 2] = 0.9  # a disc
    m[20:40, 110:150] = 0.8  # a rectangle
    return m


def test_heatmap_scale_and_type():
    m = np.array([[0.0, 1.0], [0.5, 2.0]], np.float32)
    hm = heatmap(m)
    assert hm.shape == (2, 2, 3) and hm.dtype == np.uint8
    assert hm[0, 0, 2] > 100 and hm[0, 0, 0] == 0  # 0 -> dark blue (RGB)
    assert hm[0, 1, 0] > 100 and hm[0, 1, 2] == 0  # 1 -> dark red
    np.testing.assert_array_equal(hm[1, 1], hm[0, 1])  # clipped at vmax
    np.testing.assert_array_equal(heatmap(m, vmin=0, vmax=2)[1, 1], hm[0, 1])
    assert heatmap(m, size=(10, 20)).shape == (10, 20, 3)
    heatmap(np.zeros((4, 4), np.float32), vmin=1, vmax=1)  # degenerate range does not divide by zero


def test_overlay_blend_without_threshold():
    img = sample_image(120, 160)
    m = _blob_map()
    out = overlay(img, m, alpha=0.4)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.addWeighted(img, 0.6, heatmap(m), 0.4, 0))
    np.testing.assert_array_equal(overlay(img, m, alpha=0.0), img)
    small = cv2.resize(m, (40, 30), interpolation=cv2.INTER_LINEAR)  # a model-size map is resized to the image
    assert overlay(img, small).shape == img.shape


def test_contour_lies_on_the_defect_border():
    img = sample_image(120, 160)
    m = _blob_map()
    thr, thickness = 0.5, 2
    base = overlay(img, m, alpha=0.5)
    out = overlay(img, m, threshold=thr, alpha=0.5, thickness=thickness)
    drawn = np.any(out != base, axis=2)
    assert drawn.sum() > 100  # both outlines are there
    mask = (m > thr).astype(np.uint8)
    border = mask - cv2.erode(mask, np.ones((3, 3), np.uint8))
    dist = cv2.distanceTransform((1 - border).astype(np.uint8), cv2.DIST_L2, 5)
    assert dist[drawn].max() <= thickness  # nowhere far from the border
    assert drawn[60, 30] or drawn[60, 31]  # left edge of the disc (x = 50 - 20)
    assert drawn[20:40, 109:112].any() and drawn[20:40, 148:151].any()  # rectangle sides
    assert not drawn[90:, :20].any() and not drawn[60, 50]  # not in empty space, not in the disc centre
    np.testing.assert_array_equal(out[drawn], np.full((drawn.sum(), 3), 255, np.uint8))  # white outline
    assert len(defect_contours(m, thr)) == 2
    np.testing.assert_array_equal(overlay(img, m, threshold=0.95), base)  # nothing above: no outline


def test_overlay_input_validation():
    gray = np.zeros((10, 10), np.uint8)
    assert overlay(gray, np.zeros((10, 10), np.float32)).shape == (10, 10, 3)
    with pytest.raises(InputError, match=r"image: expected uint8 RGB array of shape \(H, W, 3\), got float32"):
        overlay(np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), np.float32))
    with pytest.raises(InputError, match=r"anomaly_map: expected a 2-D float array"):
        overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((1, 10, 10), np.float32))


def test_colour_range_puts_the_pixel_threshold_mid_palette():
    from stlm_deploy.visualize import colour_range

    assert colour_range(None) == (0.0, 1.0)
    assert colour_range(0.04) == (0.0, 0.08)
    assert colour_range(0.7) == (0.0, 1.0)
    assert colour_range(0.0) == (0.0, 1.0)
