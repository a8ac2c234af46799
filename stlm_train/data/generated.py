"""A procedural MVTec-style data set, for tests and demos when no real images are available.

Each image shows the same "product" (a round, ring-patterned part on a smooth textured background)
with small per-image variation (position, lighting, grain), so a model can learn what normal looks
like. Defective test images add scratches, spots or cracks in a contrasting colour, drawn without
anti-aliasing on the image and on the mask with the same primitives, so masks match the drawn pixels
exactly. The files are written in the MVTec AD layout and load with ``format="mvtec"``::

    ROOT/train/good/000.png ...           n_train
    ROOT/test/good/000.png ...            n_test_good
    ROOT/test/defect/000.png ...          n_test_bad
    ROOT/ground_truth/defect/000_mask.png (0/255)

Every image is drawn from its own generator seeded by (seed, split, index): the same seed gives
byte-identical files, and changing one count does not change the other images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from stlm_train.data.io import PathLike

_SPLIT_IDS = {"train": 0, "test_good": 1, "test_bad": 2}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, *keys])))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _palette(seed: int) -> dict[str, np.ndarray]:
    """Colours shared by every image of one data set (the product does not change colour)."""
    rng = _rng(seed, 99)
    bg = rng.uniform(40, 90, 3)
    obj = rng.uniform(130, 200, 3)
    # The defect colour is pushed away from the object colour so defects are visible.
    defect = np.where(obj > 160, rng.uniform(10, 60, 3), rng.uniform(220, 255, 3))
    return {"bg": bg.astype(np.float32), "obj": obj.astype(np.float32), "defect": defect}


def _render_good(
    rng: np.random.Generator, size: int, pal: dict[str, np.ndarray]
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One normal image and its product disc (cx, cy, radius) in pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg_tex = 12.0 * _smooth_field(rng, size, 8) + 4.0 * _smooth_field(rng, size, 32)
    img = pal["bg"][None, None, :] + bg_tex[..., None]
    cx = size / 2 + rng.uniform(-0.02, 0.02) * size
    cy = size / 2 + rng.uniform(-0.02, 0.02) * size
    radius = size * (0.34 + rng.uniform(-0.01, 0.01))
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    rings = 14.0 * np.sin(r * (2 * np.pi / (size / 18.0)))
    light = 10.0 * ((xx - cx) + (yy - cy)) / size * rng.uniform(0.8, 1.2)
    obj = pal["obj"][None, None, :] + (rings + light)[..., None]
    inside = np.clip(radius - r + 0.5, 0.0, 1.0)[..., None]  # 1-pixel soft edge
    img = img * (1.0 - inside) + obj * inside
    # Centre hub: a darker disc, part of the normal structure.
    hub = np.clip(radius * 0.22 - r + 0.5, 0.0, 1.0)[..., None]
    img = img * (1.0 - hub) + (pal["obj"] * 0.55)[None, None, :] * hub
    img += rng.normal(0.0, 2.0, img.shape).astype(np.float32)  # sensor grain
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), (cx, cy, radius)


def _draw_defects(
    rng: np.random.Generator, img: np.ndarray, disc: tuple[float, float, float], colour: np.ndarray
) -> np.ndarray:
    """Draw 1-3 defects inside the product; return the {0,1} mask of exactly the drawn pixels."""
    size = img.shape[0]
    cx, cy, radius = disc
    layer = np.zeros(img.shape[:2], dtype=np.uint8)

    def point(max_frac: float = 0.85) -> tuple[int, int]:
        a, rr = rng.uniform(0, 2 * np.pi), radius * max_frac * np.sqrt(rng.uniform(0.05, 1.0))
        return int(round(cx + rr * np.cos(a))), int(round(cy + rr * np.sin(a)))

    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 3))
        thick = max(1, int(round(size / 128 * rng.uniform(1.0, 2.5))))
        if kind == 0:  # scratch: a straight-ish polyline
            x0, y0 = point()
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(0.15, 0.35) * size
            pts = [(x0, y0)]
            for _k in range(3):
                ang += rng.uniform(-0.3, 0.3)
                x0 = int(round(x0 + np.cos(ang) * length / 3))
                y0 = int(round(y0 + np.sin(ang) * length / 3))
                pts.append((x0, y0))
            cv2.polylines(layer, [np.array(pts, np.int32)], False, 1, thick, cv2.LINE_8)
        elif kind == 1:  # spot: a filled ellipse
            centre = point()
            axes = (int(rng.uniform(0.02, 0.06) * size) + 1, int(rng.uniform(0.02, 0.06) * size) + 1)
            cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
        else:  # crack: a jagged random walk
            x0, y0 = point()
            pts = [(x0, y0)]
            ang = rng.uniform(0, 2 * np.pi)
            for _k in range(8):
                ang += rng.uniform(-0.9, 0.9)
                step = rng.uniform(0.02, 0.05) * size
                x0, y0 = int(round(x0 + np.cos(ang) * step)), int(round(y0 + np.sin(ang) * step))
                pts.append((x0, y0))
            cv2.polylines(layer, [np.array(pts, np.int32)], False, 1, max(1, thick - 1), cv2.LINE_8)
    shade = colour[None, :] + rng.uniform(-10, 10, 3)[None, :]
    sel = layer.astype(bool)
    img[sel] = np.clip(np.rint(shade), 0, 255).astype(np.uint8)
    return layer


def make_generated_dataset(
    root: PathLike,
    n_train: int = 16,
    n_test_good: int = 6,
    n_test_bad: int = 6,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the procedural data set as one MVTec-layout category folder at ``root``; return it.

    Existing files of the same names are overwritten; others are left alone.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    pal = _palette(seed)

    def draw(split: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        rng = _rng(seed, _SPLIT_IDS[split], i)
        img, disc = _render_good(rng, size, pal)
        return img, (_draw_defects(rng, img, disc, pal["defect"]) if split == "test_bad" else None)

    return write_category(root, {"train": n_train, "test_good": n_test_good, "test_bad": n_test_bad}, draw)


def write_category(root: PathLike, counts: dict[str, int],
                   draw: Callable[[str, int], tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """Write ``counts[split]`` images per split ("train", "test_good", "test_bad") in the MVTec layout at
    ``root``: ``draw(split, i)`` gives the uint8 image (RGB or grey) and, for "test_bad", its {0,1} mask."""
    if min(counts.values()) < 0:
        raise ValueError("image counts must not be negative")
    out = Path(root)
    dirs = {"train": out / "train" / "good", "test_good": out / "test" / "good",
            "test_bad": out / "test" / "defect", "mask": out / "ground_truth" / "defect"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    png = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for split, count in counts.items():
        for i in range(count):
            img, mask = draw(split, i)
            if mask is not None:
                cv2.imwrite(str(dirs["mask"] / f"{i:03d}_mask.png"), mask * np.uint8(255), png)
            cv2.imwrite(str(dirs[split] / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img,
                        png)
    return out
