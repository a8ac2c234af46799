"""Train/test sharpness match: does what the students see in training look like what they are tested on?

A trained student flags anything its training images never showed; if every training image passes a
bilinear rotation and no test image does, the test images are sharper than anything seen in training
and good test images score high (issue 11, cause 3). This measures the ratio of the mean |Laplacian|
of the good test images to that of the augmented training images (1.0 = matched) for each resize policy
and each place of the geometric augmentation (before or after the resize), on the whole image and on
the central crop (the whole-image figure also counts the edges of the grey fill the rotation adds).

    python -m stlm_bench.sharpness      # the bundled real sample, 256 px, the trainer's augmentation for it

Results: ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np


from .accuracy import bundled_sample_or_exit
from .measure import machine_line
from .output import emit_beside, run_main

RESULTS = Path(__file__).resolve().parent / "results"


def mean_abs_laplacian(image: np.ndarray, crop: float = 1.0) -> float:
    """Mean |Laplacian| of the grey image over its central ``crop`` fraction (a sharpness measure)."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    h, w = lap.shape
    dy, dx = int(round(h * (1 - crop) / 2)), int(round(w * (1 - crop) / 2))
    return float(lap[dy:h - dy, dx:w - dx].mean())


def _images(folder: Path) -> list[Path]:
    from stlm_train.data.io import list_images

    files = list_images(folder)
    if not files:
        raise SystemExit(f"Error: {folder}: expected good images, found none")
    return files


def measure(root: Path, img_size: int, augmentation: str, draws: int, seed: int,
            crops: tuple[float, ...] = (1.0, 0.7)) -> list[dict[str, Any]]:
    """One row per (resize policy, augmentation place): test/train sharpness ratios per crop."""
    from stlm_deploy.preprocess import RESIZE_POLICIES
    from stlm_train.anomalies import augment_geometry
    from stlm_train.data.io import read_image_rgb, resize_rgb

    train = [read_image_rgb(p) for p in _images(root / "train" / "good")]
    test = [read_image_rgb(p) for p in _images(root / "test" / "good")]
    rows = []
    for policy in RESIZE_POLICIES:
        test_sharp = {c: np.mean([mean_abs_laplacian(resize_rgb(im, img_size, policy), c) for im in test])
                      for c in crops}
        places = {
            "no augmentation": lambda im, rng: resize_rgb(im, img_size, policy),
            "before the resize": lambda im, rng: resize_rgb(augment_geometry(im, augmentation, rng), img_size, policy),
            "after the resize": lambda im, rng: augment_geometry(resize_rgb(im, img_size, policy), augmentation, rng),
        }
        for place, make in places.items():
            rng = np.random.default_rng(seed)
            seen = [make(im, rng) for im in train for _ in range(1 if place == "no augmentation" else draws)]
            row: dict[str, Any] = {"resize": policy, "augmentation": place}
            for c in crops:
                row[f"ratio_crop_{c:g}"] = float(test_sharp[c] / np.mean([mean_abs_laplacian(s, c) for s in seen]))
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    crops = [k for k in rows[0] if k.startswith("ratio_crop_")]
    head = ["resize", "augmentation", *(f"test/train, {'whole image' if k.endswith('_1') else 'central ' + k.rsplit('_', 1)[1]}"
                                        for k in crops)]
    lines = [f"# Train/test sharpness: {meta['data']} ({meta['img_size']} px, augmentation {meta['augmentation']!r}, "
             f"{meta['draws']} draws per training image)", "",
             "Mean |Laplacian| of the good test images over that of the training images as the trainer makes "
             f"them (1.0 = matched; > 1: test images are sharper). Machine: {meta['machine']}. "
             f"Command: `{meta['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["resize"], r["augmentation"], *(f"{r[k]:.3f}" for k in crops)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stlm_bench.sharpness", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="MVTec-layout category root (default: the bundled sample)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--augmentation", default="auto", help="auto (the trainer's choice for the category) | none | slight | rotation")
    p.add_argument("--draws", type=int, default=8, help="augmented draws per training image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default sharpness_<data>)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    from stlm_train.anomalies import AUGMENTATIONS

    if args.augmentation not in ("auto", *AUGMENTATIONS):
        raise SystemExit(f"Error: --augmentation: expected auto or one of {', '.join(AUGMENTATIONS)}, "
                         f"got {args.augmentation!r}")
    if args.draws < 1 or args.img_size < 8:
        raise SystemExit("Error: --draws must be >= 1 and --img-size >= 8")
    if args.data is None:
        args.data = bundled_sample_or_exit("pass --data ROOT")
    root = Path(args.data)
    from stlm_train.training.sampling import resolve_augmentation

    args.augmentation = resolve_augmentation(args.augmentation, root.resolve().name)
    rows = measure(root, args.img_size, args.augmentation, args.draws, args.seed)
    meta = {"data": args.data, "img_size": args.img_size, "augmentation": args.augmentation, "draws": args.draws,
            "seed": args.seed, "machine": machine_line(),
            "command": " ".join(["python -m stlm_bench.sharpness", *(sys.argv[1:] if argv is None else argv)])}
    json_path = Path(args.out_dir) / f"{args.name or 'sharpness_' + root.name}.json"
    emit_beside(markdown(rows, meta), {"meta": meta, "rows": rows}, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
