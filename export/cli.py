"""``stlm-export``: parse flags, call :func:`stlm_export.pipeline.export_engine`, print one-line errors.

Every user error (missing checkpoint, bad flag value, failed parity gate, missing TensorRT) ends as
exactly one ``Error: ...`` line on stderr and a non-zero exit status, never a traceback
(:func:`stlm_deploy.console.run_command`): exit 2 for bad flags (click's usage errors) and for a
missing ``export`` extra (checked before anything is loaded), 1 for everything else, 3 for a failed
parity gate (also for ``--int8`` alone when an INT8 artifact fails its accuracy gate: the other
artifacts are published first; with more asked for, e.g. ``--int8 --fp16``, a failing INT8 artifact is
reported and left out, exit 0).

``--target triton --out REPO``: the engine is exported as for ``--target all`` (into ``--engine-out``,
default ``engines/<name>``), then REPO is written as a Triton model repository
(:mod:`stlm_export.triton_repo`) with a KServe InferenceService manifest, ``REPO/inferenceservice.json``.
"""
from __future__ import annotations

import click

from stlm_deploy.console import CommandError, OneLineCommand, require_extra

from .calib import DEFAULT_MAX_IMAGES
from .int8.data import DEFAULT_VAL_IMAGES
from .opset import DEFAULT_OPSET
from .tensorrt_build import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, DEFAULT_WORKSPACE_MB

__all__ = ["main"]

EXIT_ERROR, EXIT_USAGE, EXIT_PARITY = 1, 2, 3


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Project checkpoint (model.ckpt, STLM or STFPM) or an official STLM state dict.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Engine directory to write (default: engines/<name>). Replaced atomically.")
@click.option("--name", default=None, help="Engine name (default: the run folder of model.ckpt, else the file stem).")
@click.option("--img-size", type=int, default=None,
              help="Input side, a multiple of 64 (default: the checkpoint's; official state dicts: 1024).")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size N.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (17-20).")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx (mixed precision policy) and fp16 plans.")
@click.option("--int8", is_flag=True,
              help="Also write INT8 artifacts (ORT Q/DQ model.int8.onnx, OpenVINO NNCF IR, TensorRT where it runs), "
                   "each published only if it passes the INT8 accuracy gate.")
@click.option("--calib-data", type=click.Path(path_type=str), default=None,
              help="Folder of images (searched recursively, mask folders skipped) for the parity gate; with --int8 "
                   "its good training images (DIR/train/good when present; never test images) calibrate the "
                   "quantisation (default: the training split recorded in the checkpoint).")
@click.option("--val-data", type=click.Path(path_type=str), default=None,
              help="Labelled MVTec-style folder (test/, ground_truth/) the task gates judge on (bf16/fp16 inference, "
                   "INT8); default: the test split of the data set the checkpoint records, else its held-out good "
                   "images, else the bundled sample. Never used for calibration.")
@click.option("--gate-images", type=click.IntRange(min=1), default=DEFAULT_VAL_IMAGES, show_default=True,
              help="At most this many gate images (spread evenly over the split); 50 or more resolve the 98 % "
                   "agreement limit.")
@click.option("--no-accuracy-control", is_flag=True,
              help="--int8: plain nncf.quantize even with labelled --val-data (faster; the gate still runs).")
@click.option("--parity-images", type=int, default=DEFAULT_MAX_IMAGES, show_default=True,
              help="At most this many calibration images are used by the parity gate.")
@click.option("--target", type=click.Choice(["onnx", "openvino", "tensorrt", "all", "triton"]), default=None,
              help="What to build (default: onnx + openvino, + tensorrt with --fp16 when TensorRT is installed); "
                   "triton: everything 'all' builds, then --out is a Triton model repository.")
