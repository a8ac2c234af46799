"""Score many image files with one :class:`~stlm_deploy.detector.Detector`: what ``stlm-infer`` does.

Inputs are files, folders (searched recursively) and glob patterns. Images are read, scored and
written chunk by chunk (nothing but one chunk is held in memory), and each file fails on its own: an
unreadable or undecodable image, one above the pixel cap (refused from its header, before decoding),
out of memory, a non-finite backend output, any unexpected exception in prediction or an output that
cannot be written is recorded in ``BatchResult.failed`` with a one-line reason while the others go on.

Results stream: each image's row is appended to ``scores.csv`` and ``scores.jsonl`` and flushed as
soon as it is finished (a run killed after 10,000 images keeps those 10,000 rows); ``scores.json``
(everything + the backend) is written at the end. Overlays and maps go through a temp file and a rename:

    OUT/scores.csv    path,score,normalized_score,is_anomalous,backend,precision  (rows appended as they complete; rewritten per run)
    OUT/scores.jsonl  one JSON object per line: a result, or {"path", "error"} for a failure
    OUT/scores.json   results + failures + backend (at the end; strict JSON, never NaN)
    OUT/overlays/<key>.png  (overlays=True)           OUT/maps/<key>.npy + .png  (save_maps=True)

``<key>`` is the path relative to the folder given (without suffix), made unique, so ``a/good/0.png``
and ``b/good/0.png`` never overwrite each other.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from .errors import DeployError
from .files import atomic_write_bytes, atomic_write_text, is_image_file
from .images import DEFAULT_MAX_PIXELS, read_image_rgb

if TYPE_CHECKING:
    from .detector import Detector, Prediction

__all__ = ["BatchResult", "ResultStream", "collect_inputs", "read_image", "score_files", "write_scores",
           "strict_json"]

_GLOB_CHARS = set("*?[")
#: scores.csv columns: every row says what ran (backend and precision), not only the run's summary
CSV_HEADER = ["path", "score", "normalized_score", "is_anomalous", "backend", "precision"]


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


def read_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file as uint8 RGB with the one reader (:func:`stlm_deploy.images.read_image_rgb`:
    EXIF orientation applied, 16-bit scaled, grey replicated, alpha dropped), exactly as training read it;
    images above ``max_pixels`` are refused from their header."""
    return read_image_rgb(path, max_pixels=max_pixels)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/+-Infinity float replaced by None: what we write is always strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if text else type(e).__name__


