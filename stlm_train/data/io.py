"""Image and mask reading for training and evaluation.

Every loader in :mod:`stlm_train.data` goes through :func:`read_image_rgb` and :func:`read_mask`,
thin wrappers over the runtime's one reader (:mod:`stlm_deploy.images`), so a file reaches training
exactly as it reaches an engine; here its errors become :class:`DataError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from stlm_deploy import images as _images
from stlm_deploy.errors import InputError
from stlm_deploy.files import IMAGE_EXTENSIONS  # the one list, shared with export and the runtime
from stlm_deploy.preprocess import DEFAULT_RESIZE, resize_image

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A data set, image or mask that cannot be used; the message is one line naming the path."""


def read_image_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB with the runtime's one reader
    (:func:`stlm_deploy.images.read_image_rgb`: EXIF orientation applied, 16-bit scaled, grey
    replicated, alpha dropped); :class:`DataError` (one line, naming the path) otherwise."""
    try:
        return _images.read_image_rgb(path)
    except InputError as e:
        raise DataError(str(e)) from None


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as uint8 HxW {0, 1} (:func:`stlm_deploy.images.read_mask`)."""
    try:
        return _images.read_mask(path)
    except InputError as e:
        raise DataError(str(e)) from None


def resize_rgb(img: np.ndarray, size: int | tuple[int, int], policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """Resize an HxWx3 image to ``size`` (int -> square, or (height, width)) by the resize ``policy``.

    The runtime's own function (:func:`stlm_deploy.preprocess.resize_image`), so training,
    evaluation, export calibration and every engine see the same pixels.
    """
    return resize_image(img, size, policy)


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
