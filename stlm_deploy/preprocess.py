"""Host-side pre/post-processing around the fused graph (numpy + OpenCV only).

The exported graph takes ``img_size`` x ``img_size`` RGB uint8 images; everything size-dependent
(any input size in, map at the original size out) happens here so one engine serves all cameras.
The resize into the graph follows the engine's ``preprocessing.resize`` policy, the same function
that training, evaluation and export calibration call (``stlm_train`` imports it from here):

* ``area`` (engines from this version on): ``cv2.INTER_AREA`` when shrinking (antialiased pixel-area
  averaging; a 900 px photo keeps its fine texture statistics at 256 px instead of aliasing, which
  made good test images score high when training images passed an extra warp), ``INTER_LINEAR`` when
  enlarging;
* ``bilinear`` (older engines and checkpoints): ``INTER_LINEAR`` (half-pixel centres) both ways.

Tiled engines resize once to the work shape instead (:func:`work_image`, :mod:`stlm_deploy.tiling`).
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from .errors import InputError
from .tiling import Tiling

__all__ = ["describe", "validate_image", "split_images", "to_rgb", "resize_image", "prepare_batch",
           "normalize_nchw", "make_input", "resize_map", "work_image", "RESIZE_POLICIES", "DEFAULT_RESIZE", "interpolation_for"]

#: Resize policies an engine or checkpoint may name; the first is what new ones are written with.
RESIZE_POLICIES: tuple[str, ...] = ("area", "bilinear")
DEFAULT_RESIZE = RESIZE_POLICIES[0]

_EXPECTED = "expected uint8 RGB array of shape (H, W, 3) or (N, H, W, 3)"


def describe(x: Any) -> str:
    """Short description of what the caller passed, for error messages (``float32 (480, 640, 3)``)."""
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def validate_image(image: Any, name: str = "image", allow_batch: bool = True) -> np.ndarray:
    """Return ``image`` if it is uint8 (H, W, 3) (or (N, H, W, 3) when ``allow_batch``), else InputError."""
    expected = _EXPECTED if allow_batch else "expected uint8 RGB array of shape (H, W, 3)"
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: {expected}, got {describe(image)}")
    ranks = (3, 4) if allow_batch else (3,)
    if image.dtype != np.uint8 or image.ndim not in ranks or image.shape[-1] != 3 \
            or any(d == 0 for d in image.shape[-3:]):
        raise InputError(f"{name}: {expected}, got {describe(image)}")
    return image


def split_images(images: Any, name: str = "image") -> tuple[list[np.ndarray], bool]:
    """Normalise what ``predict`` accepts into a list of (H, W, 3) arrays; the flag says "single image"."""
    if isinstance(images, np.ndarray):
        arr = validate_image(images, name)
        if arr.ndim == 3:
            return [arr], True
        return [arr[i] for i in range(arr.shape[0])], False
    if isinstance(images, (list, tuple)):
        return [validate_image(im, f"{name}[{i}]", allow_batch=False) for i, im in enumerate(images)], False
    raise InputError(f"{name}: {_EXPECTED} or a list of (H, W, 3) arrays, got {describe(images)}")


def to_rgb(image: np.ndarray, bgr: bool) -> np.ndarray:
    """OpenCV frames are BGR; the graph wants RGB."""
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image


def interpolation_for(policy: str, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """The OpenCV interpolation flag of ``policy`` for a (h, w) -> (h, w) resize (see module doc)."""
    if policy not in RESIZE_POLICIES:
        raise InputError(f"resize policy must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")
    shrinking = dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]
    return cv2.INTER_AREA if policy == "area" and shrinking else cv2.INTER_LINEAR


def resize_image(image: np.ndarray, size: int | tuple[int, int], policy: str = "bilinear") -> np.ndarray:
    """Resize one (H, W, C) image to ``size`` (int: square, or (height, width)) by ``policy``."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if image.shape[0] == h and image.shape[1] == w:
        return np.ascontiguousarray(image)
    flag = interpolation_for(policy, image.shape[:2], (h, w))
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=flag)


def work_image(image: np.ndarray, tiling: Tiling, policy: str = "bilinear") -> np.ndarray:
    """A tiled model's view of ``image``: resized once by ``policy`` to ``tiling.work_shape`` (long side work_size)."""
    return resize_image(image, tiling.work_shape(image.shape[0], image.shape[1]), policy)


def prepare_batch(images: Sequence[np.ndarray], img_size: int, bgr: bool = False,
                  policy: str = "bilinear") -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Stack images of any sizes into a uint8 (N, img_size, img_size, 3) RGB batch + original (H, W)s."""
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    batch = np.empty((len(images), img_size, img_size, 3), np.uint8)
    for i, im in enumerate(images):
        batch[i] = resize_image(to_rgb(np.ascontiguousarray(im), bgr), img_size, policy)
    return batch, sizes


def normalize_nchw(batch: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   dtype: Any = np.float32) -> np.ndarray:
    """``(x - mean) / std`` on RGB 0..255, NHWC uint8 -> NCHW float, for ``fused_preprocessing: false``."""
    x = batch.astype(np.float32)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=dtype)


def make_input(batch: np.ndarray, spec: Any) -> np.ndarray:
    """The contract input for ``spec`` (an EngineSpec) from a prepared uint8 NHWC batch."""
    if spec.input.fused_preprocessing:
        return np.ascontiguousarray(batch)
    return normalize_nchw(batch, spec.preprocessing.mean, spec.preprocessing.std,
                          np.dtype(spec.input.dtype))


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) float map to ``size`` = (H, W), float32 (the original image size)."""
    m = np.ascontiguousarray(anomaly_map, dtype=np.float32)
    h, w = size
    if m.shape == (h, w):
        return m
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
