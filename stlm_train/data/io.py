"""Image and mask reading for training and evaluation.

Every loader in :mod:`stlm_train.data` goes through :func:`read_image_rgb` and :func:`read_mask` so
that grey, grey+alpha, RGBA and 16-bit files all reach the model as the same thing: uint8 RGB images
and {0, 1} masks. Files are decoded with OpenCV (``IMREAD_UNCHANGED``, so bit depth and alpha are
seen and handled here rather than silently by the codec); bytes are read with numpy first so that
non-ASCII paths work everywhere and a missing file gives our message instead of an OpenCV warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from stlm_deploy.files import IMAGE_EXTENSIONS  # the one list, shared with export and the runtime

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A data set, image or mask that cannot be used; the message is one line naming the path."""


def _decode(path: PathLike, what: str) -> np.ndarray:
    """Decode a file unchanged (any depth/channels) or raise a one-line :class:`DataError`."""
    p = Path(path)
    if not p.is_file():
        reason = "is a directory, not a file" if p.is_dir() else "no such file"
        raise DataError(f"cannot read {what} '{p}': {reason}")
    try:
        buf = np.fromfile(str(p), dtype=np.uint8)
    except OSError as exc:  # permissions, I/O errors
        raise DataError(f"cannot read {what} '{p}': {exc.strerror or exc}") from None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None or img.size == 0:
        raise DataError(f"cannot read {what} '{p}': not a readable image file")
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
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
    # int32 and anything else: clip to the 8-bit range.
    return np.clip(img, 0, 255).astype(np.uint8)


def read_image_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB.

    Grey -> replicated to three channels; grey+alpha and RGBA -> alpha dropped; 16-bit -> scaled by
    255/65535. Raises :class:`DataError` (one line, naming the path) for missing/undecodable files.
    """
    img = _to_uint8(_decode(path, "image"))
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3:
        raise DataError(f"cannot read image '{path}': unexpected array shape {img.shape}")
    channels = img.shape[2]
    if channels in (1, 2):  # grey or grey+alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise DataError(f"cannot read image '{path}': expected 1-4 channels, found {channels}")


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as uint8 HxW with values {0, 1} (any non-zero pixel is defective).

    Colour masks count a pixel as defective when any colour channel is non-zero (alpha is ignored).
    """
    img = _decode(path, "mask")
    if img.ndim == 3:
        img = img[:, :, :3] if img.shape[2] >= 3 else img[:, :, :1]
        img = img.max(axis=2)
    elif img.ndim != 2:
        raise DataError(f"cannot read mask '{path}': unexpected array shape {img.shape}")
    return (np.nan_to_num(img) > 0).astype(np.uint8)


def resize_rgb(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an HxWx3 image to ``size`` (int -> square, or (height, width)) bilinearly.

    Bilinear matches the deploy-time preprocessing (DESIGN.md), so training sees what inference sees.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an HxW {0,1} mask with nearest-neighbour so it stays binary."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def list_images(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (suffix in :data:`IMAGE_EXTENSIONS`, any case), sorted by path.

    Sorting makes data-set order, and therefore seeded training, identical on every machine.
    A missing folder gives an empty list; callers decide whether that is an error.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = root.rglob("*") if recursive else root.iterdir()
    found = [p for p in pattern if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.as_posix())


def bundled_sample_root() -> Path | None:
    """The real 20-image MVTec AD 'bottle' sample used by tests, demos and parity checks.

    ``$STLM_SAMPLE_DATA`` wins; otherwise ``../shared/data/mvtec_bottle_xs`` next to the repository.
    It is never copied into the repository; callers skip or fall back to generated data without it.
    """
    env = os.environ.get("STLM_SAMPLE_DATA")
    repo = Path(__file__).resolve().parents[2]
    for cand in ([Path(env)] if env else []) + [repo.parent / "shared" / "data" / "mvtec_bottle_xs"]:
        if (cand / "train" / "good").is_dir() and (cand / "test").is_dir():
            return cand
    return None
