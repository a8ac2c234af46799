"""Images for INT8: calibration (good images only, never test images) and validation (the accuracy gate).

Calibration (``--calib-data DIR``): ``DIR/train/good`` when DIR is a data-set folder, else every image
below DIR; a folder that contains a ``test`` or ``ground_truth`` part is refused, because quantisation
ranges fitted on test images would flatter the gate. Default: the training split recorded in the
checkpoint (``train.data``/``format``/``category``), minus the held-out images the thresholds were
chosen on (those stay unseen, as in training).

Validation (``--val-data DIR``): the labelled test split of an MVTec-style folder (images, labels,
masks). Default: the held-out good images recorded in the checkpoint (one class: AUROC cannot be
computed, so the gate says so and gates decisions, maps and ranks only); with neither, the
calibration images (the weakest evidence, also said in parity.json).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .calib import CalibSet, _spread, find_images, load_images

__all__ = ["ValSet", "int8_calibration", "int8_validation", "DEFAULT_CALIB_IMAGES", "DEFAULT_VAL_IMAGES"]

DEFAULT_CALIB_IMAGES = 32
DEFAULT_VAL_IMAGES = 32
_TEST_PARTS = {"test", "ground_truth", "masks"}


@dataclass
class ValSet:
    """Validation images with what is known about them (labels/masks None when unknown)."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray | None  # (N,) 0 good / 1 anomalous
    masks: np.ndarray | None  # (N, S, S) {0, 1}; None without pixel labels
    source: str
    paths: list[str] = field(default_factory=list)
    note: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def two_classes(self) -> bool:
        return self.labels is not None and 0 < int(self.labels.sum()) < len(self.labels)


def _train_info(ckpt_obj: Any) -> Mapping[str, Any]:
    info = ckpt_obj.get("train") if isinstance(ckpt_obj, Mapping) else None
    return info if isinstance(info, Mapping) else {}


def _held_out_names(ckpt_obj: Any) -> set[str]:
    th = ckpt_obj.get("thresholds") if isinstance(ckpt_obj, Mapping) else None
    names = th.get("held_out") if isinstance(th, Mapping) else None
    return {str(n) for n in names} if isinstance(names, list) else set()


def _recorded_train_split(ckpt_obj: Any, img_size: int, resize: str) -> Any | None:
    """The checkpoint's training split (AnomalyDataset) when its folder still exists, else None."""
    from stlm_train.data import build_dataset
    from stlm_train.data.io import DataError

    info = _train_info(ckpt_obj)
    data = info.get("data")
    if not data or not Path(str(data)).is_dir():
        return None
    try:
        return build_dataset(str(data), str(info.get("format") or "mvtec"), category=info.get("category"),
                             split="train", img_size=img_size, resize=resize)
    except DataError:
        return None


def int8_calibration(calib_data: str | os.PathLike | None, ckpt_obj: Any, img_size: int, resize: str,
                     max_images: int = DEFAULT_CALIB_IMAGES) -> CalibSet:
    """Good images for quantisation ranges; raises ValueError (one line naming the flag) when there are none."""
    if calib_data is not None:
        root = Path(calib_data)
        if not root.is_dir():
            raise ValueError(f"--calib-data {root}: not a directory")
        base = root / "train" / "good" if (root / "train" / "good").is_dir() else root
        paths = find_images(base)
        bad = [p for p in paths if _TEST_PARTS & {q.lower() for q in (base.name, *p.relative_to(base).parts[:-1])}]
        if bad:
            raise ValueError(f"--calib-data {root}: contains test/mask images (e.g. {bad[0]}); calibration uses "
                             "good training images only: point it at train/good")
        if not paths:
            raise ValueError(f"--calib-data {root}: no images found below it")
        chosen = _spread(paths, max_images)
        return CalibSet(load_images(chosen, img_size, resize), f"calib-data:{base}", [str(p) for p in chosen])
    ds = _recorded_train_split(ckpt_obj, img_size, resize)
    if ds is None:
        raise ValueError("--int8: the checkpoint records no training data that exists here (train.data); pass "
                         "--calib-data DIR with good training images")
    held = _held_out_names(ckpt_obj)
    paths = [Path(p) for p in ds.paths if Path(p).name not in held]
    if not paths:
        raise ValueError(f"--int8: no training images left in {ds.root} after the held-out split; pass --calib-data")
    chosen = _spread(paths, max_images)
    return CalibSet(load_images(chosen, img_size, resize), f"train-split:{ds.root}", [str(p) for p in chosen])


def _labelled_split(root: Path, fmt: str, category: str | None, img_size: int, resize: str,
                    max_images: int) -> ValSet:
    from stlm_train.data import build_dataset

    ds = build_dataset(str(root), fmt, category=category, split="test", img_size=img_size, resize=resize)
    idx = list(range(len(ds)))
    if len(idx) > max_images:  # even spread keeps both classes of a sorted good/defect listing
        idx = sorted(set(np.linspace(0, len(idx) - 1, max_images).round().astype(int).tolist()))
    samples = [ds[i] for i in idx]
    masks = np.stack([s.mask for s in samples]) if ds.has_pixel_labels else None
    return ValSet(np.stack([s.image for s in samples]), np.array([s.label for s in samples], np.int64), masks,
                  f"val-data:{ds.name}:{root}", [s.path for s in samples],
                  "" if masks is not None else "no pixel labels: pixel AUROC not gated")


def int8_validation(val_data: str | os.PathLike | None, ckpt_obj: Any, img_size: int, resize: str,
                    calib: CalibSet | None, max_images: int = DEFAULT_VAL_IMAGES) -> ValSet:
    """The gate's images: ``--val-data``, else the held-out split, else the calibration images (said in ``note``)."""
    from stlm_train.data.io import DataError

    if val_data is not None:
        root = Path(val_data)
        if not root.is_dir():
            raise ValueError(f"--val-data {root}: not a directory")
        fmt = str(_train_info(ckpt_obj).get("format") or "mvtec")
        errors = []
        for f in dict.fromkeys([fmt, "mvtec", "folder"]):
            try:
                return _labelled_split(root, f, None, img_size, resize, max_images)
            except DataError as e:
                errors.append(f"{f}: {e}")
        raise ValueError(f"--val-data {root}: not a labelled test folder ({errors[0]})")
    ds = _recorded_train_split(ckpt_obj, img_size, resize)
    held = _held_out_names(ckpt_obj)
    if ds is not None and held:
        paths = [Path(p) for p in ds.paths if Path(p).name in held][:max_images]
        if paths:
            return ValSet(load_images(paths, img_size, resize), np.zeros(len(paths), np.int64), None,
                          f"held-out:{ds.root}", [str(p) for p in paths],
                          "held-out split (good images only): AUROC not gated, decisions/maps/ranks gated")
    if calib is None:
        raise ValueError("--val-data: needed here (no held-out split recorded in the checkpoint)")
    return ValSet(calib.images, np.zeros(len(calib), np.int64), None, calib.source, list(calib.paths),
                  "no --val-data and no held-out split recorded: gated on the calibration images (good only); "
                  "AUROC not gated")
