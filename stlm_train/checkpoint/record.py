"""The checkpoint record: what every reader downstream of training needs, read once into one typed object.

``stlm-train`` writes a project checkpoint with :func:`save_checkpoint`; export, evaluation, the benchmarks
and ``stlm-threshold`` call :func:`read_checkpoint` and use only the :class:`Checkpoint` it returns: the
sha256 of the bytes loaded, the kind (told in one place, :func:`.files.detect_kind`), the family and
config, the size it was trained at, its thresholds as ``stlm_deploy.spec.Thresholds`` (the form they keep
all the way to the runtime's decision), the training data it records and the good images held out of it.
On disk the format is unchanged: ``{"format": "stlm-checkpoint", "format_version": 1, "config",
"preprocessing", "state_dict", "thresholds", "train"}`` (docs/DESIGN.md, "Checkpoint").
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stlm_deploy.files import atomic_output, sha256_file
from stlm_deploy.spec import Thresholds

from ..config import ModelConfig
from ..modeling import tiling_of
from ..modeling.stfpm import STFPM
from ..modeling.stlm import STLM
from .files import FORMAT, FORMAT_VERSION, detect_kind, read_file_and_sha256
from .load import model_from_checkpoint, project_config

__all__ = ["Checkpoint", "TrainSplit", "read_checkpoint", "save_checkpoint", "finite_or_none"]

_THRESHOLD_FIELDS = ("image", "pixel", "method", "score_min", "score_max")


def finite_or_none(v: Any) -> float | None:
    """A stored threshold value as a float, or None when it is missing, not a number or not finite."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass(frozen=True)
class TrainSplit:
    """The data set a checkpoint was trained on (its ``train`` section) and the good images held out of
    training, on which its thresholds were chosen (file names)."""

    data: str | None = None
    format: str = "mvtec"
    category: str | None = None
    held_out: frozenset[str] = frozenset()

    def dataset(self, split: str, img_size: int | None, resize: str) -> Any | None:
        """That split (an AnomalyDataset; ``img_size`` None: images at their own size) when the recorded folder
        still exists and the split holds images, else None."""
        from ..data import build_dataset
        from ..data.io import DataError

        if not self.data or not Path(self.data).is_dir():
            return None
        try:
            ds = build_dataset(self.data, self.format, category=self.category, split=split, img_size=img_size,
                               resize=resize)
        except DataError:
            return None
        return ds if len(ds) else None


@dataclass(frozen=True)
class Checkpoint:
    """One model file, read once. ``kind``: "stlm" / "stfpm" (project checkpoints) or "official_stlm" /
    "official_stfpm"; ``config``/``trained_size``/``thresholds`` are None where the file holds none (official
    files); ``provenance`` is the ``train`` section as saved (steps, options, selection...)."""

    path: Path
    sha256: str
    kind: str
    family: str
    config: ModelConfig | None
    trained_size: int | None
    thresholds: Thresholds | None
    train_split: TrainSplit
    provenance: Mapping[str, Any]
    payload: Any = field(repr=False)

    @property
    def official(self) -> bool:
        return self.kind.startswith("official_")

    @property
    def source_kind(self) -> str:
        """stlm.json ``source.kind``: "project" or "official"."""
        return "official" if self.official else "project"

    def model(self, img_size: int | None = None, teacher: str | os.PathLike | None = None) -> STLM | STFPM:
        """The model in eval mode on the CPU (``img_size``: run the weights at another size; ``teacher``: the
        ImageNet ResNet-18 file an official STFPM snapshot needs)."""
        return model_from_checkpoint(self.payload, self.path, img_size, teacher)

    def with_thresholds(self, thresholds: Mapping[str, Any]) -> str:
        """Rewrite the file with new ``thresholds`` (everything else as it was), atomically; -> its new sha256."""
        with atomic_output(self.path, clean_stale=True) as tmp:
            torch.save({**self.payload, "thresholds": dict(thresholds)}, tmp)
        return sha256_file(self.path)


def _thresholds(stored: Any) -> Thresholds | None:
    if not isinstance(stored, Mapping):
        return None
    return Thresholds(image=finite_or_none(stored.get("image")), pixel=finite_or_none(stored.get("pixel")),
                      method=str(stored.get("method") or ""), score_min=finite_or_none(stored.get("score_min")),
                      score_max=finite_or_none(stored.get("score_max")),
                      extra={k: v for k, v in stored.items() if k not in _THRESHOLD_FIELDS})


def _train_split(train: Mapping[str, Any], thresholds: Thresholds | None) -> TrainSplit:
    names = thresholds.extra.get("held_out") if thresholds is not None else None
    data = train.get("data")
    return TrainSplit(data=str(data) if data else None, format=str(train.get("format") or "mvtec"),
                      category=train.get("category"),
                      held_out=frozenset(str(n) for n in names) if isinstance(names, list) else frozenset())


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a model file once (sha256 of the bytes loaded) into a :class:`Checkpoint`; one-line CheckpointError."""
    p = Path(path)
    obj, sha = read_file_and_sha256(p)
    kind = detect_kind(obj, p)
    if kind in ("official_stlm", "official_stfpm"):
        return Checkpoint(p, sha, kind, kind.removeprefix("official_"), None, None, None, TrainSplit(), {}, obj)
    cfg = project_config(obj, p)
    thresholds = _thresholds(obj.get("thresholds"))
    train = obj.get("train") if isinstance(obj.get("train"), Mapping) else {}
    return Checkpoint(p, sha, kind, cfg.family, cfg, cfg.img_size, thresholds, _train_split(train, thresholds),
                      train, obj)


def save_checkpoint(path: str | os.PathLike, model: STLM | STFPM, **extra: Any) -> Path:
    """Project checkpoint: weights + config + preprocessing + whatever the trainer adds (thresholds, train).

    An STFPM checkpoint holds the teacher's weights too (both networks run at inference). A tiled model
    (``model.tiling``) adds ``work_size``, ``tile_overlap`` and ``tile_blend`` to ``preprocessing``.
    """
    cfg = model.cfg
    tiling = tiling_of(model)  # a tiled model records its work size and overlap (untiled: no such keys)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "preprocessing": {"resize": cfg.resize, "mean": list(cfg.pixel_mean), "std": list(cfg.pixel_std),
                          "channel_order": "RGB", "img_size": cfg.img_size,
                          **(tiling.to_preprocessing() if tiling is not None else {})},
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_output(path, clean_stale=True) as tmp:  # removes temps of killed saves
        torch.save(payload, tmp)
    return Path(path)
