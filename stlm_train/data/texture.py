"""A procedural grey-scale surface-texture category whose images all differ in size.

The generated object set (:mod:`stlm_train.data.generated`) is a square colour product centred in the
frame. This one stands in for the other kind of category a line meets: a woven, grainy surface filling
the whole frame, stored as single-channel PNGs of a different height and width each (so every image
is stretched differently on its way to the model, and the borders carry texture, not background).
Defects are scratches, dark spots, cracks and patches where the weave is missing, at any position,
borders included; masks hold exactly the changed pixels. Layout and determinism as the object set::

    ROOT/train/good/000.png ...    ROOT/test/good/...    ROOT/test/defect/...
    ROOT/ground_truth/defect/000_mask.png (0/255)

``python -m stlm_train.data.texture ROOT`` writes it (defaults: 150 / 20 / 30 images, sides 320-720).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from stlm_train.data.generated import _rng, write_category
from stlm_train.data.io import PathLike

_SPLIT_IDS = {"train": 10, "test_good": 11, "test_bad": 12}


def _surface(rng: np.random.Generator, shape: tuple[int, int], period: float) -> np.ndarray:
    """One good surface (float32 grey levels): a slightly rotated weave, grain and uneven light."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.deg2rad(rng.uniform(-3.0, 3.0))
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    p = period * rng.uniform(0.95, 1.05)
    weave = np.sin(2 * np.pi * u / p + rng.uniform(0, 2 * np.pi)) * np.sin(2 * np.pi * v / p + rng.uniform(0, 2 * np.pi))
    grain = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 1.2)
    coarse = rng.uniform(-1.0, 1.0, (4, 4)).astype(np.float32)
    light = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return rng.uniform(115, 135) + 28.0 * weave + 18.0 * grain + 10.0 * light


def _defects(rng: np.random.Generator, img: np.ndarray, period: float) -> np.ndarray:
    """Change 1-2 regions of ``img`` in place; return the {0,1} mask of exactly the changed pixels."""
    h, w = img.shape
    side = min(h, w)
    layer = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = int(rng.uniform(0.05, 0.95) * w), int(rng.uniform(0.05, 0.95) * h)
        kind = int(rng.integers(0, 4))
        one = np.zeros_like(layer)
        if kind in (0, 2):  # scratch (straight-ish, bright or dark) or crack (jagged, dark)
            ang, pts = rng.uniform(0, 2 * np.pi), [(x0, y0)]
            n, turn = (3, 0.25) if kind == 0 else (8, 0.9)
            for _k in range(n):
                ang += rng.uniform(-turn, turn)
                step = rng.uniform(0.1, 0.2) * side if kind == 0 else rng.uniform(0.03, 0.06) * side
                x0, y0 = int(round(x0 + np.cos(ang) * step)), int(round(y0 + np.sin(ang) * step))
                pts.append((x0, y0))
            cv2.polylines(one, [np.array(pts, np.int32)], False, 1, int(rng.integers(2, 5)), cv2.LINE_8)
            shift = rng.choice([-1.0, 1.0]) * rng.uniform(45, 70) if kind == 0 else -rng.uniform(50, 80)
            img[one.astype(bool)] += shift
        elif kind == 1:  # dark spot
            axes = (int(rng.uniform(0.025, 0.06) * side) + 2, int(rng.uniform(0.025, 0.06) * side) + 2)
            cv2.ellipse(one, (x0, y0), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
            img[one.astype(bool)] -= rng.uniform(40, 60)
        else:  # the weave is missing: the local mean level without its pattern
            axes = (int(rng.uniform(0.04, 0.08) * side) + 2, int(rng.uniform(0.03, 0.06) * side) + 2)
            cv2.ellipse(one, (x0, y0), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
            flat = cv2.blur(img, (int(2 * period) | 1, int(2 * period) | 1))
            sel = one.astype(bool)
            img[sel] = flat[sel] + rng.normal(0.0, 3.0, int(sel.sum()))
        layer |= one
    return layer


def make_texture_dataset(
    root: PathLike,
    n_train: int = 150,
    n_test_good: int = 20,
    n_test_bad: int = 30,
    sides: tuple[int, int] = (320, 720),
    seed: int = 0,
) -> Path:
    """Write the texture category (MVTec layout) at ``root``; return it. Heights and widths are drawn
    independently from ``sides`` (inclusive) per image; the weave period is the same physical size in all."""
    lo, hi = sides
    if lo < 32 or hi < lo:
        raise ValueError(f"sides must be (low, high) with 32 <= low <= high, got {sides}")
    period = float(_rng(seed, 98).uniform(10.0, 14.0))

    def draw(split: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        rng = _rng(seed, _SPLIT_IDS[split], i)
        img = _surface(rng, (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))), period)
        mask = _defects(rng, img, period) if split == "test_bad" else None
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask

    return write_category(root, {"train": n_train, "test_good": n_test_good, "test_bad": n_test_bad}, draw)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlm_train.data.texture ROOT [--seed S]``: write the category to ROOT."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m stlm_train.data.texture", description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=150)
    p.add_argument("--test-good", type=int, default=20)
    p.add_argument("--test-bad", type=int, default=30)
    a = p.parse_args(argv)
    try:
        out = make_texture_dataset(a.root, a.train, a.test_good, a.test_bad, seed=a.seed)
    except (ValueError, OSError) as e:
        raise SystemExit(f"Error: {a.root}: {e}") from None
    print(f"wrote {out} ({a.train} train, {a.test_good} good and {a.test_bad} defective test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
