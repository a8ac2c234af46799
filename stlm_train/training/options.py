"""Training options: one dataclass, validated in one place (the CLI and the library share it)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stlm_deploy.preprocess import DEFAULT_RESIZE, RESIZE_POLICIES
from stlm_deploy.thresholds import DEFAULT_THRESHOLD_TARGET, ThresholdError, parse_target
from stlm_deploy.tiling import DEFAULT_TILE_OVERLAP, Tiling, check_tiling

from ..anomalies import AUGMENTATIONS, DEFAULT_TEXTURE_BANK, TEXTURE_BANKS
from ..config import (CONFIGS, DEFAULT_FA_INPUT, DEFAULT_FA_OUTPUT, FA_INPUTS, FA_OUTPUTS, PRIOR_FA_INPUTS,
                      TRAIN_FA_INPUT, validate_img_size)
from ..data.datasets import FORMATS
from ..evaluate import BUILTIN_DATA
from ..modeling.teacher import DEFAULT_TEACHER_RECIPE, TEACHER_RECIPES, TEACHER_SEED_OFFSET

DEFAULT_STEPS = 100  # when no stopping flag is given: a quick demo run (the paper: 200 epochs)
# Options that define a run: a resumed run takes them from last.ckpt, and they must not change.
IDENTITY_FIELDS = ("data", "format", "category", "config", "img_size", "seed", "batch_size", "teacher",
                   "anomaly_source", "augmentation", "init_mobile_sam", "holdout", "calib_images", "image_quantile",
                   "pixel_quantile", "teacher_seed", "teacher_recipe", "texture_bank", "resize",
                   "augment_before_resize", "student_bn", "threshold_target", "fa_grad", "fa_loss", "fa_target",
                   "fa_input", "fa_output", "student_init", "train_images")
#: Identity options of tiled runs only (an untiled run's state and checkpoint do not mention them), with the
#: values a run saved without them had: untiled.
TILING_FIELDS = {"work_size": None, "tile_overlap": DEFAULT_TILE_OVERLAP}
#: How the students' BatchNorm layers behave during training (see :mod:`.loop`).
STUDENT_BN_MODES = ("recalibrate", "frozen", "train")
DEFAULT_STUDENT_BN = "recalibrate"
#: Whether the FA head's loss trains the students too (``students``, the official code and the default) or only
#: the FA head (``detached``: the students learn from distillation alone; measured in :mod:`.loop`).
#: A number strictly between 0 and 1 ("0.3") scales the FA loss's gradient into the students (the forward
#: pass is unchanged): :func:`fa_grad_scale`.
FA_GRAD_MODES = ("detached", "students")
DEFAULT_FA_GRAD = "students"
#: The FA head's loss: ``focal+l1`` (paper eq. 8, the official code), ``focal`` alone (without L1 the head's
#: ranking of weak student disagreement survives training) or ``focal+l1+dice`` (a soft Dice term added, so the
#: head is asked to cover a pasted region's extent, not only its most foreign spot; see :mod:`stlm_train.losses`).
FA_LOSSES = ("focal+l1", "focal", "focal+l1+dice")
DEFAULT_FA_LOSS = "focal+l1"
#: Which pixels the FA head's loss counts: ``mask`` (all, the official code) or ``changed`` (those where the
#: pseudo mask and the teacher's change agree, :func:`stlm_train.losses.fa_weights`).
FA_TARGETS = ("mask", "changed")
DEFAULT_FA_TARGET = "mask"
#: Where the students and the shared decoder start (STLM): ``random`` (the seeded official init) or ``teacher`` (a
#: copy of a TinyViT teacher's encoder and decoder: the built-in one, or MobileSAM; the paper's analogue is its
#: MobileSAM init of students that distil SAM, so training starts from students that already reproduce the teacher).
STUDENT_INITS = ("random", "teacher")
DEFAULT_STUDENT_INIT = "random"
#: How many distinct train/good images the students learn from (STLM): ``all`` (the default, as the official code),
#: a count, or ``auto``: as many as the run's planned steps visit about ``sampling.AUTO_TRAIN_EPOCHS`` times each
#: (:func:`.sampling.auto_train_images`; it lifts full tire's maps and lowers a grey-surface category's, so it is an
#: option, docs/localisation.md). A resumed run keeps the resolved count.
TRAIN_IMAGES_MODES = ("all", "auto")
DEFAULT_TRAIN_IMAGES = "all"


def parse_train_images(value: str) -> int | str:
    """``train_images`` as ``all`` / ``auto`` or a positive count; anything else is a one-line TrainError."""
    text = str(value).strip().lower()
    if text in TRAIN_IMAGES_MODES:
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise TrainError(f"--train-images must be {' or '.join(TRAIN_IMAGES_MODES)} or a positive count, got {value!r}")
    return count


def fa_grad_scale(mode: str) -> float:
    """``fa_grad`` as the factor on the FA loss's gradient into the students: students 1, detached 0, "A" A."""
    if mode in FA_GRAD_MODES:
        return 1.0 if mode == "students" else 0.0
    try:
        scale = float(mode)
    except (TypeError, ValueError):
        scale = float("nan")
    if not 0.0 < scale < 1.0:
        raise TrainError(f"fa_grad must be one of {', '.join(FA_GRAD_MODES)} or a number in (0, 1), got {mode!r}")
    return scale



