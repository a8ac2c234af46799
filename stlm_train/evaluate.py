"""Evaluation of a model on a data set's test split (``stlm-eval``; also run by ``stlm-train``).

For every map the model produces — the deployed map under ``fa`` (STLM's FA map, STFPM's one map)
and STLM's no-FA TLM map under ``tlm`` (null for STFPM) — it reports I-AUROC, P-AUROC, AUPRO@0.3,
P-AP and F1-max, plus FNR/FPR at the checkpoint's stored image threshold. Image scores are the
family's own (STLM: mean of the top-k pixels of the full-size map; STFPM: its maximum), as in the
official evaluations.

A tiled checkpoint (``preprocessing.work_size``) is evaluated as its engines run: each image resized to
its work shape, tiled, the tile maps blended and the score taken on the stitched map
(:func:`stlm_deploy.tiling.run_tiled`); pixel metrics are computed on the work-shape grid (masks resized
nearest to it; a test image whose work shape differs from the first image's is resampled to that one).
Untiled checkpoints are evaluated on the img_size grid, as before. ``grid="original"`` (``stlm-eval --grid
original``) computes every model's pixel metrics on the test images' own grid instead, with each map resized
bilinearly to the image as the runtimes return it: the grid on which untiled and tiled models compare.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .config import validate_img_size
from .metrics import compute_metrics
from stlm_deploy.preprocess import resize_image, resize_map, work_image
from stlm_deploy.tiling import run_tiled, topk_mean

from .modeling.predict import tile_runner, tiling_of
from .modeling.stfpm import STFPM
from .modeling.stlm import STLM, topk_score

METRIC_NAMES = ("i_auroc", "p_auroc", "aupro", "p_ap", "f1_max")
#: where pixel metrics are computed: the model's own map grid, or each test image's own size
EVAL_GRIDS = ("model", "original")
BUILTIN_DATA = ("builtin", "generated")


class Predictions(NamedTuple):
    """Model outputs over a data set, at the model's img_size (a tiled model: on its work-shape grid)."""

    fa_scores: np.ndarray  # (N,) float64
    tlm_scores: np.ndarray | None  # (N,) float64; None: the model has no TLM map (STFPM)
    fa_maps: np.ndarray  # (N, H, W) float32 (the deployed map)
    tlm_maps: np.ndarray | None  # (N, H, W) float32
    labels: np.ndarray  # (N,) int64
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}
    paths: list[str]


