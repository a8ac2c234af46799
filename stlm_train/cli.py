"""Command-line entry points of the training package (thin: parse, then call the library).

``stlm-train`` / ``stlm-eval`` (console scripts) or ``python -m stlm_train.cli train|eval``.
Every failure is one ``Error: ...`` line on stderr and a non-zero exit code, never a traceback
(set STLM_DEBUG=1 to see one): :func:`stlm_deploy.console.run_command`, shared by all five commands.
Without the ``train`` extra (torch, scipy, tqdm) both commands exit 2 naming it, before any work.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import click

from stlm_deploy.console import require_extra, run_command

from stlm_deploy.thresholds import DEFAULT_THRESHOLD_TARGET

from .config import CONFIGS, validate_img_size

#: ``--fa-loss`` choices and default, spelled here so ``--help`` needs no torch import; a test keeps them equal
#: to :data:`stlm_train.training.options.FA_LOSSES` / ``DEFAULT_FA_LOSS``.
FA_LOSS_CHOICES = ("focal+l1", "focal", "focal+l1+dice")
DEFAULT_FA_LOSS_NAME = "focal+l1"
#: ``--fa-target`` choices and default (kept equal to ``FA_TARGETS`` / ``DEFAULT_FA_TARGET`` by a test).
FA_TARGET_CHOICES = ("mask", "changed")
DEFAULT_FA_TARGET_NAME = "mask"
#: ``--fa-input`` choices and default (kept equal to ``stlm_train.config.FA_INPUTS`` / ``TRAIN_FA_INPUT`` by a test).
FA_INPUT_CHOICES = ("product", "absdiff", "product+tlm", "tlm")
DEFAULT_FA_INPUT_NAME = "product+tlm"
#: ``--fa-output`` choices (``stlm_train.config.FA_OUTPUTS``); no default: the trainer picks (prior with the path).
FA_OUTPUT_CHOICES = ("head", "prior")
#: ``--texture-bank`` choices and default, spelled here for the same reason (kept equal to
#: :data:`stlm_train.anomalies.TEXTURE_BANKS` / ``DEFAULT_TEXTURE_BANK`` by a test).
TEXTURE_BANK_CHOICES = ("reference", "v1", "reference+self", "reference+grey")
DEFAULT_TEXTURE_BANK_NAME = "reference+grey"
#: ``--student-init`` choices and default (kept equal to ``STUDENT_INITS`` / ``DEFAULT_STUDENT_INIT`` by a test).
STUDENT_INIT_CHOICES = ("random", "teacher")
DEFAULT_STUDENT_INIT_NAME = "random"
#: ``--train-images`` default (kept equal to ``DEFAULT_TRAIN_IMAGES`` by a test).
DEFAULT_TRAIN_IMAGES_NAME = "all"

FORMAT_CHOICES = ("mvtec", "visa", "dagm", "folder")

_STOP_HELP = ("Stopping rule: exactly one of --epochs, --steps, --time-budget; without any, "
              "--steps 100 (a quick demo; the paper trains 200 epochs at 1024 px).")


@click.command(name="stlm-train", context_settings={"help_option_names": ["-h", "--help"]},
               epilog=_STOP_HELP)
@click.option("--data", metavar="ROOT", help="Data-set root, or 'builtin' (a generated data set in RUN_DIR/data). "
              "Required unless --resume.")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), default="mvtec", show_default=True,
              help="Data-set layout.")
@click.option("--category", default=None, help="Category sub-folder / VisA object / DAGM class.")
@click.option("--out", required=True, metavar="RUN_DIR", help="Run folder: last.ckpt, model.ckpt, metrics.json.")
@click.option("--config", type=click.Choice(sorted(CONFIGS)), default="paper", show_default=True,
              help="Model: STLM 'paper' or 'small' (tests and demos), or 'stfpm' (the STFPM family; official "
              "recipe: --img-size 256 --batch-size 32).")
@click.option("--img-size", type=int, default=None, help="Input size, a multiple of 64 [default: the config's]; the "
              "tile size with --work-size.")
@click.option("--work-size", type=int, default=None, metavar="W",
              help="Tiled training: resize each image once so its long side is W (aspect kept) and train on "
              "img-size crops of it; thresholds, evaluation and the exported engines then run the image as "
              "overlapping tiles [default: --img-size, no tiling].")
@click.option("--tile-overlap", type=float, default=0.25, show_default=True, metavar="F",
              help="With --work-size: the least fraction of a tile neighbouring tiles share, in [0, 0.9).")
@click.option("--epochs", type=int, default=None, help="Train this many epochs (total, resumes included).")
@click.option("--steps", type=int, default=None, help="Train this many steps (total, resumes included).")
@click.option("--time-budget", type=float, default=None, metavar="MIN",
              help="Train for this many minutes of training-loop wall clock.")
@click.option("--teacher", default="builtin", show_default=True, metavar="builtin|PATH",
              help="'builtin' (weightless, calibrated on the training images) or a file: sam_vit_*.pth / "
              "mobile_sam.pt (STLM), resnet18-*.pth (torchvision) or timm resnet18 (STFPM).")
@click.option("--anomaly-source", default=None, metavar="DIR",
              help="Texture images for pseudo anomalies (e.g. DTD); default: procedural textures.")
@click.option("--texture-bank", type=click.Choice(TEXTURE_BANK_CHOICES), default=DEFAULT_TEXTURE_BANK_NAME,
              show_default=True, help="Pseudo-anomaly textures: 'reference+grey' (five procedural kinds, jittered colours; grey on "
              "grey-scale images, folder textures too), 'reference' (the same, coloured on every image), 'v1' (this "
              "project's first bank) or 'reference+self' (half the anomalies cut from the image itself, turned and "
              "moved: the object's own material out of place; with --anomaly-source too).")
@click.option("--augmentation", type=click.Choice(("auto", "none", "slight", "rotation")), default="auto",
              show_default=True, help="Geometric augmentation before the noise; auto: the official per-category "
              "mode of --category (or of an MVTec category named in the data folder).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True, help="Images per step per process.")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from its last.ckpt.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in RUN_DIR (without it, or --resume, "
              "a folder that holds a run is refused).")
@click.option("--amp", is_flag=True, help="Mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--init-mobile-sam", default=None, metavar="PATH",
              help="Initialise both students and the decoder from mobile_sam.pt (the paper; official code: off).")
@click.option("--save-every", type=int, default=100, show_default=True,
              help="Save RUN_DIR/last.ckpt every N steps (0: only at the end).")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="Fraction of train/good held out (never trained on) to set thresholds; at least 1 image.")
@click.option("--threshold-target", default=DEFAULT_THRESHOLD_TARGET, show_default=True, metavar="TARGET",
              help="Trade-off of the stored image threshold: 'fpr<=A' (at most a fraction A of held-out good images "
              "above it), or f1 / 'fnr<=B' judged against their pseudo-anomalous versions. Change it later with "
              "stlm-threshold.")
@click.option("--fa-loss", type=click.Choice(FA_LOSS_CHOICES), default=DEFAULT_FA_LOSS_NAME, show_default=True,
              help="The FA head's loss: 'focal+l1' (paper eq. 8, the official code), 'focal' alone (no L1: the map "
              "keeps ranking weak student disagreement) or 'focal+l1+dice' (a soft Dice term added: cover the region).")
@click.option("--fa-target", type=click.Choice(FA_TARGET_CHOICES), default=DEFAULT_FA_TARGET_NAME, show_default=True,
              help="Which pixels the FA head's loss counts: 'mask' (all, the official code) or 'changed' (only where "
              "the pseudo mask and the teacher's change agree).")
@click.option("--fa-input", type=click.Choice(FA_INPUT_CHOICES), default=DEFAULT_FA_INPUT_NAME, show_default=True,
              help="What the FA head reads per level: 'product' of the students' normalised features (the official "
              "code), their 'absdiff' (zero where the students agree), 'product+tlm' (the product plus the TLM map "
              "through a prior path: the head starts as the TLM map) or 'tlm' (the TLM map's per-level log distances "
              "alone, head and prior path). Stored in the model; engines follow it.")
@click.option("--fa-output", type=click.Choice(FA_OUTPUT_CHOICES), default=None,
              help="The FA map at inference: the 'head' (official) or its trained TLM 'prior' path alone (the head "
              "still trains the students and the prior). Default: prior when --fa-input has the path, else head.")
@click.option("--student-init", type=click.Choice(STUDENT_INIT_CHOICES), default=DEFAULT_STUDENT_INIT_NAME,
              show_default=True, help="Where the students and the shared decoder start: 'random' (seeded) or "
              "'teacher' (copies of a TinyViT teacher's encoder and decoder: the built-in one or MobileSAM).")
@click.option("--train-images", default=DEFAULT_TRAIN_IMAGES_NAME, show_default=True, metavar="N|all|auto",
              help="How many distinct train/good images the students learn from (evenly spread): 'all', a count, or "
              "'auto': as many as the planned steps visit about 100 times each (at least 16; every image with "
              "--epochs). Screened, not the default: better maps on full tire, worse on grey surfaces "
              "(docs/localisation.md).")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Evaluate the test split at the end (when the data set has one).")
@click.option("--refinish", "refinish_from", default=None, metavar="RUN_DIR",
              help="Train nothing: finish RUN_DIR's trained weights again into --out with the options that act "
              "after the last step (--fa-output, --threshold-target), thresholds and evaluation included; e.g. the "
              "FA map's other output, to compare both on your own images without retraining.")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@click.pass_context
def train_cmd(ctx: click.Context, data, format_, category, out, config, img_size, work_size, tile_overlap, epochs,
              steps, time_budget,
              teacher, anomaly_source, texture_bank, augmentation, device, seed, batch_size, resume, overwrite, amp,
              num_workers, init_mobile_sam, save_every, holdout, threshold_target, fa_loss, fa_target, fa_input,
              fa_output, student_init, train_images, do_eval, refinish_from, quiet) -> int:
    """Train an STLM model (students + shared decoder + FA head) or, with --config stfpm, an STFPM model
    (ResNet-18 student against a frozen ResNet-18 teacher) on the good images of a data set."""
    require_extra("stlm-train", "train")
    from .training import TrainError, TrainOptions, train

    explicit = {name for name in ctx.params
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    explicit = {"format" if n == "format_" else n for n in explicit}
    if refinish_from is not None:
        return _refinish(refinish_from, out, explicit, {"fa_output": fa_output, "threshold_target": threshold_target},
                         do_eval, quiet)
    opts = TrainOptions(
        data=data or "", out=out, format=format_, category=category, config=config, img_size=img_size,
        work_size=work_size, tile_overlap=tile_overlap, epochs=epochs, steps=steps, time_budget=time_budget,
        teacher=teacher, anomaly_source=anomaly_source, texture_bank=texture_bank,
        augmentation=augmentation, device=device, seed=seed, batch_size=batch_size, num_workers=num_workers, amp=amp,
        init_mobile_sam=init_mobile_sam, save_every=save_every, resume=resume, overwrite=overwrite, holdout=holdout,
        threshold_target=threshold_target, fa_loss=fa_loss, fa_target=fa_target, fa_input=fa_input, fa_output=fa_output,
        student_init=student_init, train_images=train_images, evaluate=do_eval,
        progress=not quiet)
    try:
        opts.validate()
    except TrainError as e:  # bad flags: a usage error (exit 2), like click's own checks
        raise click.UsageError(str(e)) from None
    result = train(opts, explicit=explicit)
    if result.model_path is not None and not quiet:
        click.echo(f"wrote {result.model_path} and {result.metrics_path}")
    return 0


#: what ``stlm-train --refinish`` accepts besides the options it changes
_REFINISH_FLAGS = {"refinish_from", "out", "do_eval", "quiet"}


def _refinish(run_dir: str, out: str, explicit: set[str], values: dict[str, object], evaluate: bool,
              quiet: bool) -> int:
    """``stlm-train --refinish RUN_DIR --out DIR --fa-output ...``: :func:`stlm_train.training.refinish`."""
    from .training import POST_TRAINING_OPTIONS, TrainError, refinish

    other = sorted(explicit - _REFINISH_FLAGS - set(POST_TRAINING_OPTIONS))
    if other:
        raise click.UsageError(f"--refinish trains nothing: --{other[0].replace('_', '-')} cannot be given with it "
                               "(only --out, --fa-output, --threshold-target, --eval/--no-eval, --quiet)")
    changes = {k: v for k, v in values.items() if k in explicit}
    if not changes:
        raise click.UsageError("--refinish needs what to change: --fa-output and/or --threshold-target")
    try:
        result = refinish(run_dir, out, changes, evaluate=evaluate, log=(lambda s: None) if quiet else None)
    except TrainError as e:
        raise click.UsageError(str(e)) from None
    if result.model_path is not None and not quiet:
        click.echo(f"wrote {result.model_path} and {result.metrics_path}")
    return 0


@click.command(name="stlm-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True, metavar="CKPT", help="A project checkpoint (model.ckpt, either family), an "
              "official STLM state dict, or an official STFPM snapshot (with --teacher).")
@click.option("--data", required=True, metavar="ROOT", help="Data-set root, or 'builtin' (the generated set).")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), default="mvtec", show_default=True)
@click.option("--category", default=None)
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the results as JSON (atomically).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--img-size", type=int, default=None, help="Evaluate at another size (multiple of 64) "
              "[default: the checkpoint's; official state dicts: 1024].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--teacher", default=None, metavar="PATH", help="The ImageNet ResNet-18 (resnet18-*.pth) an official "
              "STFPM student snapshot was trained against.")
@click.option("--grid", type=click.Choice(("model", "original")), default="model", show_default=True,
              help="Pixel metrics on the model's map grid (img_size, or a tiled checkpoint's work shape) or on each "
              "test image's own size (maps resized as the runtimes return them: compares untiled and tiled models).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors (use with --json).")
def eval_cmd(ckpt, data, format_, category, json_path, batch_size, img_size, device, teacher, grid, quiet) -> int:
    """Evaluate a checkpoint on a data set's test split: the deployed map (STLM: FA, and its TLM map;
    STFPM: its one map)."""
    require_extra("stlm-eval", "train")
    from .evaluate import evaluate_checkpoint, format_table
    from .training import resolve_device

    if batch_size < 1:
        raise click.BadParameter(f"must be at least 1, got {batch_size}", param_hint="'--batch-size'")
    if img_size is not None:
        try:
            validate_img_size(img_size)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--img-size'") from None
    if not os.path.isfile(ckpt):
        raise click.BadParameter(f"'{ckpt}': no such checkpoint file", param_hint="'--ckpt'")
    if teacher is not None and not os.path.isfile(teacher):
        raise click.BadParameter(f"'{teacher}': no such file", param_hint="'--teacher'")
    if data.lower() not in ("builtin", "generated") and not os.path.isdir(data):
        raise click.BadParameter(f"data root '{data}' does not exist or is not a folder", param_hint="'--data'")
    dev = resolve_device(device)
    result = evaluate_checkpoint(ckpt, data, format_, category, batch_size=batch_size, device=dev,
                                 img_size=img_size, json_path=json_path, teacher=teacher, grid=grid)
    if not quiet:
        click.echo(format_table(result))
        if json_path:
            click.echo(f"wrote {json_path}")
    return 0


@click.command(name="stlm-threshold", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", required=True, metavar="TARGET",
              help="f1 (F1-max; needs good and defective images), 'fpr<=A' (at most a fraction A of good parts "
              "flagged; good images suffice) or 'fnr<=B' (at most B of defective parts missed; needs defective "
              "images).")
@click.option("--data", required=True, metavar="ROOT", help="Labelled validation images (a data-set root).")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), default="mvtec", show_default=True)
@click.option("--category", default=None)
@click.option("--split", type=click.Choice(("test", "train")), default="test", show_default=True,
              help="Which split of ROOT holds the validation images.")
@click.option("--ckpt", default=None, metavar="CKPT", help="Project checkpoint to re-threshold (scores come from it).")
@click.option("--engine", default=None, metavar="ENGINE", help="Engine directory (or a file in it) whose stlm.json "
              "is rewritten; scored by the engine itself when no --ckpt is given.")
@click.option("--backend", default="auto", show_default=True, help="Runtime backend for engine-only scoring.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the threshold and its rates; write nothing.")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the choice as JSON (atomically).")
def threshold_cmd(target, data, format_, category, split, ckpt, engine, backend, batch_size, dry_run,
                  json_path) -> int:
    """Set the image decision threshold of a checkpoint and/or an engine from labelled validation images at
    a chosen trade-off; stlm-infer, the C++ runtime and stlm-serve decide with it without a re-export."""
    if ckpt is not None:
        require_extra("stlm-threshold --ckpt", "train")
        if not os.path.isfile(ckpt):
            raise click.BadParameter(f"'{ckpt}': no such checkpoint file", param_hint="'--ckpt'")
    if batch_size < 1:
        raise click.BadParameter(f"must be at least 1, got {batch_size}", param_hint="'--batch-size'")
    from .rethreshold import rethreshold

    result = rethreshold(target, data, ckpt=ckpt, engine=engine, format=format_, category=category, split=split,
                         backend=backend, batch_size=batch_size, dry_run=dry_run, log=click.echo)
    if json_path:
        from stlm_deploy.files import atomic_write_json

        atomic_write_json(json_path, result)
    return 0


def _run(cmd: click.Command, argv: Sequence[str] | None, prog: str) -> int:
    """Run a click command with one-line errors and an integer exit code (never sys.exit here)."""
    return run_command(cmd, argv, prog, known=(ValueError, OSError, RuntimeError, json.JSONDecodeError))


def train_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``stlm-train``."""
    return _run(train_cmd, argv, "stlm-train")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``stlm-eval``."""
    return _run(eval_cmd, argv, "stlm-eval")


def threshold_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``stlm-threshold``."""
    return _run(threshold_cmd, argv, "stlm-threshold")


_COMMANDS = {"train": train_main, "eval": eval_main, "threshold": threshold_main}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlm_train.cli train|eval [OPTIONS]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        click.echo("Usage: python -m stlm_train.cli train|eval|threshold [OPTIONS]\n\n"
                   "  train      train an STLM model (same as stlm-train)\n"
                   "  eval       evaluate a checkpoint (same as stlm-eval)\n"
                   "  threshold  re-threshold a checkpoint / engine (same as stlm-threshold)\n\n"
                   "Run 'python -m stlm_train.cli train --help' for the options.")
        return 0 if args else 2
    if args[0] not in _COMMANDS:
        click.echo(f"Error: unknown command '{args[0]}' (expected train, eval or threshold)", err=True)
        return 2
    return _COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
