"""Images for the task gates and INT8 calibration: gate images judge, calibration images fit ranges, never both.

Gate images (what every task gate judges on: bf16/fp16 variants and INT8 artifacts), first that exists:

1. ``--val-data DIR``: the labelled test split of an MVTec-style folder (images, labels, masks);
2. the test split of the data set recorded in the checkpoint (``train.data``/``format``/``category``):
   labelled, never seen by training;
3. the held-out good images recorded in the checkpoint (one class: AUROC cannot be judged, said);
4. the bundled real sample's labelled test split (``$STLM_SAMPLE_DATA``; not this model's data, said);
5. INT8 only: every other calibration image, held out of calibration (so the two never overlap); float
   variants without anything else: the parity images (unlabelled), said in the evidence.

Calibration (``--calib-data DIR``, INT8 only): ``DIR/train/good`` when DIR is a data-set folder, else
every image below DIR; a folder that contains a ``test`` or ``ground_truth`` part is refused, because
quantisation ranges fitted on test images would flatter the gate. Default: the training split recorded
in the checkpoint, minus the held-out images the thresholds were chosen on. Whatever the sources, an
image the gate judges on is removed from the calibration images (compared by resolved path): a gate
never judges on the images it calibrated with.

A tiled engine (``tiled=TileLayout(tiling, top_k)``): every set holds the tiles of its images (what the graph
runs) and their layout; gate images keep one label per image and their masks at the work shape (what the
stitched maps are compared on); calibration uses every tile of its images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from stlm_deploy.tiling import gate_maps

from ..calib import (MASK_FOLDERS, CalibSet, TileLayout, _calib_set, _spread, calibration_images, find_images,
                     image_folder, in_folder, load_views, model_views, sample_data_root)
from ..task_gate import Evidence

if TYPE_CHECKING:
    from stlm_train.checkpoint import TrainSplit

__all__ = ["ValSet", "gate_data", "gate_validation", "int8_calibration", "int8_validation", "DEFAULT_CALIB_IMAGES",
           "DEFAULT_VAL_IMAGES"]

DEFAULT_CALIB_IMAGES = 32
#: Gate images judged at most (spread evenly): above the 50 the 98 % agreement limit needs to be resolvable.
DEFAULT_VAL_IMAGES = 64
_TEST_PARTS = {"test", *MASK_FOLDERS}


@dataclass
class ValSet:
    """Gate images with what is known about them (labels/masks None when unknown)."""

    images: np.ndarray  # uint8 (N, S, S, 3); a tiled engine: the tiles of the N images (``layout``)
    labels: np.ndarray | None  # (N,) 0 good / 1 anomalous
    masks: np.ndarray | None  # (N, S, S) {0, 1}; None without pixel labels (tiled: gate_maps of ``mask_list``)
    source: str
    paths: list[str] = field(default_factory=list)
    note: str = ""
    layout: TileLayout | None = None
    mask_list: list[np.ndarray] | None = None  # tiled: each image's mask at its work shape

    def __len__(self) -> int:
        """Images (not tiles)."""
        return len(self.layout.work_shapes) if self.layout is not None else int(self.images.shape[0])

    @property
    def two_classes(self) -> bool:
        return self.labels is not None and 0 < int(self.labels.sum()) < len(self.labels)

    def evidence(self) -> Evidence:
        """What a gate judging on these images can resolve (:class:`stlm_export.task_gate.Evidence`)."""
        return Evidence.of(self.labels, self.masks, len(self), self.source)

    def take(self, idx: list[int], source: str, note: str) -> "ValSet":
        """The images at ``idx`` (labels, masks, paths and tiles with them)."""
        sel = np.asarray(idx, np.int64)
        labels = None if self.labels is None else self.labels[sel]
        paths = [self.paths[i] for i in idx] if self.paths else []
        if self.layout is not None:
            mask_list = None if self.mask_list is None else [self.mask_list[i] for i in idx]
            return ValSet(self.images[self.layout.tile_index(idx)], labels,
                          None if mask_list is None else gate_maps(mask_list), source, paths, note,
                          self.layout.take(idx), mask_list)
        return ValSet(self.images[sel], labels, None if self.masks is None else self.masks[sel], source, paths, note)


def _recorded(recorded: "TrainSplit | None") -> "TrainSplit":
    from stlm_train.checkpoint import TrainSplit

    return recorded if recorded is not None else TrainSplit()


def _resolved(paths: Iterable[str | os.PathLike]) -> set[Path]:
    return {Path(p).resolve() for p in paths}


def int8_calibration(calib_data: str | os.PathLike | None, recorded: "TrainSplit | None", img_size: int,
                     resize: str, max_images: int = DEFAULT_CALIB_IMAGES, exclude: Iterable[str | os.PathLike] = (),
                     tiled: TileLayout | None = None) -> CalibSet:
    """Good images for quantisation ranges, never one of ``exclude`` (the gate images); raises ValueError
    (one line naming the flag) when there are none."""
    banned = _resolved(exclude)
    if calib_data is not None:
        root = image_folder("--calib-data", calib_data)
        base = root / "train" / "good" if (root / "train" / "good").is_dir() else root
        paths = find_images(base)
        bad = [p for p in paths if base.name.lower() in _TEST_PARTS or in_folder(p, base, _TEST_PARTS)]
        if bad:
            raise ValueError(f"--calib-data {root}: contains test/mask images (e.g. {bad[0]}); calibration uses "
                             "good training images only: point it at train/good")
        if not paths:
            raise ValueError(f"--calib-data {root}: no images found below it")
        paths = [p for p in paths if p.resolve() not in banned]
        if not paths:
            raise ValueError(f"--calib-data {root}: every image is also a gate image (--val-data or the checkpoint's "
                             "held-out split); calibrate on other images")
        chosen = _spread(paths, max_images)
        return _calib_set(chosen, img_size, resize, tiled, f"calib-data:{base}")
    ds = _recorded(recorded).dataset("train", img_size, resize)
    if ds is None:
        raise ValueError("--int8: the checkpoint records no training data that exists here (train.data); pass "
                         "--calib-data DIR with good training images")
    held = _recorded(recorded).held_out
    paths = [Path(p) for p in ds.paths if Path(p).name not in held and Path(p).resolve() not in banned]
    if not paths:
        raise ValueError(f"--int8: no training images left in {ds.root} after the held-out split; pass --calib-data")
    chosen = _spread(paths, max_images)
    return _calib_set(chosen, img_size, resize, tiled, f"train-split:{ds.root}")


def _labelled_split(root: Path, fmt: str, category: str | None, img_size: int, resize: str,
                    max_images: int, source: str | None = None, note: str = "",
                    tiled: TileLayout | None = None) -> ValSet:
    from stlm_train.data import build_dataset
    from stlm_train.data.io import resize_mask

    ds = build_dataset(str(root), fmt, category=category, split="test", img_size=None if tiled else img_size,
                       resize=resize)
    idx = list(range(len(ds)))
    if len(idx) > max_images:  # even spread keeps both classes of a sorted good/defect listing
        idx = sorted(set(np.linspace(0, len(idx) - 1, max_images).round().astype(int).tolist()))
    samples = [ds[i] for i in idx]
    images, layout = model_views([s.image for s in samples], img_size, resize, tiled)
    mask_list = None
    if not ds.has_pixel_labels:
        masks = None
    elif layout is None:
        masks = np.stack([s.mask for s in samples])
    else:  # the stitched maps' grid: each image's work shape
        mask_list = [resize_mask(s.mask, hw) for s, hw in zip(samples, layout.work_shapes)]
        masks = gate_maps(mask_list)
    pixel_note = "" if masks is not None else "no pixel labels: pixel AUROC not gated"
    return ValSet(images, np.array([s.label for s in samples], np.int64), masks,
                  source or f"val-data:{ds.name}:{root}", [s.path for s in samples],
                  "; ".join(n for n in (note, pixel_note) if n), layout, mask_list)


def gate_validation(val_data: str | os.PathLike | None, recorded: "TrainSplit | None", img_size: int,
                    resize: str, max_images: int = DEFAULT_VAL_IMAGES, tiled: TileLayout | None = None) -> ValSet | None:
    """The gate images of steps 1-4 of the module docstring; None when none of them exists."""
    from stlm_train.data.io import DataError

    split = _recorded(recorded)
    fmt = split.format
    if val_data is not None:
        root = image_folder("--val-data", val_data)
        errors = []
        for f in dict.fromkeys([fmt, "mvtec", "folder"]):
            try:
                return _labelled_split(root, f, None, img_size, resize, max_images, tiled=tiled)
            except DataError as e:
                errors.append(f"{f}: {e}")
        raise ValueError(f"--val-data {root}: not a labelled test folder ({errors[0]})")
    test = split.dataset("test", img_size, resize)
    if test is not None:
        return _labelled_split(Path(split.data), fmt, split.category, img_size, resize, max_images,
                               f"recorded-test-split:{test.name}:{split.data}",
                               "the test split of the data set recorded in the checkpoint", tiled)
    ds = split.dataset("train", img_size, resize)
    held = split.held_out
    if ds is not None and held:
        paths = [Path(p) for p in ds.paths if Path(p).name in held][:max_images]
        if paths:
            images, layout = load_views(paths, img_size, resize, tiled)
            return ValSet(images, np.zeros(len(paths), np.int64), None, f"held-out:{ds.root}", [str(p) for p in paths],
                          "held-out split (good images only): AUROC not gated, decisions/maps/ranks gated", layout)
    sample = sample_data_root()
    if sample is not None:
        return _labelled_split(sample, "mvtec", None, img_size, resize, max_images, f"sample:{sample}",
                               "the bundled sample's test split: not this model's data (pass --val-data DIR)", tiled)
    return None


def _split_off(calib: CalibSet) -> tuple[CalibSet, ValSet]:
    """Every other calibration image becomes a gate image (never both): the fallback of the last resort."""
    n = len(calib)
    if n < 2:
        raise ValueError(f"--val-data: needed here ({calib.source} has {n} image(s); none can be held out of "
                         "calibration for the gate, and the checkpoint records no test or held-out split)")
    judge, keep = list(range(1, n, 2)), list(range(0, n, 2))
    paths = calib.paths or []
    lay = calib.layout

    def rows(idx: list[int]) -> np.ndarray:
        return calib.images[lay.tile_index(idx) if lay is not None else idx]

    cal = CalibSet(rows(keep), calib.source, [paths[i] for i in keep] if paths else [],
                   lay.take(keep) if lay is not None else None)
    val = ValSet(rows(judge), None, None, f"held-out-of-calibration:{calib.source}",
                 [paths[i] for i in judge] if paths else [],
                 "every other calibration image, held out of calibration (unlabelled: AUROC not gated)",
                 lay.take(judge) if lay is not None else None)
    return cal, val


def gate_data(calib_data: str | os.PathLike | None, val_data: str | os.PathLike | None,
              recorded: "TrainSplit | None", img_size: int, resize: str, *, int8: bool, max_images: int = DEFAULT_VAL_IMAGES,
              parity_images: int = DEFAULT_CALIB_IMAGES,
              tiled: TileLayout | None = None) -> tuple[CalibSet | None, ValSet]:
    """(INT8 calibration images or None, gate images), disjoint; ValueError (one line naming the flag) if impossible."""
    val = gate_validation(val_data, recorded, img_size, resize, max_images, tiled)
    calib = None
    if int8:
        calib = int8_calibration(calib_data, recorded, img_size, resize, exclude=val.paths if val else (),
                                 tiled=tiled)
        if val is None:
            calib, val = _split_off(calib)
    elif val is None:  # float variants calibrate nothing: the parity images, unlabelled
        par = calibration_images(calib_data, img_size, parity_images, resize, tiled)
        val = ValSet(par.images, None, None, par.source, list(par.paths),
                     "the parity images (unlabelled: AUROC not gated; pass --val-data DIR)", par.layout)
    if calib is not None and val.paths:
        assert not _resolved(calib.paths) & _resolved(val.paths), "calibration and gate images overlap"
    return calib, val


def int8_validation(val_data: str | os.PathLike | None, recorded: "TrainSplit | None", img_size: int,
                    resize: str, calib: CalibSet | None = None, max_images: int = DEFAULT_VAL_IMAGES,
                    tiled: TileLayout | None = None) -> ValSet:
    """:func:`gate_validation`, never falling back to ``calib`` (kept for callers that pass it)."""
    val = gate_validation(val_data, recorded, img_size, resize, max_images, tiled)
    if val is None:
        raise ValueError("--val-data: needed here (no test or held-out split recorded in the checkpoint, no "
                         "bundled sample)")
    if calib is not None and calib.paths and val.paths and _resolved(calib.paths) & _resolved(val.paths):
        raise ValueError(f"--val-data: {val.source} shares images with the calibration set {calib.source}; "
                         "a gate never judges on the images it calibrated with")
    return val
