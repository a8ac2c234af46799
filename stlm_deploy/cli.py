"""``stlm-infer``: score images with an exported engine (a thin click layer over :mod:`stlm_deploy.batch`).

    stlm-infer --engine engines/bottle [--backend auto|ort|openvino|tensorrt] [--precision P]
               [--threads N] [--batch-size N] [--max-pixels N] [--no-overlays] [--save-maps] INPUT... --out DIR
    stlm-infer --url http://HOST:PORT [--model NAME] [--engine ENGINE_DIR] ... INPUT... --out DIR

With ``--url`` the images are scored by a running stlm-serve / Triton (:mod:`stlm_deploy.serving.client`, HTTP
or gRPC) and the same files are written; ``--engine`` then only supplies the pixel threshold that
outlines defects in overlays and maps (optional).

INPUT: image files, folders (searched recursively for images) and glob patterns. Streams
DIR/scores.csv (path,score,normalized_score,is_anomalous,backend,precision) and DIR/scores.jsonl (one line per result or
failure, naming the backend and precision that ran), each row appended and flushed as its image
completes; DIR/scores.json (results + failures + backend info) at the end; DIR/overlays/<name>.png
unless --no-overlays, DIR/maps/<name>.npy + 8-bit .png with --save-maps (each written atomically).
Any per-image failure (unreadable, undecodable, above --max-pixels, out of memory, a non-finite
output, an unexpected exception) is one line on stderr and the others go on; the exit code is then 1.
No inputs at all: exit 2. Engine/argument errors: one line, exit 1.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from .batch import ResultStream, collect_inputs, read_image, score_files, write_scores
from .console import CommandError, OneLineCommand, missing_modules, require_extra, runtime_options
from .files import IMAGE_EXTENSIONS
from .images import DEFAULT_MAX_PIXELS
from .spec import display_path

__all__ = ["main", "collect_inputs", "read_image", "IMAGE_EXTENSIONS"]


class _Progress:
    """tqdm on stderr when it is installed (it is not a runtime dependency), else silent."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        if not missing_modules(["tqdm"]):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="img", desc="stlm-infer", disable=None)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _local(engine: str | None, backend: str, precision: str | None, threads: int | None, no_verify: bool,
           max_pixels: int) -> Any:
    if engine is None:
        raise CommandError("--engine ENGINE (or --url URL of a server) is required", 2)
    from .detector import Detector

    try:
        return Detector.load(engine, backend=backend, precision=precision, threads=threads, verify=not no_verify,
                             max_pixels=max_pixels)
    except OSError as e:
        raise CommandError(f"{engine}: {e.strerror or e}") from None


def _remote(url: str, model: str | None, engine: str | None, max_pixels: int) -> Any:
    require_extra("stlm-infer --url", "client")
    from .serving.client import RemoteDetector
    from .spec import load_spec

    thresholds = load_spec(engine).thresholds if engine else None
    return RemoteDetector(url, model, thresholds=thresholds, max_pixels=max_pixels or None)


@click.command(name="stlm-infer", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", default=None, metavar="ENGINE",
              help="Engine directory (engines/<name>) or an artifact file inside it.")
@click.option("--url", default=None, metavar="URL",
              help="Score on a server instead: http://HOST:PORT or grpc://HOST:PORT (stlm-serve / Triton).")
@click.option("--model", default=None, help="With --url: the model name (the name stlm-serve printed; needed unless the server lists its models).")
@runtime_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images sent to the engine per call.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (width x height, read from the file header before "
                   "decoding); 0 = no cap.")
@click.option("--no-overlays", is_flag=True, help="Do not write heat-map overlays.")
@click.option("--save-maps", is_flag=True, help="Also write the anomaly maps (.npy float32 + 8-bit .png).")
@click.option("--no-verify", is_flag=True, help="Skip the artifact checksum verification.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory.")
@click.option("-v", "--verbose", is_flag=True, help="Log backend selection details.")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
def main(engine: str | None, url: str | None, model: str | None, backend: str, precision: str | None,
         threads: int | None, batch_size: int, max_pixels: int, no_overlays: bool, save_maps: bool, no_verify: bool,
         out_dir: Path, verbose: bool, inputs: tuple[str, ...]) -> None:
    """Score images with an exported STLM engine; write scores, overlays and maps to --out."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    from .images import OPENCV_SILENT, opencv_log_level

    opencv_log_level(OPENCV_SILENT)  # our one line per failed image says it all
    if not inputs:
        raise CommandError("no INPUT given: pass image files, folders or glob patterns", 2)
    files, problems = collect_inputs(inputs)
    if not files:
        raise CommandError("no input images found in " + ", ".join(inputs) +
                           (" (" + "; ".join(problems) + ")" if problems else ""), 2)
    det = _remote(url, model, engine, max_pixels) if url else _local(engine, backend, precision, threads,
                                                                      no_verify, max_pixels)
    try:
        info = det.info()
        if url:
            click.echo(f"stlm-infer: model '{info['model']}' on {info['url']}", err=True)
        else:
            click.echo(f"stlm-infer: {det.spec.name} on {info['backend']} ({info['precision'] or 'default'}, "
                       f"{info['device']}), chosen by {info['selected_by']}; artifact {display_path(det.artifact)}",
                       err=True)
        try:
            stream = ResultStream(out_dir)
        except OSError as e:
            raise CommandError(f"{out_dir}: cannot write results ({e.strerror or e})") from None
        with stream:
            missing = [{"path": p.split(": ", 1)[0], "error": p} for p in problems]
            for row in missing:
                click.echo(row["error"] + "; skipped", err=True)
                stream.failure(row)
            with _Progress(len(files)) as bar:
                result = score_files(det, files, out_dir, batch_size=batch_size, overlays=not no_overlays,
                                     save_maps=save_maps, report=bar.write, progress=bar.update,
                                     max_pixels=max_pixels, stream=stream)
        result.failed[:0] = missing
        try:
            write_scores(out_dir, det, result, csv_file=False)
        except OSError as e:
            raise CommandError(f"{out_dir}: cannot write results ({e.strerror or e})") from None
    finally:
        det.close()
    click.echo(f"stlm-infer: {len(result.results)} image(s) scored, {len(result.failed)} failed -> "
               f"{display_path(out_dir)}", err=True)
    if result.failed:
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    main(prog_name="stlm-infer")
