"""stlm-bench: thin click layer over ``stlm_bench.bench``.

Errors are one line (:func:`stlm_deploy.console.run_command`). Where torch is not installed (a
runtime-only install plus the ``bench`` extra) the engines are still benchmarked and the output says
that the PyTorch eager reference was skipped.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from stlm_deploy.console import CommandError, OneLineCommand, missing_modules, require_extra


def _batches(ctx: click.Context | None, param: click.Parameter | None, text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of positive integers, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise click.BadParameter(f"expected a comma list of positive integers, got {text!r}")
    return out


@click.command(name="stlm-bench", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", required=True, help="Engine directory (or a file inside it).")
@click.option("--reference", "reference", default=None,
              help="Checkpoint for the PyTorch eager reference (default: the source recorded in stlm.json, if present).")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch reference (no parity, no speed-up).")
@click.option("--allow-other-reference", is_flag=True,
              help="Accept a --reference whose sha256 differs from the engine's source checkpoint (stlm.json "
              "source.sha256); the report marks it.")
@click.option("--backend", "backends", default="all", show_default=True,
              help="'all' or a comma list of backend[/precision]: ort/fp32, ort/fp16, openvino/bf16, tensorrt ...")
@click.option("--batch", "batches", default="1", show_default=True, callback=_batches, help="Batch sweep, e.g. 1,4.")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1), help="Timed runs per setting.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all).")
@click.option("--data", default=None, help="Labelled test data for accuracy metrics per backend.")
@click.option("--format", "fmt", default="mvtec", show_default=True,
              type=click.Choice(["mvtec", "visa", "dagm", "folder"]))
@click.option("--category", default=None)
@click.option("--calib-data", default=None, help="Images for parity (default: bundled sample, else generated).")
@click.option("--json", "json_path", default=None, help="Write the full report as JSON.")
@click.option("--markdown", "md_path", default=None, help="Write the tables as Markdown.")
@click.option("--plot", "plot_path", default=None, help="Write a latency/throughput PNG.")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Record the batch-1 p50 of each variant in ENGINE/timings.json, where backend 'auto' reads it "
              "to run the fastest gated variant on this machine.")
def main(engine: str, reference: str | None, no_reference: bool, allow_other_reference: bool, backends: str,
         batches: tuple[int, ...], runs: int, warmup: int,
         threads: int | None, data: str | None, fmt: str, category: str | None, calib_data: str | None,
         json_path: str | None, md_path: str | None, plot_path: str | None, record: bool) -> None:
    """Latency, throughput, memory, parity and accuracy of an engine next to PyTorch eager fp32.

    Records the batch-1 p50 of each variant in ENGINE/timings.json (what backend 'auto' then runs on this
    machine) unless --no-record is given.
    """
    if plot_path:
        require_extra("stlm-bench --plot", "bench", ["matplotlib"])
    if data:
        require_extra("stlm-bench --data", "bench", ["scipy"])  # the accuracy metrics
    import logging

    from stlm_deploy.errors import DeployError
    from stlm_deploy.spec import load_spec, resolve_engine

    from . import bench
    from .output import emit

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        engine_dir, _ = resolve_engine(engine)
        spec = load_spec(engine_dir)
        variants = bench.parse_variants(backends, engine_dir)
        ref = None if no_reference else (reference or _recorded_source(spec, engine_dir))
        if ref is not None and not Path(ref).is_file():
            raise CommandError(f"--reference: no such checkpoint file {ref}")
        if ref is not None and missing_modules(["torch"]):
            click.echo("stlm-bench: PyTorch eager reference skipped: torch is not installed "
                       "(pip install 'stlm-deploy[train]' to compare with it); benchmarking the engines only",
                       err=True)
            ref = None
        tiled = spec.tiling is not None  # labelled images at their own size: the engine tiles them
        labelled = bench.load_labelled(data, fmt, category, None if tiled else spec.img_size,
                                       spec.preprocessing.resize) if data else None
        parity_images = source = None
        if calib_data:
            from stlm_export.calib import calibration_images

            cs = calibration_images(calib_data, bench.bench_input_size(spec), max_images=16,
                                    policy=spec.preprocessing.resize)
            parity_images, source = cs.images, cs.source
        report = bench.run_bench(str(engine_dir), ref, variants, batches, runs, warmup, threads, labelled,
                                 parity_images, source or "", allow_other_reference=allow_other_reference)
    except click.ClickException:
        raise
    except (DeployError, ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    emit(bench.markdown(report), report, json_path=json_path, markdown_path=md_path, echo=click.echo)
    if plot_path:
        bench.plot(report, plot_path)
    if record:
        _record(engine_dir, spec, report)
    if not any(r["error"] is None for r in report["results"]):
        raise CommandError("no backend could run this engine here (see the table)")


def _record(engine_dir: Path, spec, report: dict) -> None:
    """timings.json for auto; a read-only engine directory is reported, not an error (the bench ran)."""
    from stlm_deploy.spec import display_path
    from stlm_deploy.timings import TIMINGS_FILE, record_timings

    try:
        path = record_timings(engine_dir, spec, report)
    except OSError as e:
        click.echo(f"stlm-bench: {display_path(engine_dir / TIMINGS_FILE)}: not written ({e.strerror or e}); "
                   "backend 'auto' keeps its static order there", err=True)
        return
    if path is not None:
        click.echo(f"stlm-bench: batch-1 timings recorded in {display_path(path)} (backend 'auto' runs the fastest "
                   "gated variant on this machine; --no-record skips this)", err=True)
    else:
        click.echo(f"stlm-bench: {display_path(engine_dir / TIMINGS_FILE)}: nothing recorded (no batch-1 timing of an "
                   "artifact stlm.json lists at the precision it ran); backend 'auto' keeps its static order", err=True)


def _recorded_source(spec, engine_dir: Path) -> str | None:
    p = spec.source.checkpoint
    if not p:
        return None
    for cand in (Path(p), engine_dir / p):
        if cand.is_file():
            return str(cand)
    return None


if __name__ == "__main__":
    sys.exit(main())
