"""``stlm-threshold``: set the decision threshold of a checkpoint and/or an engine from validation images.

The stored threshold is a trade-off chosen at training time on held-out good images; a line that
collects labelled parts can move it deliberately (:mod:`stlm_deploy.thresholds`: ``f1``, ``fpr<=A``,
``fnr<=B``). Scores come from the checkpoint (PyTorch, when ``--ckpt`` is given) or else from the
engine itself (the torch-free runtime, so a deployed station needs no training install).

What is rewritten, each atomically (temp file + rename), after everything was computed:

- the checkpoint's ``thresholds`` (``image``, ``method`` saying target and data, the rates reached,
  the score span widened to contain the new threshold); the weights are untouched;
- the engine's ``stlm.json``: the same thresholds and ``source.sha256`` = the rewritten checkpoint's,
  so provenance still holds. Model files are not touched, so their checksums, TensorRT plans built
  from them and ``timings.json`` stay valid; ``stlm-infer``, the C++ runtime and ``stlm-serve`` read
  the threshold from ``stlm.json`` when they load the engine. The ONNX ``metadata_props`` keep the
  export-time copy (a file cannot be rewritten without changing the checksums the plans were built
  from); ``stlm.json`` is authoritative.

The pixel threshold draws the defect region; it is kept, except that it never stays above the new
image threshold: the image score is a mean of the top map pixels, so every flagged image then shows
where it is flagged.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from stlm_deploy.thresholds import ThresholdChoice, ThresholdError, choose_threshold, parse_target

Log = Callable[[str], None]

__all__ = ["rethreshold", "ThresholdError"]


def _labels(data: str | os.PathLike, format: str, category: str | None, split: str) -> Any:
    from .data import build_dataset

    ds = build_dataset(data, format, category, split, img_size=None)
    if len(ds) == 0:
        raise ThresholdError(f"--data {data}: no images in the '{split}' split")
    return ds


def _check_counts(ds: Any, target: Any, where: str) -> tuple[int, int]:
    labels = np.asarray([r.label for r in ds.records], dtype=np.int64)
    n_bad, n_good = int(labels.sum()), int((labels == 0).sum())
    if target.needs_good and not n_good:
        raise ThresholdError(f"{where}: no good images, and target {target} needs them")
    if target.needs_defective and not n_bad:
        raise ThresholdError(f"{where}: no defective images, and target {target} needs them "
                             "(with good images only, use --target 'fpr<=A')")
    return n_good, n_bad


def _scores_from_checkpoint(record: Any, data: Any, format: str, category: str | None, split: str,
                            batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from .evaluate import model_split, predict_dataset

    model = record.model()
    ds = model_split(model, data, format, category, split)  # a tiled checkpoint: scored on stitched maps
    pred = predict_dataset(model, ds, batch_size=batch_size)
    return pred.fa_scores, pred.labels


def _scores_from_engine(engine: str | os.PathLike, ds: Any, backend: str, batch_size: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    from stlm_deploy import Detector
    from stlm_deploy.images import read_image_rgb

    det = Detector.load(engine, backend=backend)
    scores, labels = [], []
    for s in range(0, len(ds.records), batch_size):
        recs = ds.records[s:s + batch_size]
        preds = det.predict([read_image_rgb(r.image_path) for r in recs])
        scores += [float(p.score) for p in preds]
        labels += [int(r.label) for r in recs]
    return np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def new_thresholds(old: dict[str, Any] | None, choice: ThresholdChoice, scores: np.ndarray,
                   described: str) -> dict[str, Any]:
    """The stored thresholds with the new image threshold (score span widened to contain it and the
    validation scores; pixel threshold capped at it) and a record of how it was chosen."""
    old = dict(old or {})
    t = float(choice.threshold)
    lo = min([v for v in (old.get("score_min"), float(scores.min()), t) if v is not None])
    hi = max([v for v in (old.get("score_max"), float(scores.max()), t) if v is not None])
    if not hi > lo:
        hi = lo + 1e-6
    pixel = old.get("pixel")
    out = {**old, "image": t, "pixel": t if pixel is None else min(float(pixel), t), "score_min": lo,
           "score_max": hi, "method": f"stlm-threshold: target {choice.target} on {described}",
           "target": choice.target, "validation": choice.to_dict()}
    out["previous"] = {k: old.get(k) for k in ("image", "pixel", "method") if k in old}
    return out


def rethreshold(target: str, data: str | os.PathLike, *, ckpt: str | os.PathLike | None = None,
                engine: str | os.PathLike | None = None, format: str = "mvtec", category: str | None = None,
                split: str = "test", backend: str = "auto", batch_size: int = 8, dry_run: bool = False,
                log: Log = print) -> dict[str, Any]:
    """Choose the image threshold for ``target`` on ``data`` and write it into ``ckpt`` and/or ``engine``.

    Returns ``{"choice", "thresholds", "written"}``. Nothing is written when ``dry_run`` or when any
    step fails (the checkpoint and the engine are checked to belong together first).
    """
    if ckpt is None and engine is None:
        raise ThresholdError("give --ckpt, --engine or both (what to re-threshold)")
    tgt = parse_target(target)
    if not Path(data).is_dir():
        raise ThresholdError(f"--data: '{data}' does not exist or is not a folder")
    ds = _labels(data, format, category, split)
    where = f"--data {data} ({format}{', ' + category if category else ''}, split {split})"
    n_good, n_bad = _check_counts(ds, tgt, where)

    record, sha = None, None
    if ckpt is not None:
        from .checkpoint import CheckpointError, read_checkpoint

        record = read_checkpoint(ckpt)
        sha = record.sha256
        if record.official:
            raise CheckpointError(f"{ckpt}: not a project checkpoint (an official state dict has no thresholds "
                                  "to set: stlm-export it, then re-threshold the engine)")
    spec = None
    if engine is not None:
        from stlm_deploy.spec import load_spec

        spec = load_spec(engine)
        if sha is not None and spec.source.sha256 and spec.source.sha256 != sha:
            raise ThresholdError(f"--engine {engine} was exported from another checkpoint (sha256 "
                                 f"{spec.source.sha256[:12]}..., --ckpt {ckpt} is {sha[:12]}...)")
    if record is not None:
        scores, labels = _scores_from_checkpoint(record, data, format, category, split, batch_size)
        scored_by = f"checkpoint {Path(ckpt).name}"
    else:
        scores, labels = _scores_from_engine(engine, ds, backend, batch_size)
        scored_by = f"engine {Path(engine).name}"
    choice = choose_threshold(scores[labels == 0], scores[labels == 1], tgt)
    described = f"{n_good} good + {n_bad} defective images of {Path(data).name}/{category or ''} {split} " \
                f"(scored by {scored_by})".replace("/ ", " ")
    old = (record.thresholds.to_dict() if record.thresholds is not None else None) if record is not None else \
        (spec.thresholds.to_dict() if spec is not None else None)
    thresholds = new_thresholds(old, choice, scores, described)
    rates = ", ".join(f"{k.upper()} {100 * v:.1f} %" for k, v in (("fpr", choice.fpr), ("fnr", choice.fnr),
                                                                  ("f1", choice.f1)) if v is not None)
    log(f"threshold {choice.target}: image {choice.threshold:.6f} (was {(old or {}).get('image')}) on {described}: "
        f"{rates}")
    written: list[str] = []
    if dry_run:
        log("dry run: nothing written")
        return {"choice": choice.to_dict(), "thresholds": thresholds, "written": written}
    new_sha = None
    if record is not None:
        new_sha = record.with_thresholds(thresholds)
        written.append(str(ckpt))
    if spec is not None:
        from stlm_deploy.spec import Thresholds, resolve_engine, write_spec

        engine_dir, _ = resolve_engine(engine)
        t = Thresholds(image=thresholds["image"], pixel=thresholds["pixel"], method=thresholds["method"],
                       score_min=thresholds["score_min"], score_max=thresholds["score_max"],
                       extra={k: thresholds[k] for k in ("target", "validation", "previous")})
        spec.thresholds = t
        if new_sha is not None:
            spec.source = replace(spec.source, sha256=new_sha)
        written.append(str(write_spec(engine_dir, spec)))
    for w in written:
        log(f"wrote {w}")
    return {"choice": choice.to_dict(), "thresholds": thresholds, "written": written}
