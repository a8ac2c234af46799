"""Calibration / parity images: a user folder, the bundled real MVTec sample, or generated fields.

The parity gate needs images whose maps look like real ones (textures, edges, smooth regions), so
the order of preference is: ``--calib-data ROOT`` (every image below it, recursively), the bundled
real sample ``../shared/data/mvtec_bottle_xs`` next to the repository (``$STLM_SAMPLE_DATA``
overrides; its ``test/`` images: good and defective), and only then deterministic generated images
(smooth random colour fields with a few blobs, named ``generated:smooth-fields(seed=0)``).

Images are resized by the runtime's own function and the engine's resize policy
(``stlm_deploy.preprocess.resize_image``), so the graph sees what it sees in deployment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stlm_deploy.errors import InputError
from stlm_deploy.files import IMAGE_EXTENSIONS
from stlm_deploy.images import read_image_rgb
from stlm_deploy.preprocess import DEFAULT_RESIZE, resize_image

__all__ = ["CalibSet", "find_images", "load_images", "sample_data_root", "generated_images",
           "calibration_images", "DEFAULT_MAX_IMAGES"]

DEFAULT_MAX_IMAGES = 8


@dataclass
class CalibSet:
    """uint8 (N, S, S, 3) RGB images plus where they came from (recorded in parity.json)."""

    images: np.ndarray
    source: str  # "calib-data:<root>", "sample:<root>" or "generated:..."
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file below ``root`` (recursively), sorted for determinism; hidden files skipped."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _spread(paths: list[Path], n: int) -> list[Path]:
    """n paths evenly spread over the sorted list (so good and defective folders are both used)."""
    if len(paths) <= n:
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in dict.fromkeys(idx.tolist())]


def load_images(paths: list[Path], img_size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """Read with the runtime's one reader and resize by the engine's ``policy`` to (N, S, S, 3) uint8."""
    out = np.empty((len(paths), img_size, img_size, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = resize_image(read_image_rgb(p), img_size, policy)
        except InputError as e:
            raise ValueError(str(e)) from None
    return out


def sample_data_root() -> Path | None:
    """The bundled real MVTec 'bottle' sample (see ``stlm_train.data.bundled_sample_root``)."""
    from stlm_train.data.io import bundled_sample_root

    root = bundled_sample_root()
    return root if root is not None and find_images(root / "test") else None


def generated_images(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth random colour fields with a few bright/dark blobs (no data needed)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, img_size, img_size, 3), np.uint8)
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32) / img_size
    for i in range(n):
        coarse = rng.uniform(0, 255, (4 + i % 4, 4 + i % 4, 3)).astype(np.float32)
        img = cv2.resize(coarse, (img_size, img_size), interpolation=cv2.INTER_CUBIC)
        for _ in range(1 + i % 3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.12)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + blob * rng.uniform(0, 255, 3).astype(np.float32)
        out[i] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return out


def calibration_images(calib_data: str | os.PathLike | None, img_size: int,
                       max_images: int = DEFAULT_MAX_IMAGES, policy: str = DEFAULT_RESIZE) -> CalibSet:
    """The parity/calibration batch: ``calib_data``, else the bundled sample, else generated images."""
    if max_images < 1:
        raise ValueError(f"--parity-images: must be >= 1, got {max_images}")
    if calib_data is not None:
        root = Path(calib_data)
        if not root.is_dir():
            raise ValueError(f"--calib-data {root}: not a directory")
        paths = find_images(root)
        if not paths:
            raise ValueError(f"--calib-data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found below it")
        chosen = _spread(paths, max_images)
        return CalibSet(load_images(chosen, img_size, policy), f"calib-data:{root}", [str(p) for p in chosen])
    sample = sample_data_root()
    if sample is not None:
        chosen = _spread(find_images(sample / "test"), max_images)
        return CalibSet(load_images(chosen, img_size, policy), f"sample:{sample}", [str(p) for p in chosen])
    n = max_images
    return CalibSet(generated_images(n, img_size), "generated:smooth-fields(seed=0)", [])
