"""The one image reader: file -> uint8 HxWx3 RGB, the same for training, evaluation, export
calibration, stlm-infer and (by the same rules) the C++ example.

Rules, applied one way everywhere:
* EXIF orientation is applied (a camera JPEG tagged Orientation=6 is upright, as a viewer shows it;
  training once read such files unrotated while inference rotated them);
* 16-bit -> 8-bit by scaling x*255/65535 (rounded), never by truncation; float images in [0, 1] x 255;
* grey -> replicated to three channels; alpha (grey+alpha, RGBA) -> dropped, never composited;
* bytes are read with numpy first so non-ASCII paths work everywhere and a missing file gives our
  message instead of an OpenCV warning.
OpenCV flags: ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` keeps the depth and applies EXIF orientation
(``IMREAD_UNCHANGED`` would ignore it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from .errors import InputError

__all__ = ["read_image_rgb", "read_mask", "decode_image_rgb", "to_uint8", "IMREAD_FLAGS"]

PathLike = Union[str, "os.PathLike[str]"]
IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def _read_bytes(path: PathLike, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        reason = "is a directory, not a file" if p.is_dir() else "no such file"
        raise InputError(f"{p}: cannot read {what}: {reason}")
    try:
        return np.fromfile(str(p), dtype=np.uint8)
    except OSError as exc:  # permissions, I/O errors
        raise InputError(f"{p}: cannot read {what} ({exc.strerror or exc})") from None


def _decode(buf: np.ndarray, flags: int, where: str, what: str) -> np.ndarray:
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None or img.size == 0:
        article = "an" if what[0] in "aeiou" else "a"
        raise InputError(f"{where}: cannot decode as {article} {what} (unsupported format, empty or corrupt file)")
    return img


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Bring any decoded depth to uint8 by scaling (16-bit: x*255/65535), never by truncation."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.rint(img.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return np.rint((img.astype(np.float32) + 32768.0) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        # Float TIFF/EXR: [0, 1] data is the common convention; larger ranges are taken as 0..255.
        f = np.nan_to_num(img.astype(np.float32))
        scale = 255.0 if float(f.max(initial=0.0)) <= 1.0 else 1.0
        return np.rint(np.clip(f * scale, 0.0, 255.0)).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)  # int32 and anything else: clip to the 8-bit range


def _to_rgb(img: np.ndarray, where: str) -> np.ndarray:
    img = to_uint8(img)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3:
        raise InputError(f"{where}: cannot read image: unexpected array shape {img.shape}")
    channels = img.shape[2]
    if channels in (1, 2):  # grey or grey+alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise InputError(f"{where}: cannot read image: expected 1-4 channels, found {channels}")


def decode_image_rgb(data: bytes | np.ndarray, where: str = "<bytes>") -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> uint8 HxWx3 RGB by the rules above."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return _to_rgb(_decode(buf, IMREAD_FLAGS, where, "image"), where)


def read_image_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB; :class:`InputError` (one line, naming the path) otherwise."""
    return decode_image_rgb(_read_bytes(path, "image"), str(path))


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as uint8 HxW with values {0, 1} (any non-zero pixel is defective).

    Colour masks count a pixel as defective when any colour channel is non-zero (alpha is ignored).
    Masks are read unrotated (IMREAD_UNCHANGED): they are written by tools, not cameras.
    """
    img = _decode(_read_bytes(path, "mask"), cv2.IMREAD_UNCHANGED, str(path), "mask")
    if img.ndim == 3:
        img = img[:, :, :3] if img.shape[2] >= 3 else img[:, :, :1]
        img = img.max(axis=2)
    elif img.ndim != 2:
        raise InputError(f"{path}: cannot read mask: unexpected array shape {img.shape}")
    return (np.nan_to_num(img) > 0).astype(np.uint8)