def _batches(dataset: Any, indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield [dataset[i] for i in indices[start:start + batch_size]]


@torch.no_grad()
def predict_dataset(model: STLM | STFPM, dataset: Any, batch_size: int = 8, indices: Sequence[int] | None = None,
                    device: str | torch.device | None = None, grid: str = "model") -> Predictions:
    """Run ``model`` (switched to eval) over ``dataset`` samples (image uint8 HxWx3 at img_size; tiled models and
    ``grid="original"``: at their own size, :func:`model_split`)."""
    if grid not in EVAL_GRIDS:
        raise ValueError(f"grid must be one of {', '.join(EVAL_GRIDS)}, got {grid!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if tiling_of(model) is not None or grid == "original":
        return _predict_per_image(model, dataset, batch_size, indices, grid)
    was_training = model.training
    model.eval()
    idx = list(range(len(dataset))) if indices is None else list(indices)
    fa_s, tlm_s, fa_m, tlm_m, labels, masks, paths = [], [], [], [], [], [], []
    try:
        for samples in _batches(dataset, idx, max(1, int(batch_size))):
            images = torch.from_numpy(np.stack([s.image for s in samples])).to(device)  # (B, H, W, 3) uint8
            out = model(model.normalize(images))
            fa_s.append(out.score.float().cpu().numpy())
            fa_m.append(out.anomaly_map.float().cpu().numpy())
            if out.tlm_map is not None:
                tlm_s.append(topk_score(out.tlm_map, model.cfg.top_k).float().cpu().numpy())
                tlm_m.append(out.tlm_map.float().cpu().numpy())
            labels += [int(s.label) for s in samples]
            masks += [np.asarray(s.mask, dtype=np.uint8) for s in samples]
            paths += [str(s.path) for s in samples]
    finally:
        model.train(was_training)
    if not idx:
        raise ValueError("predict_dataset: no samples")
    return Predictions(np.concatenate(fa_s).astype(np.float64),
                       np.concatenate(tlm_s).astype(np.float64) if tlm_s else None,
                       np.concatenate(fa_m), np.concatenate(tlm_m) if tlm_m else None,
                       np.asarray(labels, dtype=np.int64),
                       np.stack(masks), paths)


@torch.no_grad()
def _predict_per_image(model: STLM | STFPM, dataset: Any, batch_size: int, indices: Sequence[int] | None,
                       grid: str) -> Predictions:
    """:func:`predict_dataset` image by image (samples at their own size): a tiled model's tiles ``batch_size`` per
    forward pass, stitched; an untiled model on the image resized to img_size. Scores on the model's map (the
    stitched work map / the img_size map, as the engines), pixel metrics on ``grid`` (module docstring)."""
    from .data.io import resize_mask

    was_training = model.training
    model.eval()
    run = tile_runner(model)
    tiling, cfg = tiling_of(model), model.cfg
    idx = list(range(len(dataset))) if indices is None else list(indices)
    fa_s, tlm_s, fa_m, tlm_m, labels, masks, paths = [], [], [], [], [], [], []
    shape: tuple[int, int] | None = None
    try:
        for i in idx:
            s = dataset[i]
            if tiling is not None:
                res = run_tiled(work_image(s.image, tiling, cfg.resize), tiling, run, batch_size, cfg.top_k)
                maps, score = res.maps, float(res.score)
            else:
                out = run(resize_image(s.image, cfg.img_size, cfg.resize)[None])
                maps, score = {k: v[0] for k, v in out.items() if k != "score"}, float(out["score"][0])
            shape = shape or (tuple(s.image.shape[:2]) if grid == "original" else maps["anomaly_map"].shape)
            fa_s.append(score)
            fa_m.append(resize_map(maps["anomaly_map"], shape))
            if "tlm_map" in maps:
                tlm_s.append(float(topk_mean(maps["tlm_map"], cfg.top_k)))
                tlm_m.append(resize_map(maps["tlm_map"], shape))
            labels.append(int(s.label))
            masks.append(resize_mask(np.asarray(s.mask, dtype=np.uint8), shape))
            paths.append(str(s.path))
    finally:
        model.train(was_training)
    if not idx:
        raise ValueError("predict_dataset: no samples")
    return Predictions(np.asarray(fa_s, np.float64), np.asarray(tlm_s, np.float64) if tlm_s else None,
                       np.stack(fa_m), np.stack(tlm_m) if tlm_m else None, np.asarray(labels, dtype=np.int64),
                       np.stack(masks), paths)


def model_split(model: STLM | STFPM, root: str | os.PathLike, format: str, category: str | None, split: str,
                grid: str = "model") -> Any:
    """A data set split as ``model`` consumes it: resized to img_size, or, for a tiled model or the ``original``
    grid, at each image's own size (tiles are cut from its work image)."""
    from .data import build_dataset

    size = None if tiling_of(model) is not None or grid == "original" else model.cfg.img_size
    return build_dataset(root, format, category, split, size, model.cfg.resize)


def clean_json(v: Any) -> Any:
    """NaN/inf -> None so the JSON is strict; numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_json(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def metrics_from_predictions(pred: Predictions, thresholds: dict[str, Any] | None = None,
                             pixel_labels: bool = True) -> dict[str, Any]:
    """{"fa": {...}, "tlm": {...} or None} from predictions; FNR/FPR where a threshold for that map is known."""
    thresholds = thresholds or {}
    out: dict[str, Any] = {"tlm": None}
    for name, scores, maps, thr in (("fa", pred.fa_scores, pred.fa_maps, thresholds.get("image")),
                                    ("tlm", pred.tlm_scores, pred.tlm_maps, thresholds.get("tlm_image"))):
        if scores is None:
            continue
        out[name] = compute_metrics(scores, pred.labels, maps if pixel_labels else None,
                                    pred.masks if pixel_labels else None,
                                    image_threshold=float(thr) if thr is not None else None)
    return out


def evaluate_model(model: STLM | STFPM, dataset: Any, thresholds: dict[str, Any] | None = None, batch_size: int = 8,
                   device: str | torch.device | None = None, grid: str = "model") -> dict[str, Any]:
    """Predict the whole test split and compute every metric for the FA and TLM maps (pixel metrics on ``grid``)."""
    t0 = time.perf_counter()
    pred = predict_dataset(model, dataset, batch_size=batch_size, device=device, grid=grid)
    pixel_labels = bool(getattr(dataset, "has_pixel_labels", True))
    metrics = metrics_from_predictions(pred, thresholds, pixel_labels)
    n_bad = int(pred.labels.sum())
    result = {
        "data": getattr(dataset, "name", ""),
        "n_images": int(len(pred.labels)), "n_anomalous": n_bad, "n_good": int(len(pred.labels)) - n_bad,
        "img_size": int(model.cfg.img_size), "model_family": getattr(model.cfg, "family", "stlm"),
        **({"tiling": tiling_of(model).to_preprocessing()} if tiling_of(model) is not None else {}),
        **({"grid": grid, "eval_grid": list(pred.fa_maps.shape[1:])}
           if tiling_of(model) is not None or grid != "model" else {}),
        "pixel_metrics": pixel_labels,
        "fa": metrics["fa"], "tlm": metrics["tlm"],
        "thresholds": thresholds or None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return clean_json(result)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the FA and TLM metrics (values in %, '-' for undefined)."""
    cols = list(METRIC_NAMES) + ["fnr", "fpr"]
    head = {"i_auroc": "I-AUROC", "p_auroc": "P-AUROC", "aupro": "AUPRO@0.3", "p_ap": "P-AP", "f1_max": "F1-max",
            "fnr": "FNR@thr", "fpr": "FPR@thr"}
    rows = [["map"] + [head[c] for c in cols]]
    primary = "STFPM" if result.get("model_family") == "stfpm" else "FA"
    for name, label in (("fa", primary), ("tlm", "TLM")):
        if name == "tlm" and result.get("tlm") is None and "tlm" in result:
            continue  # the family has one map
        m = result.get(name) or {}
        rows.append([label] + ["-" if m.get(c) is None else f"{100 * m[c]:.2f}" for c in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    info = (f"{result.get('data', '')}: {result.get('n_images')} images "
            f"({result.get('n_anomalous')} anomalous) at {result.get('img_size')} px")
    if result.get("tiling"):
        t = result["tiling"]
        info += f" tiles (work size {t['work_size']}, overlap {t['tile_overlap']:g})"
    if result.get("eval_grid"):
        shape = "x".join(str(v) for v in result["eval_grid"])
        info += f"; pixel metrics on the {result.get('grid', 'model')} grid ({shape})"
    if not result.get("pixel_metrics", True):
        info += "; no pixel masks: pixel metrics skipped"
    return "\n".join([info, *lines])


def resolve_eval_data(data: str | os.PathLike, img_size: int, workdir: str | os.PathLike | None = None) -> Path:
    """``builtin``/``generated`` -> a freshly generated data set (deterministic); else the path itself."""
    if str(data).lower() in BUILTIN_DATA:
        from .data import make_generated_dataset

        where = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="stlm-builtin-"))
        return make_generated_dataset(where, size=img_size, seed=0)
    return Path(data)


def load_for_eval(ckpt: str | os.PathLike, img_size: int | None = None, device: str | torch.device = "cpu",
                  teacher: str | os.PathLike | None = None) -> tuple[STLM | STFPM, dict[str, Any] | None]:
    """A checkpoint -> (model in eval mode, stored thresholds or None), from one read of the file."""
    if img_size is not None:
        validate_img_size(img_size)
    record = read_checkpoint(ckpt)
    model = record.model(img_size, teacher).to(device)
    return model, (record.thresholds.to_dict() if record.thresholds is not None else None)


def evaluate_checkpoint(ckpt: str | os.PathLike, data: str | os.PathLike, format: str = "mvtec",
                        category: str | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                        img_size: int | None = None, json_path: str | os.PathLike | None = None,
                        teacher: str | os.PathLike | None = None, grid: str = "model") -> dict[str, Any]:
    """Library form of ``stlm-eval``: load, run the test split, optionally write JSON atomically."""
    if grid not in EVAL_GRIDS:
        raise ValueError(f"--grid: must be one of {', '.join(EVAL_GRIDS)}, got {grid!r}")
    model, thresholds = load_for_eval(ckpt, img_size, device, teacher)
    with tempfile.TemporaryDirectory(prefix="stlm-eval-") as tmp:
        root = resolve_eval_data(data, model.cfg.img_size, Path(tmp) / "data")
        fmt = "mvtec" if str(data).lower() in BUILTIN_DATA else format
        dataset = model_split(model, root, fmt, category, "test", grid)
        result = evaluate_model(model, dataset, thresholds, batch_size=batch_size, device=device, grid=grid)
    result = {"checkpoint": str(ckpt), "data_root": str(data), "format": fmt, "category": category, **result}
    if json_path is not None:
        from stlm_deploy.files import atomic_write_json

        atomic_write_json(json_path, result)
    return result


__all__ = ["Predictions", "predict_dataset", "model_split", "EVAL_GRIDS", "metrics_from_predictions", "evaluate_model", "evaluate_checkpoint",
           "format_table", "load_for_eval", "resolve_eval_data", "METRIC_NAMES"]