class TrainError(ValueError):
    """Bad training input (options, stopping rule, resume state); one line."""


@dataclass
class TrainOptions:
    """Everything a run needs. ``data`` is a folder or ``builtin``/``generated`` (a procedural set)."""

    data: str
    out: str
    format: str = "mvtec"
    category: str | None = None
    config: str = "paper"
    img_size: int | None = None  # None: the config's own size
    epochs: int | None = None  # exactly one of epochs / steps / time_budget (none: DEFAULT_STEPS)
    steps: int | None = None
    time_budget: float | None = None  # minutes of training-loop wall clock (all sessions of a run)
    teacher: str = "builtin"  # "builtin" or a sam_vit_*.pth / mobile_sam.pt path (STFPM: resnet18-*.pth)
    anomaly_source: str | None = None  # texture folder (DTD); None: the procedural texture bank
    augmentation: str = "auto"  # none | slight | rotation | auto (from the category / folder name)
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 2
    num_workers: int = 0
    amp: bool = False
    init_mobile_sam: str | None = None
    save_every: int = 100  # steps between last.ckpt saves (0: only at the end)
    resume: bool = False
    overwrite: bool = False  # replace a run already in ``out`` (without it, and without resume: an error)
    holdout: float = 0.2  # fraction of train/good kept for thresholds (at least 1 image)
    calib_images: int = 32  # clean training images used to calibrate the built-in teacher's BN
    image_quantile: float = 0.995  # the image threshold rule of runs with threshold_target None (before it existed)
    pixel_quantile: float = 0.999
    evaluate: bool = True  # run the test split at the end when there is one
    eval_batch_size: int = 8
    progress: bool = True
    lr_students: float = 5e-4
    lr_fa_res: float = 0.1
    lr_fa_head: float = 0.01
    # Recipe knobs (defaults are the measured best; the others reproduce earlier versions for ablations)
    teacher_seed: int | None = None  # None: seed + TEACHER_SEED_OFFSET (never the students' stream)
    teacher_recipe: str = DEFAULT_TEACHER_RECIPE
    texture_bank: str = DEFAULT_TEXTURE_BANK
    resize: str = DEFAULT_RESIZE
    augment_before_resize: bool = True  # geometric augmentation on the full-resolution image, then resize
    student_bn: str = DEFAULT_STUDENT_BN  # recalibrate | frozen | train (official: train)
    fa_grad: str = DEFAULT_FA_GRAD  # detached | students (official) | a gradient factor in (0, 1)
    fa_loss: str = DEFAULT_FA_LOSS  # focal+l1 (official) | focal | focal+l1+dice
    fa_target: str = DEFAULT_FA_TARGET  # mask (official) | changed
    fa_input: str = TRAIN_FA_INPUT  # what the FA head reads (STLM only): product+tlm | product (official) | absdiff | tlm
    # The FA map at inference (STLM only, stlm_train.config.FA_OUTPUTS): head | prior; None: prior when the head
    # has the prior path, else head (resolved_fa_output). Acts after the last step (refinish can change it).
    fa_output: str | None = None
    student_init: str = DEFAULT_STUDENT_INIT  # STUDENT_INITS: random (seeded) | teacher (STLM, TinyViT teachers)
    train_images: str = DEFAULT_TRAIN_IMAGES  # TRAIN_IMAGES_MODES or a count (parse_train_images)
    # The stored image threshold's trade-off (stlm_deploy.thresholds): fpr<=A on held-out good images, or
    # f1 / fnr<=B with the held-out images' pseudo-anomalous versions as the defective class.
    threshold_target: str | None = DEFAULT_THRESHOLD_TARGET
    # Tiled training (stlm_deploy.tiling): each image resized once to a long side of work_size, the students
    # trained on img_size crops of it; None (or img_size itself): untiled, every image resized to img_size.
    work_size: int | None = None
    tile_overlap: float = DEFAULT_TILE_OVERLAP  # of the tiles that thresholds/evaluation/engines stitch

    def identity(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        if self.work_size is not None:
            out.update({k: getattr(self, k) for k in TILING_FIELDS})
        return out

    def resolved_fa_output(self) -> str:
        """``fa_output``, or when None the trainer's choice: the prior path alone where the head has one."""
        if self.fa_output is not None:
            return self.fa_output
        return "prior" if self.fa_input in PRIOR_FA_INPUTS else DEFAULT_FA_OUTPUT

    def resolved_img_size(self) -> int:
        """The model input (tile) size: ``img_size``, else the config's own."""
        return int(self.img_size) if self.img_size is not None else int(CONFIGS[self.config].img_size)

    def tiling(self) -> Tiling | None:
        """The run's tiling (None: untiled; a work size equal to the tile is untiled too)."""
        tile = self.resolved_img_size()
        if self.work_size is None or self.work_size == tile:
            return None
        return Tiling(tile, self.work_size, self.tile_overlap)

    @property
    def builtin_teacher(self) -> bool:
        return str(self.teacher).lower() == "builtin"

    @property
    def builtin_teacher_seed(self) -> int:
        """The built-in teacher's own seed: never the stream that initialises the students."""
        return int(self.teacher_seed) if self.teacher_seed is not None else int(self.seed) + TEACHER_SEED_OFFSET

    def stop_rule(self) -> tuple[str, float]:
        """("epochs" | "steps" | "time_budget", value); no flag given: DEFAULT_STEPS steps."""
        given = [(n, v) for n, v in (("epochs", self.epochs), ("steps", self.steps),
                                     ("time_budget", self.time_budget)) if v is not None]
        if len(given) > 1:
            raise TrainError("use only one of --epochs, --steps, --time-budget (got "
                             + " and ".join("--" + n.replace("_", "-") for n, _ in given) + ")")
        if not given:
            return "steps", float(DEFAULT_STEPS)
        name, v = given[0]
        if not (v > 0) or (name != "time_budget" and int(v) != v):
            kind = "number" if name == "time_budget" else "integer"
            raise TrainError(f"--{name.replace('_', '-')} must be a positive {kind}, got {v}")
        return name, float(v)

    def validate(self) -> "TrainOptions":
        """Every check of the options, in one place; raises a one-line :class:`TrainError` naming the flag."""
        if not self.data and not self.resume:
            raise TrainError("Missing option '--data' (a data-set root or 'builtin').")
        held = [n for n in ("last.ckpt", "model.ckpt") if (Path(self.out) / n).exists()]
        if held and not self.resume and not self.overwrite:
            raise TrainError(f"--out {self.out}: already holds a run ({', '.join(held)}); use --resume to continue "
                             "it or --overwrite to replace it")
        if self.data and self.data.lower() not in BUILTIN_DATA and not Path(self.data).is_dir():
            raise TrainError(f"--data: data root '{self.data}' does not exist or is not a folder")
        if self.format not in FORMATS:
            raise TrainError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.config not in CONFIGS:
            raise TrainError(f"--config must be one of {', '.join(sorted(CONFIGS))}, got {self.config!r}")
        if self.img_size is not None:
            try:
                validate_img_size(self.img_size)
            except ValueError as e:
                raise TrainError(f"--img-size: {e}") from None
        if self.work_size is not None or self.tile_overlap != DEFAULT_TILE_OVERLAP:
            work = self.resolved_img_size() if self.work_size is None else self.work_size
            for problem in check_tiling(self.resolved_img_size(), work, self.tile_overlap):
                key, _, what = problem.partition(": ")
                raise TrainError(f"--{key.replace('_', '-')}: {what}")
            if self.work_size == self.resolved_img_size():
                self.work_size = None  # the documented default: no tiling
        self.stop_rule()
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--num-workers", self.num_workers, 0),
                                 ("--save-every", self.save_every, 0), ("--calib-images", self.calib_images, 1)):
            if value < low:
                raise TrainError(f"{flag} must be at least {low}, got {value}")
        if not 0.0 < self.holdout < 1.0:
            raise TrainError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.anomaly_source is not None and not Path(self.anomaly_source).is_dir():
            raise TrainError(f"--anomaly-source: '{self.anomaly_source}' is not a folder")
        if self.student_init == "teacher" and (self.init_mobile_sam is not None
                                               or CONFIGS[self.config].family != "stlm"):
            raise TrainError("--student-init teacher: STLM only, and not with --init-mobile-sam (the students start "
                             "from one of them)")
        if self.init_mobile_sam is not None and not Path(self.init_mobile_sam).is_file():
            raise TrainError(f"--init-mobile-sam: {self.init_mobile_sam}: no such file")
        if not self.builtin_teacher and not Path(self.teacher).is_file():
            raise TrainError(f"--teacher: '{self.teacher}': no such file (use builtin or a sam_vit_*.pth / "
                             "mobile_sam.pt for STLM, a resnet18-*.pth for --config stfpm)")
        if self.augmentation != "auto" and self.augmentation not in AUGMENTATIONS:
            raise TrainError(f"--augmentation must be auto or one of {', '.join(AUGMENTATIONS)}, "
                             f"got {self.augmentation!r}")
        for name, value, choices in (("teacher_recipe", self.teacher_recipe, TEACHER_RECIPES),
                                     ("texture_bank", self.texture_bank, TEXTURE_BANKS),
                                     ("resize", self.resize, RESIZE_POLICIES),
                                     ("student_bn", self.student_bn, STUDENT_BN_MODES),
                                     ("fa_loss", self.fa_loss, FA_LOSSES),
                                     ("fa_target", self.fa_target, FA_TARGETS),
                                     ("fa_input", self.fa_input, FA_INPUTS),
                                     ("student_init", self.student_init, STUDENT_INITS)):
            if value not in choices:
                raise TrainError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        fa_grad_scale(self.fa_grad)
        parse_train_images(self.train_images)
        # STFPM has no FA head: the trainer's default and the official product (what runs recorded before the
        # field resume with) mean nothing there; another choice is a mistake
        if self.fa_input not in (TRAIN_FA_INPUT, DEFAULT_FA_INPUT) and CONFIGS[self.config].family != "stlm":
            raise TrainError(f"--fa-input {self.fa_input}: STLM only (--config {self.config} has no FA head)")
        if self.fa_output is not None and self.fa_output not in FA_OUTPUTS:
            raise TrainError(f"fa_output must be one of {', '.join(FA_OUTPUTS)}, got {self.fa_output!r}")
        if self.fa_output == "prior":
            if CONFIGS[self.config].family != "stlm":
                raise TrainError(f"--fa-output prior: STLM only (--config {self.config} has no FA head)")
            if self.fa_input not in PRIOR_FA_INPUTS:
                raise TrainError(f"--fa-output prior needs --fa-input {' or '.join(PRIOR_FA_INPUTS)} (the head's "
                                 f"prior path), got --fa-input {self.fa_input}")
        if self.threshold_target is not None:
            try:
                parse_target(self.threshold_target)
            except ThresholdError as e:
                raise TrainError(str(e).replace("--target", "--threshold-target")) from None
        for q in (self.image_quantile, self.pixel_quantile):
            if not 0.0 < q <= 1.0:
                raise TrainError(f"threshold quantiles must be in (0, 1], got {q}")
        return self