@click.option("--engine-out", type=click.Path(file_okay=False, path_type=str), default=None,
              help="With --target triton: the engine directory (default: engines/<name>).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --target triton: instance_group count of each model.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="With --target triton: dynamic_batching max_queue_delay_microseconds.")
@click.option("--storage-uri", default=None,
              help="With --target triton: where the cluster finds REPO, for the KServe manifest "
                   "(default: pvc://stlm-models/<name>).")
@click.option("--no-verify", is_flag=True, help="Skip the parity gate (no parity.json, no Polygraphy files).")
@click.option("--no-fuse-pre", is_flag=True, help="Input float32 NCHW already normalised (runtime normalises).")
@click.option("--with-tlm", is_flag=True, help="Add the no-FA (TLM) map as output 'tlm_map'.")
@click.option("--no-simplify", is_flag=True, help="Keep the exporter's graph (skip onnxslim).")
@click.option("--max-batch", type=int, default=DEFAULT_MAX_BATCH, show_default=True,
              help="TensorRT profile max batch (dynamic batch).")
@click.option("--opt-batch", type=int, default=DEFAULT_OPT_BATCH, show_default=True,
              help="TensorRT profile optimum batch (dynamic batch).")
@click.option("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB, show_default=True,
              help="TensorRT builder workspace.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="TensorRT timing cache to reuse (default: .trt-timing.cache next to the engine directory).")
@click.option("--version-compatible", is_flag=True, help="TensorRT plan loadable by later TensorRT versions.")
@click.option("--hardware-compatible", is_flag=True, help="TensorRT plan for any Ampere-or-newer GPU.")
def main(ckpt: str, out: str | None, name: str | None, img_size: int | None, batch: str, opset: int, fp16: bool,
         int8: bool, calib_data: str | None, val_data: str | None, gate_images: int, no_accuracy_control: bool,
         parity_images: int, target: str | None, no_verify: bool,
         no_fuse_pre: bool, with_tlm: bool, no_simplify: bool, max_batch: int, opt_batch: int, workspace_mb: int,
         timing_cache: str | None, version_compatible: bool, hardware_compatible: bool, engine_out: str | None = None,
         instances: int = 1, max_queue_delay_us: int = 2000, storage_uri: str | None = None) -> None:
    """Export an STLM checkpoint to a verified engine directory (ONNX, fp16/int8 ONNX, OpenVINO, TensorRT)."""
    require_extra("stlm-export", "export")
    if not no_verify:  # the parity gate runs every artifact through the runtime's ONNX Runtime backend
        require_extra("stlm-export", "cpu", alternatives="[export,cpu]' (or '[export,gpu]' on a CUDA machine)")
    from stlm_train.checkpoint import CheckpointError

    from .pipeline import ExportError, ExportOptions, ParityGateError, export_engine

    repo = None
    if target == "triton":
        if out is None:
            raise CommandError("--target triton: --out REPO (the model repository to write) is required", EXIT_USAGE)
        repo, out, target = out, engine_out, "all"
    opts = ExportOptions(ckpt=ckpt, out=out, name=name, img_size=img_size, batch=batch, opset=opset, fp16=fp16,
                         int8=int8, target=target, verify=not no_verify, fuse_pre=not no_fuse_pre,
                         with_tlm=with_tlm, calib_data=calib_data, val_data=val_data, gate_images=gate_images,
                         int8_accuracy_control=not no_accuracy_control, parity_images=parity_images,
                         simplify=not no_simplify, max_batch=max_batch, opt_batch=opt_batch,
                         workspace_mb=workspace_mb, timing_cache=timing_cache, version_compatible=version_compatible,
                         hardware_compatible=hardware_compatible)
    try:
        result = export_engine(opts, log=_echo)
    except ParityGateError as e:
        raise CommandError(str(e), EXIT_PARITY) from None
    except (ExportError, CheckpointError) as e:
        raise CommandError(str(e), EXIT_ERROR) from None
    except (ValueError, OSError, RuntimeError) as e:
        raise CommandError(f"{type(e).__name__}: {e}", EXIT_ERROR) from None
    if repo is not None:
        import json

        from stlm_deploy.files import atomic_write_text

        from .triton_repo import TritonRepoOptions, kserve_manifest, write_triton_repository

        written = write_triton_repository(result.engine_dir, repo, TritonRepoOptions(
            max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances))
        model = result.spec["name"]
        manifest = kserve_manifest(model, storage_uri or f"pvc://stlm-models/{model}")
        atomic_write_text(f"{repo}/inferenceservice.json", json.dumps(manifest, indent=2) + "\n")
        _echo(f"triton repository {repo}: models {', '.join(written['models'])}; KServe manifest "
              f"{repo}/inferenceservice.json")
        click.echo(str(repo))
        return
    click.echo(str(result.engine_dir))


if __name__ == "__main__":  # python -m stlm_export.cli
    main()
