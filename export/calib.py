"""Calibration / parity images: a user folder, the bundled real MVTec sample, or generated fields.

The parity gate needs images whose maps look like real ones (textures, edges, smooth regions), so
the order of preference is: ``--calib-data ROOT`` (every image below it, recursively, but
none in a ``ground_truth/`` or ``masks/`` folder), the bundled real sample ``../shared/data/mvtec_bottle_xs``
next to the repository (``$STLM_SAMPLE_DATA`` overrides; its ``test/`` images: good and defective), and only
then deterministic generated images (smooth random colour fields with a few blobs, named
``generated:smooth-fields(seed=0)``).

Images are resized by the runtime's own function and the engine's resize policy
(``stlm_deploy.preprocess.resize_image``), so the graph sees what it sees in deployment. For a tiled
engine (``tiled=TileLayout(tiling, top_k)``) every image is resized to its work shape instead and cut into
its tiles (:mod:`stlm_deploy.tiling`): the set's ``images`` are then the graph inputs, the tiles of every image
one image after the other, and its ``layout`` maps outputs on them back to per-image stitched maps and scores,
which is what the gates compare.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from stlm_deploy.errors import InputError
from stlm_deploy.files import IMAGE_EXTENSIONS
from stlm_deploy.images import read_image_rgb
from stlm_deploy.preprocess import DEFAULT_RESIZE, resize_image, work_image
from stlm_deploy.tiling import TiledResult, Tiling, gate_maps, stitch_tiles

__all__ = ["CalibSet", "MASK_FOLDERS", "TileLayout", "find_images", "load_images", "model_views", "sample_data_root",
           "generated_images", "calibration_images", "DEFAULT_MAX_IMAGES"]

DEFAULT_MAX_IMAGES = 8
MASK_FOLDERS = frozenset({"ground_truth", "masks"})  # label folders of a data set: never model inputs


@dataclass(frozen=True)
class TileLayout:
    """A tiled engine's gate inputs: the tiles of every image, image by image, each in grid order.

    ``work_shapes`` is empty in the template callers pass to the loaders (``tiled=TileLayout(tiling, top_k)``)
    and filled in the layout of a loaded set."""

    tiling: Tiling
    top_k: int
    work_shapes: tuple[tuple[int, int], ...] = ()

    def counts(self) -> list[int]:
        return [len(self.tiling.grid(hw)) for hw in self.work_shapes]

    def tile_index(self, images: Sequence[int]) -> np.ndarray:
        """Rows of the tile stack that hold the tiles of ``images`` (in that order)."""
        starts = np.concatenate([[0], np.cumsum(self.counts())]).astype(np.int64)
        return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in images]) if len(images) else \
            np.zeros(0, np.int64)

    def take(self, images: Sequence[int]) -> "TileLayout":
        return replace(self, work_shapes=tuple(self.work_shapes[i] for i in images))

    def results(self, outs: Mapping[str, np.ndarray]) -> list[TiledResult]:
        """Per-tile outputs -> each image's stitched maps and score, as every runtime computes them."""
        return stitch_tiles(outs, self.work_shapes, self.tiling, self.top_k)

    def stitch(self, outs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-tile outputs -> per-image ``anomaly_map`` (and other per-pixel outputs: :func:`gate_maps`) and
        ``score`` (float32, the top-k mean of the stitched map)."""
        return combine(self.results(outs))


def image_folder(flag: str, path: str | os.PathLike, error: type[ValueError] = ValueError) -> Path:
    """The folder a flag names (``--calib-data``, ``--val-data``), or a one-line ``error`` saying it is not one."""
    root = Path(path)
    if not root.is_dir():
        raise error(f"{flag} {root}: not a directory")
    return root


def combine(results: Sequence[TiledResult]) -> dict[str, np.ndarray]:
    """Images' stitched results as the gates' output dict (maps: :func:`gate_maps`, ``score`` float32)."""
    out = {name: gate_maps([r.maps[name] for r in results]) for name in (results[0].maps if results else ())}
    out["score"] = np.asarray([r.score for r in results], np.float32)
    return out


def stitched(outs: Mapping[str, np.ndarray], layout: TileLayout | None) -> Mapping[str, np.ndarray]:
    """``outs`` as the gates compare them: per image (stitched for a tiled engine, as they are otherwise)."""
    return outs if layout is None else layout.stitch(outs)


def model_views(images: Iterable[np.ndarray], img_size: int, policy: str = DEFAULT_RESIZE,
                tiled: TileLayout | None = None) -> tuple[np.ndarray, TileLayout | None]:
    """RGB images of any size -> the graph's uint8 inputs: (N, S, S, 3) resized by ``policy``, or (tiled) the
    tiles of every image's work image, with their layout."""
    if tiled is None:
        imgs = list(images)
        out = np.empty((len(imgs), img_size, img_size, 3), np.uint8)
        for i, im in enumerate(imgs):
            out[i] = resize_image(im, img_size, policy)
        return out, None
    tiles, shapes = [], []
    for im in images:
        work = work_image(im, tiled.tiling, policy)
        shapes.append(work.shape[:2])
        tiles.append(tiled.tiling.crop(work, tiled.tiling.grid(work.shape[:2])))
    t = tiled.tiling.tile
    stack = np.concatenate(tiles) if tiles else np.zeros((0, t, t, 3), np.uint8)
    return stack, replace(tiled, work_shapes=tuple(shapes))


@dataclass
class CalibSet:
    """uint8 (N, S, S, 3) RGB graph inputs plus where they came from (recorded in parity.json); a tiled engine's
    set holds the tiles of its images and their ``layout``."""

    images: np.ndarray
    source: str  # "calib-data:<root>", "sample:<root>" or "generated:..."
    paths: list[str] = field(default_factory=list)
    layout: TileLayout | None = None

    def __len__(self) -> int:
        """Images (not tiles)."""
        return len(self.layout.work_shapes) if self.layout is not None else int(self.images.shape[0])


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file below ``root`` (recursively), sorted for determinism; hidden files skipped."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def in_folder(path: Path, root: Path, names: Iterable[str]) -> bool:
    """Whether a folder between ``root`` and the file ``path`` has one of ``names`` (case-insensitive)."""
    return not {q.lower() for q in path.relative_to(root).parts[:-1]}.isdisjoint(names)


def _spread(paths: list[Path], n: int) -> list[Path]:
    """n paths evenly spread over the sorted list (so good and defective folders are both used)."""
    if len(paths) <= n:
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in dict.fromkeys(idx.tolist())]


