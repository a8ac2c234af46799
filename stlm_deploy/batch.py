"""Score many image files with one :class:`~stlm_deploy.detector.Detector`: what ``stlm-infer`` does.

Inputs are files, folders (searched recursively) and glob patterns. Images are read, scored and
written chunk by chunk (nothing but one chunk is held in memory), and each file fails on its own: an
unreadable image, a prediction error or an output that cannot be written is recorded in
``BatchResult.failed`` with a one-line reason while the others go on. Every output is written through
a temp file and a rename:

    OUT/scores.csv   path,score,is_anomalous          OUT/scores.json   results + failures + backend
    OUT/overlays/<key>.png  (overlays=True)           OUT/maps/<key>.npy + .png  (save_maps=True)

``<key>`` is the path relative to the folder given (without suffix), made unique, so ``a/good/0.png``
and ``b/good/0.png`` never overwrite each other.
"""
from __future__ import annotations

import csv
import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from .errors import DeployError
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, is_image_file
from .images import read_image_rgb

if TYPE_CHECKING:
    from .detector import Detector, Prediction

__all__ = ["BatchResult", "collect_inputs", "read_image", "score_files", "write_scores"]

_GLOB_CHARS = set("*?[")


@dataclass
class BatchResult:
    """What :func:`score_files` did: one dict per scored file and one per failure (path, error)."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def collect_inputs(inputs: Iterable[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Expand files/folders/globs into (path, output key) pairs + one-line problems for missing inputs.

    Keys are relative paths without extension (folder inputs keep their inner structure) and are made
    unique, so outputs of ``a/good/0.png`` and ``b/good/0.png`` never overwrite each other.
    """
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    seen: set[Path] = set()
    keys: set[str] = set()

    def add(path: Path, key: str) -> None:
        real = path.resolve()
        if real in seen:
            return
        seen.add(real)
        base, i = key, 2
        while key in keys:
            key, i = f"{base}-{i}", i + 1
        keys.add(key)
        found.append((path, key))

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if is_image_file(q)):
                add(f, f.relative_to(p).with_suffix("").as_posix())
        elif p.is_file():
            add(p, p.stem)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for d in (Path(m) for m in matches if Path(m).is_dir()):
                files += sorted(q for q in d.rglob("*") if is_image_file(q))
            if not files:
                problems.append(f"{item}: pattern matches no files")
            for f in files:
                add(f, f.with_suffix("").name)
        else:
            problems.append(f"{item}: no such file or directory")
    return found, problems


def read_image(path: Path) -> np.ndarray:
    """Decode an image file as uint8 RGB with the one reader (:func:`stlm_deploy.images.read_image_rgb`:
    EXIF orientation applied, 16-bit scaled, grey replicated, alpha dropped), exactly as training read it."""
    return read_image_rgb(path)


def _png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DeployError("PNG encoding failed")
    return buf.tobytes()


def _npy_bytes(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, arr, allow_pickle=False)
    return bio.getvalue()


def _write_outputs(det: Detector, pred: Prediction, rgb: np.ndarray, key: str, out: Path, overlays: bool,
                   save_maps: bool) -> dict[str, str]:
    from .visualize import overlay

    written: dict[str, str] = {}
    if save_maps:
        p = out / "maps" / f"{key}.npy"
        atomic_write_bytes(p, _npy_bytes(pred.anomaly_map))
        u8 = np.round(np.clip(pred.anomaly_map, 0.0, 1.0) * 255.0).astype(np.uint8)
        atomic_write_bytes(out / "maps" / f"{key}.png", _png_bytes(u8))
        written["map"] = p.relative_to(out).as_posix()
    if overlays:
        ov = overlay(rgb, pred.anomaly_map, threshold=det.spec.thresholds.pixel)
        p = out / "overlays" / f"{key}.png"
        atomic_write_bytes(p, _png_bytes(cv2.cvtColor(ov, cv2.COLOR_RGB2BGR)))
        written["overlay"] = p.relative_to(out).as_posix()
    return written


def _predict_isolated(det: Detector, images: list[np.ndarray]) -> list[Prediction | DeployError]:
    """One call for the chunk; if it fails, image by image, so only the culprit is lost."""
    try:
        return list(det.predict(images, bgr=False))
    except DeployError:
        out: list[Prediction | DeployError] = []
        for im in images:
            try:
                out.append(det.predict(im, bgr=False))
            except DeployError as e:
                out.append(e)
        return out


def score_files(det: Detector, files: Sequence[tuple[Path, str]], out_dir: str | Path, *, batch_size: int = 1,
                overlays: bool = True, save_maps: bool = False,
                report: Callable[[str], None] | None = None,
                progress: Callable[[int], None] | None = None) -> BatchResult:
    """Score ``files`` (from :func:`collect_inputs`) in chunks of ``batch_size``; write overlays/maps.

    ``report`` receives one line per failed file ("...; skipped"), ``progress`` the number of files
    just finished. Failures never stop the run; they are returned in ``BatchResult.failed``.
    """
    out = Path(out_dir)
    result = BatchResult()
    say = report or (lambda line: None)
    step = progress or (lambda n: None)

    def fail(path: Path, msg: str) -> None:
        say(f"{msg}; skipped")
        result.failed.append({"path": str(path), "error": msg})

    for start in range(0, len(files), max(1, int(batch_size))):
        loaded: list[tuple[Path, str, np.ndarray]] = []
        for path, key in files[start:start + batch_size]:
            try:
                loaded.append((path, key, read_image(path)))
            except DeployError as e:
                fail(path, str(e))
                step(1)
        if not loaded:
            continue
        preds = _predict_isolated(det, [im for _, _, im in loaded])
        for (path, key, rgb), pred in zip(loaded, preds):
            step(1)
            if isinstance(pred, Exception):
                fail(path, f"{path}: {pred}")
                continue
            try:
                written = _write_outputs(det, pred, rgb, key, out, overlays,
                                         save_maps)
            except (OSError, DeployError) as e:
                fail(path, f"{path}: cannot write outputs ({getattr(e, 'strerror', None) or e})")
                continue
            result.results.append({"path": str(path), "score": pred.score, "is_anomalous": pred.is_anomalous,
                                   **written})
    return result


def _fmt_bool(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


def write_scores(out_dir: str | Path, det: Detector, result: BatchResult) -> None:
    """``scores.csv`` (path,score,is_anomalous) and ``scores.json`` (results, failures, backend info)."""
    out = Path(out_dir)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["path", "score", "is_anomalous"])
    for r in result.results:
        writer.writerow([r["path"], f"{r['score']:.8g}", _fmt_bool(r["is_anomalous"])])
    atomic_write_text(out / "scores.csv", rows.getvalue())
    atomic_write_json(out / "scores.json", {"engine": str(det.engine_dir), "backend": det.info(),
                                            "results": result.results, "failed": result.failed})
