"""Pseudo-anomaly synthesis for STLM training (paper section 3.1, official trainSTLM.py).

Each training image N yields (N, I_a, M). With probability ``1 - probability`` (0.5 officially) no
anomaly is pasted: I_a = N, M = 0. Otherwise Perlin noise with scales (2^tx, 2^ty), tx, ty uniform in
{0..5}, rotated uniformly within +-90 degrees and thresholded at 0.5, gives the mask M, and

    I_a = N * (1 - M) + (1 - beta) * A * M + beta * N * M,     beta ~ U(0, beta_max = 0.8)

with A a random texture image (a DTD-style folder, or built-in procedural textures) resized to N's
size. Geometric augmentation is applied to N *before* the noise, so N and I_a stay aligned: "none",
"slight" (+-5 degrees) or "rotation" (k*90 degrees plus +-5), border fill (114, 114, 114). By default
it is applied to the image at its own (full) resolution and only then resized to ``img_size``: a
+-5 degree bilinear warp at 256 px blurs every training image while test images are never warped,
so good test images looked sharper than anything seen in training and scored high.

Tiled training (``tiling``): the image is resized once to its work shape (long side ``work_size``, aspect kept:
:meth:`stlm_deploy.tiling.Tiling.work_shape`) instead of to ``img_size``, after the geometric augmentation as
above, and an ``img_size`` crop at a position drawn from the sample's generator becomes N; the anomaly is
pasted inside the crop. ``crop=False`` keeps the whole work image (the calibration stream of the thresholds,
which is scored tile by tile and stitched like a test image).

Differences from the official code, on purpose: randomness comes from a ``np.random.Generator``
passed per sample (deterministic with any number of DataLoader workers), the Perlin noise and the
rotations are numpy/OpenCV instead of imgaug/PIL, the noise is skipped entirely when no anomaly is
pasted (it would be thrown away), and I_a is rounded to uint8 instead of truncated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import cv2
import numpy as np

from stlm_deploy.preprocess import work_image
from stlm_deploy.tiling import Tiling
from stlm_train.data.io import DEFAULT_RESIZE, DataError, PathLike, list_images, read_image_rgb, resize_rgb

AUGMENTATIONS: tuple[str, ...] = ("none", "slight", "rotation")
FILL_COLOUR: tuple[int, int, int] = (114, 114, 114)
SLIGHT_DEGREES = 5.0

# Per-category lists of the official trainSTLM.py main block (MVTec AD). Some categories appear in
# several lists there (each list trains its own model); we pick one mode per category.
NO_ROTATION_CATEGORIES: tuple[str, ...] = (
    "capsule", "metal_nut", "pill", "toothbrush", "transistor", "screw", "grid",
)
SLIGHT_ROTATION_CATEGORIES: tuple[str, ...] = (
    "wood", "zipper", "cable", "transistor", "screw", "grid",
)
ROTATION_CATEGORIES: tuple[str, ...] = (
    "bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw", "transistor",
)

PROCEDURAL_KINDS: tuple[str, ...] = ("noise", "stripes", "checker", "marble", "voronoi", "raw")


class TextureBank(NamedTuple):
    """Which procedural kinds a bank draws, whether each texture then gets a per-channel gain/offset colour
    jitter, and the share of anomalies whose texture is the clean image itself, rearranged
    (:func:`self_texture`), instead of a bank or folder texture. A procedural texture is foreign content: the
    FA head can learn to spot the texture itself in its input (where the students agree, the channel products
    still describe the content) instead of the students' disagreement, which is all a real defect in familiar
    material gives it. ``grey_like_image``: on a grey image (R = G = B) the texture is turned grey too, since a
    defect on a grey-scale line has no colour and a coloured pseudo anomaly teaches the FA head a cue that never
    fires there."""

    kinds: tuple[str, ...]
    jitter: bool
    self_share: float = 0.0
    grey_like_image: bool = False


REFERENCE_KINDS: tuple[str, ...] = ("noise", "stripes", "marble", "voronoi", "raw")
#: "reference" (five kinds incl. Voronoi cells and raw noise, jittered colours) is the bank of the reference
#: trainer; "v1" is this project's first (saturated colours); "reference+self" the reference bank for half the
#: anomalies and the image's own material for the other half; "reference+grey" the reference bank, grey on grey
#: images.
TEXTURE_BANKS: dict[str, TextureBank] = {
    "reference": TextureBank(REFERENCE_KINDS, True),
    "v1": TextureBank(("noise", "stripes", "checker", "marble"), False),
    "reference+self": TextureBank(REFERENCE_KINDS, True, self_share=0.5),
    "reference+grey": TextureBank(REFERENCE_KINDS, True, grey_like_image=True),
}
#: The reference bank, grey on grey images: on a generated grey-scale texture category (20 min, seeds 0-2) FA pixel
#: AUROC 0.74 -> 0.97 and TLM 0.74 -> 0.94 against the plain reference bank; on colour images the two are the same.
DEFAULT_TEXTURE_BANK = "reference+grey"


def augmentation_for_category(name: Optional[str]) -> str:
    """Geometric augmentation mode for a category, from the official per-category lists.

    Where the official code lists a category several times (grid, screw and transistor are in all
    three lists), "none" wins if it is in the no-rotation list, else "slight" before "rotation": the
    milder choice never teaches the model that a rotated part is normal when orientation matters.
    Unknown categories (VisA, DAGM, custom) get "none".
    """
    key = (name or "").strip().lower()
    if key in NO_ROTATION_CATEGORIES:
        return "none"
    if key in SLIGHT_ROTATION_CATEGORIES:
        return "slight"
    if key in ROTATION_CATEGORIES:
        return "rotation"
    return "none"


# ----------------------------------------------------------------------------------------------
# Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise_2d(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 ``shape``, values within [-1, 1].

    ``res`` = (cells along rows, cells along columns). When a size is not a multiple of its cell
    count the noise is generated on the next multiple and cropped, so any image size works.
    Fully vectorised: the per-pixel corner gradients are gathered with index arrays.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h <= 0 or w <= 0 or ry <= 0 or rx <= 0:
        raise ValueError(f"perlin_noise_2d needs positive shape and res, got {shape} and {res}")
    ph, pw = -(-h // ry) * ry, -(-w // rx) * rx  # padded sizes, multiples of the cell counts
    angles = (2.0 * np.pi) * rng.random((ry + 1, rx + 1))
    gy = np.cos(angles).astype(np.float32)  # gradient component along rows
    gx = np.sin(angles).astype(np.float32)  # gradient component along columns
    y = np.arange(h, dtype=np.float64) * (ry / ph)
    x = np.arange(w, dtype=np.float64) * (rx / pw)
    iy, ix = np.floor(y).astype(np.intp), np.floor(x).astype(np.intp)
    fy, fx = (y - iy).astype(np.float32)[:, None], (x - ix).astype(np.float32)[None, :]
    iy0, ix0 = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[iy0 + dy, ix0 + dx] * (fy - dy) + gx[iy0 + dy, ix0 + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    left = n00 + ty * (n10 - n00)  # blend along rows, column cell edge 0
    right = n01 + ty * (n11 - n01)  # blend along rows, column cell edge 1
    return (math.sqrt(2.0) * (left + tx * (right - left))).astype(np.float32)


def _rotate(
    img: np.ndarray, degrees: float, border: Any, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Rotate about the centre (counter-clockwise for positive angles), keeping the size."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(degrees), 1.0)
    return cv2.warpAffine(
        img, m, (w, h), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=border
    )


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    threshold: float = 0.5,
    max_scale_exp: int = 6,
    max_rotation: float = 90.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """Binary float32 mask from rotated, thresholded Perlin noise, and the drawn parameters.

    Scales 2^tx, 2^ty with tx, ty uniform in {0, ..., max_scale_exp - 1}; rotation uniform in
    +-max_rotation degrees (zero fill, so rotated-in corners are never anomalous).
    """
    tx = int(rng.integers(0, max_scale_exp))
    ty = int(rng.integers(0, max_scale_exp))
    noise = perlin_noise_2d(shape, (2**tx, 2**ty), rng)
    angle = float(rng.uniform(-max_rotation, max_rotation))
    noise = _rotate(noise, angle, 0.0)
    mask = (noise > threshold).astype(np.float32)
    return mask, {"tx": tx, "ty": ty, "noise_angle": angle}


# ----------------------------------------------------------------------------------------------
# geometric augmentation


def augment_geometry(image: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Apply the category's geometric augmentation to a normal image (before any anomaly).

    "rotation" turns by k*90 degrees (k uniform in {0..3}, exact for square images) and then by a
    uniform +-5 degrees; "slight" does only the latter; "none" returns the image unchanged.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{mode}' (expected one of {', '.join(AUGMENTATIONS)})")
    if mode == "none":
        return image
    out = image
    if mode == "rotation":
        k = int(rng.integers(0, 4))
        if k:
            h, w = out.shape[:2]
            if h == w:  # exact, no interpolation
                out = np.ascontiguousarray(np.rot90(out, k))
            else:
                out = _rotate(out, 90.0 * k, FILL_COLOUR)
    angle = float(rng.uniform(-SLIGHT_DEGREES, SLIGHT_DEGREES))
    return _rotate(out, angle, FILL_COLOUR)


# ----------------------------------------------------------------------------------------------
# anomaly textures


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n saturated-ish colours (float32 n x 3): textures should look unlike the product."""
    hsv = np.stack(
        [rng.uniform(0, 180, n), rng.uniform(80, 255, n), rng.uniform(60, 255, n)], axis=1
    ).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def procedural_texture(
    size: int | tuple[int, int], rng: np.random.Generator, kind: Optional[str] = None
) -> np.ndarray:
    """A random colourful texture (uint8 HxWx3 RGB) used as A when no texture folder is given.

    Kinds: "noise" (smooth colour noise), "stripes", "checker" (rotated), "marble" (Perlin colour),
    "voronoi" (flat-coloured cells), "raw" (per-pixel noise).
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if kind is None:
        kind = PROCEDURAL_KINDS[int(rng.integers(0, len(PROCEDURAL_KINDS)))]
    if kind == "noise":
        cells = int(rng.integers(2, 33))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
        tex = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        tex += rng.normal(0, 12, tex.shape).astype(np.float32)
    elif kind in ("stripes", "checker"):
        c = _random_colours(rng, 2)
        period = float(rng.uniform(4, max(5.0, min(h, w) / 4)))
        theta = float(rng.uniform(0, np.pi))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) / period
        if kind == "stripes":
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * u)
            if rng.random() < 0.5:
                wave = (wave > 0.5).astype(np.float32)  # hard-edged stripes
        else:
            v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period
            wave = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        tex = c[0] * (1 - wave[..., None]) + c[1] * wave[..., None]
    elif kind == "marble":
        res = int(2 ** rng.integers(1, 5))
        tex = np.stack([perlin_noise_2d((h, w), (res, res), rng) for _ in range(3)], axis=-1)
        tex = 127.5 + 127.5 * tex * float(rng.uniform(0.8, 1.6))
    elif kind == "voronoi":  # flat-coloured cells around random seeds (cracks, grains, flakes)
        n = int(rng.integers(4, 65))
        gh, gw = min(h, 256), min(w, 256)  # cells are computed on at most 256 px, then scaled up
        seeds = rng.uniform(0, 1, (n, 2)).astype(np.float32) * np.array([gh, gw], np.float32)
        colours = rng.uniform(0, 255, (n, 3)).astype(np.float32)
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2  # (gh, gw, n)
        tex = cv2.resize(colours[np.argmin(d, axis=-1)], (w, h), interpolation=cv2.INTER_NEAREST)
    elif kind == "raw":  # i.i.d. per-pixel colour noise around a random mean
        tex = rng.uniform(0, 255, 3).astype(np.float32) + rng.normal(0, rng.uniform(20, 80), (h, w, 3))
    else:
        raise ValueError(f"unknown procedural texture '{kind}' (expected one of {PROCEDURAL_KINDS})")
    return np.clip(np.rint(tex), 0, 255).astype(np.uint8)


def self_texture(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The clean image turned by k*90 degrees (k in 1..3), mirrored half the time and rolled by a random
    offset: the object's own material out of place (same size as ``clean``)."""
    h, w = clean.shape[:2]
    tex = np.rot90(clean, int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    tex = np.roll(tex, (int(rng.integers(0, tex.shape[0])), int(rng.integers(0, tex.shape[1]))), axis=(0, 1))
    if tex.shape[:2] != (h, w):
        tex = cv2.resize(np.ascontiguousarray(tex), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(tex)


def colour_jitter(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain U(0.5, 1.5) and offset U(-60, 60): textures of every brightness and tint."""
    gain = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    offset = rng.uniform(-60, 60, 3).astype(np.float32)
    return np.clip(np.rint(texture.astype(np.float32) * gain + offset), 0, 255).astype(np.uint8)


class TextureSource:
    """Where anomaly textures A come from: an image folder (searched recursively) or a procedural bank."""

    def __init__(self, folder: Optional[PathLike] = None, bank: str = DEFAULT_TEXTURE_BANK) -> None:
        if bank not in TEXTURE_BANKS:
            raise ValueError(f"texture bank must be one of {', '.join(TEXTURE_BANKS)}, got {bank!r}")
        self.kinds, self.jitter, self.self_share, self.grey_like_image = TEXTURE_BANKS[bank]
        self.folder = Path(folder) if folder is not None else None
        self.files: list[Path] = []
        if self.folder is not None:
            if not self.folder.is_dir():
                raise DataError(
                    f"anomaly source '{self.folder}' is not a readable folder "
                    "(expected a DTD-style images/<class>/*.jpg tree or any image folder)"
                )
            try:
                self.files = list_images(self.folder, recursive=True)
            except OSError as exc:
                raise DataError(f"anomaly source '{self.folder}' cannot be listed: {exc}") from None
            if not self.files:
                raise DataError(
                    f"anomaly source '{self.folder}' contains no images "
                    "(expected .png/.jpg/.jpeg/.bmp/.tif/.tiff files, searched recursively)"
                )

    def sample(self, size: tuple[int, int], rng: np.random.Generator,
               clean: Optional[np.ndarray] = None) -> tuple[np.ndarray, str]:
        """One texture resized to ``size`` (h, w), and a name saying where it came from; with a bank that
        has a self share and ``clean`` given (h x w), that share of draws is :func:`self_texture` of it; with
        ``grey_like_image`` and a grey ``clean``, the texture is grey (:func:`grey_texture`)."""
        if self.self_share and clean is not None and rng.random() < self.self_share:
            return self_texture(clean, rng), "self"
        if self.files:
            path = self.files[int(rng.integers(0, len(self.files)))]
            tex, name = resize_rgb(read_image_rgb(path), size), str(path)
        else:
            kind = self.kinds[int(rng.integers(0, len(self.kinds)))]
            tex = procedural_texture(size, rng, kind)
            tex, name = (colour_jitter(tex, rng) if self.jitter else tex), f"procedural:{kind}"
        if self.grey_like_image and clean is not None and is_grey(clean):
            return grey_texture(tex), name + " (grey)"
        return tex, name


def is_grey(image: np.ndarray) -> bool:
    """Whether an HxWx3 image has three equal channels (a grey-scale file as the loaders return it)."""
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


def grey_texture(texture: np.ndarray) -> np.ndarray:
    """The texture's luminance in all three channels (uint8 HxWx3)."""
    return np.ascontiguousarray(np.repeat(cv2.cvtColor(texture, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2))


# ----------------------------------------------------------------------------------------------
# synthesis


def blend(clean: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """The paper's equation (1): I_a = N(1-M) + (1-beta) A M + beta N M, as float32 HxWx3."""
    n = clean.astype(np.float32)
    a = texture.astype(np.float32)
    m = mask.astype(np.float32)
    if m.ndim == 2:
        m = m[..., None]
    b = np.float32(beta)
    return n * (1.0 - m) + (1.0 - b) * a * m + b * n * m


class PseudoAnomalySynthesizer:
    """Turns one normal training image into (clean N, pseudo-anomalous I_a, mask M).

    Pass a per-sample ``np.random.Generator`` (see :func:`sample_rng`) so results do not depend on
    DataLoader workers; without one an internal generator seeded with ``seed`` is used.
    After each call ``last_params`` holds what was drawn (applied, beta, tx, ty, angles, texture
    name and array) so tests and debugging can check the blend exactly.
    """

    def __init__(
        self,
        img_size: int,
        anomaly_source: Optional[PathLike] = None,
        augmentation: str = "none",
        probability: float = 0.5,
        beta_max: float = 0.8,
        seed: int = 0,
        texture_bank: str = DEFAULT_TEXTURE_BANK,
        resize: str = DEFAULT_RESIZE,
        augment_before_resize: bool = True,
        tiling: Optional[Tiling] = None,
        crop: bool = True,
    ) -> None:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"unknown augmentation '{augmentation}' (expected one of {', '.join(AUGMENTATIONS)})"
            )
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if not 0.0 <= beta_max <= 1.0:
            raise ValueError(f"beta_max must be in [0, 1], got {beta_max}")
        self.img_size = int(img_size)
        self.augmentation = augmentation
        self.probability = float(probability)
        self.beta_max = float(beta_max)
        self.resize = resize
        self.augment_before_resize = bool(augment_before_resize)
        if tiling is not None and tiling.tile != self.img_size:
            raise ValueError(f"tiling tile {tiling.tile} must be the img_size {self.img_size}")
        self.tiling = tiling
        self.crop = bool(crop)
        self.textures = TextureSource(anomaly_source, texture_bank)
        self._rng = np.random.default_rng(seed)
        self.last_params: dict[str, Any] = {}

    def __call__(
        self, image: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 HxWx3 RGB image, got {image.dtype} array of shape {image.shape}"
            )
        rng = self._rng if rng is None else rng
        if self.augment_before_resize:  # warp the full-resolution image: the resize then removes the blur
            clean = self._model_size(augment_geometry(image, self.augmentation, rng))
        else:
            clean = augment_geometry(self._model_size(image), self.augmentation, rng)
        if self.tiling is not None and self.crop:  # an img_size crop of the work image, drawn per sample
            t = self.tiling.tile
            y, x = int(rng.integers(0, clean.shape[0] - t + 1)), int(rng.integers(0, clean.shape[1] - t + 1))
            clean = np.ascontiguousarray(clean[y:y + t, x:x + t])
        h, w = clean.shape[:2]
        params: dict[str, Any] = {"applied": bool(rng.random() < self.probability)}
        if not params["applied"]:
            self.last_params = params
            return clean, clean.copy(), np.zeros((h, w), dtype=np.float32)
        mask, noise_params = perlin_mask((h, w), rng)
        params.update(noise_params)
        params["beta"] = float(rng.uniform(0.0, self.beta_max))
        texture, params["texture_name"] = self.textures.sample((h, w), rng, clean)
        params["texture"] = texture
        pseudo = np.rint(blend(clean, texture, mask, params["beta"])).astype(np.uint8)
        self.last_params = params
        return clean, pseudo, mask

    def _model_size(self, image: np.ndarray) -> np.ndarray:
        """``img_size`` square, or a tiled model's work shape."""
        if self.tiling is None:
            return resize_rgb(image, self.img_size, self.resize)
        return work_image(image, self.tiling, self.resize)


def sample_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one sample, from (seed, epoch, index, ...): reproducible across workers."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)]))
    )


class PseudoAnomalyDataset:
    """Wraps a data set of normal images into training triples, deterministically per (epoch, index).

    ``base[i]`` may be a :class:`stlm_train.data.Sample` (uses ``.image``) or an HxWx3 array;
    ``indices`` picks the part of ``base`` used (default: all). A key is an index (drawn for the
    epoch set by :meth:`set_epoch`) or an ``(epoch, index)`` pair, which is what the trainer's batch
    sampler yields, so the draw never depends on DataLoader workers, order or resumption.
    Items are dicts ``{"clean", "pseudo", "mask", "index"}`` (uint8 HxWx3, uint8 HxWx3, float32 HxW,
    int) which torch's default collate batches.
    """

    def __init__(
        self,
        base: Sequence[Any],
        synthesizer: PseudoAnomalySynthesizer,
        seed: int = 0,
        transform: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        self.base = base
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.epoch = 0
        self.transform = transform
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        item = self.base[self.indices[index]]
        image = item.image if hasattr(item, "image") else np.asarray(item)
        clean, pseudo, mask = self.synthesizer(image, sample_rng(self.seed, epoch, index))
        out = {"clean": clean, "pseudo": pseudo, "mask": mask, "index": index}
        return self.transform(out) if self.transform is not None else out


__all__ = [
    "AUGMENTATIONS",
    "FILL_COLOUR",
    "NO_ROTATION_CATEGORIES",
    "PROCEDURAL_KINDS",
    "TEXTURE_BANKS",
    "TextureBank",
    "colour_jitter",
    "grey_texture",
    "is_grey",
    "ROTATION_CATEGORIES",
    "SLIGHT_ROTATION_CATEGORIES",
    "PseudoAnomalyDataset",
    "PseudoAnomalySynthesizer",
    "TextureSource",
    "augment_geometry",
    "augmentation_for_category",
    "blend",
    "perlin_mask",
    "perlin_noise_2d",
    "procedural_texture",
    "self_texture",
    "sample_rng",
]