def merge_resume_options(opts: TrainOptions, stored: dict[str, Any], explicit: set[str]) -> TrainOptions:
    """Identity options come from the run; an explicitly given different value is an error."""
    # an untiled run stores no tiling field: its work size was None (its tile overlap was never used)
    run = {**({"work_size": None} if "work_size" not in stored else {}), **stored}
    for k in (*IDENTITY_FIELDS, *TILING_FIELDS):
        if k in explicit and k in run and getattr(opts, k) != run[k]:
            flag = "--" + k.replace("_", "-")
            raise TrainError(f"--resume: {flag} {getattr(opts, k)!r} differs from the run's {run[k]!r} "
                             "(a resumed run keeps its data, model, seed and teacher)")
    # Runs saved before a recipe knob existed were trained with its old value, not today's default.
    legacy = {"teacher_seed": stored.get("seed", opts.seed), "teacher_recipe": "v1", "texture_bank": "v1",
              "resize": "bilinear", "augment_before_resize": False,
              "student_bn": "train", "threshold_target": None, "fa_grad": "students", "fa_loss": "focal+l1",
              "fa_target": "mask", "fa_input": "product", "fa_output": DEFAULT_FA_OUTPUT,
              "student_init": "random", "train_images": "all",
              **TILING_FIELDS}
    return replace(opts, **{k: stored[k] if k in stored else legacy[k] for k in (*IDENTITY_FIELDS, *TILING_FIELDS)
                            if k in stored or k in legacy})