def _read(paths: Iterable[Path]) -> Iterable[np.ndarray]:
    for p in paths:
        try:
            yield read_image_rgb(p)
        except InputError as e:
            raise ValueError(str(e)) from None


def load_views(paths: list[Path], img_size: int, policy: str = DEFAULT_RESIZE,
               tiled: TileLayout | None = None) -> tuple[np.ndarray, TileLayout | None]:
    """Read with the runtime's one reader and make the graph inputs (:func:`model_views`)."""
    return model_views(_read(paths), img_size, policy, tiled)


def load_images(paths: list[Path], img_size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """Read with the runtime's one reader and resize by the engine's ``policy`` to (N, S, S, 3) uint8."""
    return load_views(paths, img_size, policy)[0]


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


def _calib_set(paths: list[Path], img_size: int, policy: str, tiled: TileLayout | None, source: str) -> CalibSet:
    images, layout = load_views(paths, img_size, policy, tiled)
    return CalibSet(images, source, [str(p) for p in paths], layout)


def calibration_images(calib_data: str | os.PathLike | None, img_size: int,
                       max_images: int = DEFAULT_MAX_IMAGES, policy: str = DEFAULT_RESIZE,
                       tiled: TileLayout | None = None) -> CalibSet:
    """The parity/calibration batch: ``calib_data`` (its mask folders skipped, so a data-set root works), else the
    bundled sample, else generated images (tiled: generated at the work size)."""
    if max_images < 1:
        raise ValueError(f"--parity-images: must be >= 1, got {max_images}")
    if calib_data is not None:
        root = image_folder("--calib-data", calib_data)
        found = find_images(root)
        paths = [p for p in found if not in_folder(p, root, MASK_FOLDERS)]
        if not paths:
            what = "only mask images (ground_truth/, masks/)" if found else "no images"
            raise ValueError(f"--calib-data {root}: {what} found below it ({', '.join(IMAGE_EXTENSIONS)}); "
                             "point it at a folder of input images")
        chosen = _spread(paths, max_images)
        return _calib_set(chosen, img_size, policy, tiled, f"calib-data:{root}")
    sample = sample_data_root()
    if sample is not None:
        chosen = _spread(find_images(sample / "test"), max_images)
        return _calib_set(chosen, img_size, policy, tiled, f"sample:{sample}")
    n = max_images
    if tiled is None:
        return CalibSet(generated_images(n, img_size), "generated:smooth-fields(seed=0)", [])
    images, layout = model_views(generated_images(n, tiled.tiling.work_size), img_size, policy, tiled)
    return CalibSet(images, "generated:smooth-fields(seed=0)", [], layout)
