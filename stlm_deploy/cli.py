"""``stlm-infer``: score images with an exported engine (a thin click layer over :class:`Detector`).

    stlm-infer --engine engines/bottle [--backend auto|ort|openvino|tensorrt] [--precision P]
               [--threads N] [--batch-size N] [--no-overlays] [--save-maps] INPUT... --out DIR

INPUT: image files, folders (searched recursively for images) and glob patterns. Writes
DIR/scores.csv (path,score,is_anomalous), DIR/scores.json (results + backend info),
DIR/overlays/<name>.png unless --no-overlays, DIR/maps/<name>.npy + 8-bit .png with --save-maps;
every file is written atomically. An unreadable input is reported on stderr (one line) and
skipped; the exit code is then 1. No inputs at all: exit 2. Engine/argument errors: one line, exit 1.
"""
from __future__ import annotations

import csv
import glob
import io
import logging
import sys
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np

from .errors import DeployError, InputError
from .fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from .spec import display_path

__all__ = ["main", "collect_inputs", "read_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".jp2")
_GLOB_CHARS = set("*?[")


class NoInputs(click.ClickException):
    """Nothing to do is a usage problem: exit code 2, like click's own usage errors."""

    exit_code = 2


def collect_inputs(inputs: tuple[str, ...] | list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
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

    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if is_image(q)):
                add(f, f.relative_to(p).with_suffix("").as_posix())
        elif p.is_file():
            add(p, p.stem)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for d in (Path(m) for m in matches if Path(m).is_dir()):
                files += sorted(q for q in d.rglob("*") if is_image(q))
            if not files:
                problems.append(f"{item}: pattern matches no files")
            for f in files:
                add(f, f.with_suffix("").name)
        else:
            problems.append(f"{item}: no such file or directory")
    return found, problems


def read_image(path: Path) -> np.ndarray:
    """Decode an image file as 8-bit BGR (OpenCV); InputError (one line) if it cannot be read."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # fromfile+imdecode: non-ASCII paths work everywhere
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise InputError(f"{path}: cannot decode as an image (unsupported format, empty or corrupt file)")
    return img


def _png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DeployError("PNG encoding failed")
    return buf.tobytes()


def _npy_bytes(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, arr, allow_pickle=False)
    return bio.getvalue()


def _write_outputs(det: Any, pred: Any, rgb: np.ndarray, key: str, out: Path, overlays: bool,
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


def _fmt_bool(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


@click.command(name="stlm-infer", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine directory (engines/<name>) or an artifact file inside it.")
@click.option("--backend", type=click.Choice(["auto", "ort", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="Runtime; auto = tensorrt > ort-cuda > openvino > ort-cpu.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "f32", "f16"]), default=None,
              help="Precision to run at (default: the backend's default for this engine).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (ort/openvino).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images sent to the engine per call.")
@click.option("--no-overlays", is_flag=True, help="Do not write heat-map overlays.")
@click.option("--save-maps", is_flag=True, help="Also write the anomaly maps (.npy float32 + 8-bit .png).")
@click.option("--no-verify", is_flag=True, help="Skip the artifact checksum verification.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory.")
@click.option("-v", "--verbose", is_flag=True, help="Log backend selection details.")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
def main(engine: str, backend: str, precision: str | None, threads: int | None, batch_size: int,
         no_overlays: bool, save_maps: bool, no_verify: bool, out_dir: Path, verbose: bool,
         inputs: tuple[str, ...]) -> None:
    """Score images with an exported STLM engine; write scores, overlays and maps to --out."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    if not inputs:
        raise NoInputs("no INPUT given: pass image files, folders or glob patterns")
    files, problems = collect_inputs(inputs)
    if not files:
        raise NoInputs("no input images found in " + ", ".join(inputs) +
                       (" (" + "; ".join(problems) + ")" if problems else ""))
    from .detector import Detector

    try:
        det = Detector.load(engine, backend=backend, precision=precision, threads=threads, verify=not no_verify)
    except DeployError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{engine}: {e.strerror or e}") from None
    info = det.info()
    click.echo(f"stlm-infer: {det.spec.name} on {info['backend']} ({info['precision'] or 'default'}, "
               f"{info['device']}), chosen by {info['selected_by']}; artifact {display_path(det.artifact)}", err=True)
    for p in problems:
        click.echo(p + "; skipped", err=True)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = [{"path": p.split(": ", 1)[0], "error": p} for p in problems]
    overlays = not no_overlays
    from tqdm import tqdm

    with tqdm(total=len(files), file=sys.stderr, unit="img", desc="stlm-infer", disable=None) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            loaded: list[tuple[Path, str, np.ndarray]] = []
            for path, key in chunk:
                try:
                    loaded.append((path, key, read_image(path)))
                except DeployError as e:
                    bar.write(f"{e}; skipped", file=sys.stderr)
                    failed.append({"path": str(path), "error": str(e)})
                    bar.update(1)
            if not loaded:
                continue
            try:
                preds = det.predict([im for _, _, im in loaded], bgr=True)
            except DeployError:  # isolate the culprit instead of losing the whole chunk
                preds = []
                for path, _, im in loaded:
                    try:
                        preds.append(det.predict(im, bgr=True))
                    except DeployError as e:
                        preds.append(e)
            for (path, key, bgr), pred in zip(loaded, preds):
                bar.update(1)
                if isinstance(pred, Exception):
                    bar.write(f"{path}: {pred}; skipped", file=sys.stderr)
                    failed.append({"path": str(path), "error": str(pred)})
                    continue
                try:
                    written = _write_outputs(det, pred, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), key, out_dir,
                                             overlays, save_maps)
                except (OSError, DeployError) as e:
                    msg = f"{path}: cannot write outputs ({getattr(e, 'strerror', None) or e})"
                    bar.write(msg, file=sys.stderr)
                    failed.append({"path": str(path), "error": msg})
                    continue
                results.append({"path": str(path), "score": pred.score, "is_anomalous": pred.is_anomalous,
                                **written})
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["path", "score", "is_anomalous"])
    for r in results:
        writer.writerow([r["path"], f"{r['score']:.8g}", _fmt_bool(r["is_anomalous"])])
    try:
        atomic_write_text(out_dir / "scores.csv", rows.getvalue())
        atomic_write_json(out_dir / "scores.json", {"engine": str(det.engine_dir), "backend": info,
                                                    "results": results, "failed": failed})
    except OSError as e:
        raise click.ClickException(f"{out_dir}: cannot write results ({e.strerror or e})") from None
    finally:
        det.close()
    click.echo(f"stlm-infer: {len(results)} image(s) scored, {len(failed)} failed -> {display_path(out_dir)}",
               err=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main(prog_name="stlm-infer")