class ResultStream:
    """Append-and-flush writer of ``scores.csv`` and ``scores.jsonl`` (one row per finished image).

    Opened per run (the files of an earlier run in ``out_dir`` are replaced, and its ``scores.json`` is
    removed so that a killed run never leaves an older summary next to its rows); every row is flushed
    to the OS as it is written, so killing the process loses at most the image in flight.
    """

    def __init__(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").unlink(missing_ok=True)
        # backslashreplace: a file name that is not valid UTF-8 (surrogate escapes) never stops the run
        self._csv_file: IO[str] = open(out / "scores.csv", "w", encoding="utf-8", errors="backslashreplace",
                                       newline="")
        self._jsonl: IO[str] = open(out / "scores.jsonl", "w", encoding="utf-8")
        self._csv = csv.writer(self._csv_file, lineterminator="\n")
        self._csv.writerow(CSV_HEADER)
        self._csv_file.flush()

    def result(self, row: dict[str, Any]) -> None:
        self._csv.writerow(_csv_row(row))
        self._csv_file.flush()
        self._line(row)

    def failure(self, row: dict[str, str]) -> None:
        self._line(row)

    def _line(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        for f in (self._csv_file, self._jsonl):
            f.close()

    def __enter__(self) -> "ResultStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        atomic_write_bytes(p, _npy_bytes(pred.anomaly_map), durable=False)  # per image: atomic, no fsync
        u8 = np.round(np.clip(pred.anomaly_map, 0.0, 1.0) * 255.0).astype(np.uint8)
        atomic_write_bytes(out / "maps" / f"{key}.png", _png_bytes(u8), durable=False)
        written["map"] = p.relative_to(out).as_posix()
    if overlays:
        ov = overlay(rgb, pred.anomaly_map, threshold=det.spec.thresholds.pixel)
        p = out / "overlays" / f"{key}.png"
        atomic_write_bytes(p, _png_bytes(cv2.cvtColor(ov, cv2.COLOR_RGB2BGR)), durable=False)
        written["overlay"] = p.relative_to(out).as_posix()
    return written


def _predict_isolated(det: Detector, images: list[np.ndarray]) -> list[Prediction | Exception]:
    """One call for the chunk; if it fails, image by image, so only the culprit is lost."""
    try:
        return list(det.predict(images, bgr=False))
    except Exception:  # noqa: BLE001 - any failure (MemoryError included) is retried per image
        out: list[Prediction | Exception] = []
        for im in images:
            try:
                out.append(det.predict(im, bgr=False))
            except Exception as e:  # noqa: BLE001 - one line in the report, the others go on
                out.append(e)
        return out


def _predict_failure(e: Exception) -> str:
    if isinstance(e, MemoryError):
        return "out of memory while scoring"
    if isinstance(e, DeployError):
        return _one_line(e)
    return f"unexpected {type(e).__name__} while scoring ({_one_line(e)})"


def _read_failure(path: Path, e: Exception) -> str:
    if isinstance(e, DeployError):
        return _one_line(e)
    if isinstance(e, MemoryError):
        return f"{path}: out of memory while decoding the image"
    return f"{path}: unexpected {type(e).__name__} while reading ({_one_line(e)})"


def score_files(det: Detector, files: Sequence[tuple[Path, str]], out_dir: str | Path, *, batch_size: int = 1,
                overlays: bool = True, save_maps: bool = False,
                report: Callable[[str], None] | None = None,
                progress: Callable[[int], None] | None = None,
                max_pixels: int | None | object = ..., stream: ResultStream | None = None) -> BatchResult:
    """Score ``files`` (from :func:`collect_inputs`) in chunks of ``batch_size``; write overlays/maps.

    ``report`` receives one line per failed file ("...; skipped"), ``progress`` the number of files
    just finished. Failures never stop the run; they are returned in ``BatchResult.failed``.
    ``max_pixels``: images above it are refused from their header (default: the detector's
    ``max_pixels``, 64 megapixels unless set; None/0 = no cap). Every finished row goes to ``stream``
    (default: a new :class:`ResultStream` on ``out_dir``, i.e. scores.csv + scores.jsonl) at once.
    """
    out = Path(out_dir)
    result = BatchResult()
    say = report or (lambda line: None)
    step = progress or (lambda n: None)
    cap = getattr(det, "max_pixels", DEFAULT_MAX_PIXELS) if max_pixels is ... else max_pixels
    own_stream = stream is None
    rows = ResultStream(out) if stream is None else stream

    def fail(path: Path, msg: str) -> None:
        say(f"{msg}; skipped")
        row = {"path": str(path), "error": msg}
        result.failed.append(row)
        rows.failure(row)

    def finish(path: Path, key: str, rgb: np.ndarray, pred: Prediction | Exception) -> None:
        if isinstance(pred, Exception):
            fail(path, f"{path}: {_predict_failure(pred)}")
            return
        try:
            written = _write_outputs(det, pred, rgb, key, out, overlays, save_maps)
        except (OSError, DeployError) as e:
            fail(path, f"{path}: cannot write outputs ({getattr(e, 'strerror', None) or _one_line(e)})")
            return
        except Exception as e:  # noqa: BLE001 - MemoryError included
            fail(path, f"{path}: cannot write outputs (unexpected {type(e).__name__}: {_one_line(e)})")
            return
        row = {"path": str(path), "score": pred.score, "normalized_score": pred.normalized_score,
               "is_anomalous": pred.is_anomalous, "backend": pred.backend, "precision": pred.precision, **written}
        result.results.append(row)
        rows.result(row)

    try:
        for start in range(0, len(files), max(1, int(batch_size))):
            loaded: list[tuple[Path, str, np.ndarray]] = []
            for path, key in files[start:start + batch_size]:
                try:
                    loaded.append((path, key, read_image(path, cap)))
                except Exception as e:  # noqa: BLE001 - one line per file, the others go on
                    fail(path, _read_failure(path, e))
                    step(1)
            if not loaded:
                continue
            preds = _predict_isolated(det, [im for _, _, im in loaded])
            for (path, key, rgb), pred in zip(loaded, preds):
                finish(path, key, rgb, pred)
                step(1)  # after the row is on disk
            del loaded, preds
    finally:
        if own_stream:
            rows.close()
    return result


def _fmt_bool(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


def _csv_row(r: dict[str, Any]) -> list[str]:
    """Every row says what ran (backend and precision), not only the run's summary."""
    norm = r.get("normalized_score")
    return [r["path"], f"{r['score']:.8g}", "" if norm is None else f"{norm:.8g}", _fmt_bool(r["is_anomalous"]),
            r.get("backend") or "", r.get("precision") or ""]


def write_scores(out_dir: str | Path, det: Detector, result: BatchResult, *, csv_file: bool = True) -> None:
    """``scores.json`` (results, failures, backend info; strict JSON) and, unless ``csv_file`` is False
    (:func:`score_files` already streamed it), ``scores.csv`` (:data:`CSV_HEADER`), atomically."""
    out = Path(out_dir)
    if csv_file:
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for r in result.results:
            writer.writerow(_csv_row(r))
        atomic_write_bytes(out / "scores.csv", rows.getvalue().encode("utf-8", "backslashreplace"))
    doc = strict_json({"engine": str(det.engine_dir), "backend": det.info(), "results": result.results,
                       "failed": result.failed})
    atomic_write_text(out / "scores.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
