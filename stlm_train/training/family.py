"""What differs between model families in a training run, as one strategy object per family.

The run (:mod:`.run`) owns everything shared: data, held-out split, seeds, sampler, stopping rule,
progress, ``last.ckpt``/resume, DDP, thresholds, checkpoint and evaluation. A family supplies the
model with its teacher and trainer, its loss-term names, whether pseudo anomalies are pasted and how
``--augmentation auto`` resolves, and how its optimisers are described.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..checkpoint import init_students_from_mobile_sam
from ..modeling.stfpm import STFPM
from ..modeling.stlm import STLM
from ..modeling.teacher import calibrate_batchnorm
from .distributed import DistInfo
from .loop import StepRunner, Trainer, calibrate_students
from .options import TrainOptions
from .sampling import resolve_augmentation
from .stfpm_step import SGD_LR, SGD_MOMENTUM, SGD_WEIGHT_DECAY, STFPMTrainer
from .stfpm_step import loss_keys as stfpm_loss_keys
from .state import LOSS_KEYS
from .teachers import build_teacher, init_students_from_teacher


class RunContext(Protocol):
    """What a family uses of the run (:class:`.run._Run` provides it): options, config, device, the model it
    sets, the resumed state, the log, the step count and the image streams for calibration and selection."""

    opts: TrainOptions
    cfg: Any
    device: torch.device
    model: nn.Module
    state: dict[str, Any] | None
    info: DistInfo
    step: int
    say: Callable[[str], None]

    def calibration_batches(self) -> Iterator[torch.Tensor]: ...

    def held_out_batches(self) -> Iterator[torch.Tensor]: ...


class STLMFamily:
    """Two students + decoder + FA head against a separate frozen teacher, on pseudo anomalies."""

    name = "stlm"
    anomaly_probability = 0.5

    def augmentation(self, opts: TrainOptions, category: str) -> str:
        return resolve_augmentation(opts.augmentation, category)

    def setup(self, run: RunContext, early: Any) -> tuple[nn.Module, nn.Module, dict[str, Any], StepRunner]:
        opts = run.opts
        model = STLM(run.cfg)
        if opts.init_mobile_sam and run.state is None:
            init_students_from_mobile_sam(model, opts.init_mobile_sam)
        run.model = model.to(run.device)
        teacher, desc = early or build_teacher(opts, run.cfg, run.calibration_batches, run.device,
                                               run.state.get("teacher") if run.state else None, run.say)
        if opts.student_init == "teacher" and run.state is None:  # resumed: the weights come with the state
            init_students_from_teacher(run.model, teacher)
            run.say(f"students: initialised from the {desc['kind']} teacher's encoder and decoder")
        if opts.student_bn == "frozen" and run.state is None:  # resumed: the statistics come with the weights
            n = calibrate_students(run.model, run.calibration_batches)
            run.say(f"students: BatchNorm statistics calibrated on {n} clean training images and frozen")
        return run.model, teacher, desc, Trainer(run.model, teacher, run.device, opts, run.info,
                                                 calibration=run.calibration_batches, step_counter=lambda: run.step)

    def finish(self, run: RunContext) -> None:
        """After the last step: ``--student-bn recalibrate`` re-estimates the students' statistics."""
        if run.opts.student_bn == "recalibrate":
            n = calibrate_students(run.model, run.calibration_batches)
            run.say(f"students: BatchNorm statistics re-estimated on {n} clean training images")

    def early_teacher(self, run: RunContext) -> Any:
        """A teacher file is read before any data work, so a bad one fails first."""
        if run.opts.builtin_teacher:
            return None
        return build_teacher(run.opts, run.cfg, lambda: iter(()), run.device, None, run.say)

    def loss_keys(self, model: nn.Module) -> tuple[str, ...]:
        return LOSS_KEYS

    def teacher_state(self, teacher: nn.Module, desc: dict[str, Any]) -> dict[str, Any]:
        if desc["kind"] == "builtin":
            return {"kind": "builtin", "state_dict": teacher.state_dict(),
                    "calibration_images": desc.get("calibration_images")}
        return dict(desc)

    def postfix(self, terms: dict[str, float]) -> str:
        return (f"loss {terms['total']:.3f} (Lp {terms['plain']:.3f} Lde {terms['denoising']:.3f} "
                f"foc {terms['focal']:.4f} l1 {terms['l1']:.3f})")

    def optimizers(self, opts: TrainOptions) -> dict[str, Any]:
        return {"students": {"type": "Adam", "lr": opts.lr_students, "betas": [0.5, 0.999]},
                "fa": {"type": "SGD", "lr_res": opts.lr_fa_res, "lr_head": opts.lr_fa_head,
                       "momentum": 0.9, "weight_decay": 1e-4}}


class STFPMFamily(STLMFamily):
    """ResNet-18 teacher inside the model, clean images only, official SGD and per-epoch selection."""

    name = "stfpm"
    anomaly_probability = 0.0  # STFPM trains on the good images as they are

    def augmentation(self, opts: TrainOptions, category: str) -> str:
        return "none" if opts.augmentation == "auto" else opts.augmentation  # official: no augmentation

    def early_teacher(self, run: RunContext) -> Any:
        return None  # the teacher file is loaded into the model (setup), before any training work

    def setup(self, run: RunContext, early: Any) -> tuple[nn.Module, nn.Module, dict[str, Any], StepRunner]:
        from ..checkpoint import load_resnet18_teacher

        opts, say = run.opts, run.say
        t0 = time.perf_counter()
        seed = opts.builtin_teacher_seed
        model = STFPM(run.cfg, teacher_generator=torch.Generator().manual_seed(seed))
        if opts.builtin_teacher:
            desc: dict[str, Any] = {"kind": "builtin", "seed": seed}
        else:
            load_resnet18_teacher(model, opts.teacher)
            desc = {"kind": "resnet18", "path": str(Path(opts.teacher).resolve())}
            say(f"teacher: ResNet-18 from {opts.teacher}")
        run.model = model.to(run.device)
        if opts.builtin_teacher and run.state is not None:  # calibrated statistics come back with the model
            desc["calibration_images"] = (run.state.get("teacher") or {}).get("calibration_images")
            say(f"teacher: built-in ResNet-18 (seed {seed}), restored from last.ckpt")
        elif opts.builtin_teacher:
            n = calibrate_batchnorm(model.teacher, run.calibration_batches())
            dt = time.perf_counter() - t0
            desc.update(calibration_images=n, calibration_seconds=round(dt, 2))
            say(f"teacher: built-in ResNet-18 (seed {seed}, random weights: pass --teacher resnet18-*.pth for "
                f"ImageNet accuracy), BatchNorm calibrated on {n} clean training images in {dt:.1f} s")
        trainer = STFPMTrainer(model, run.device, opts, run.info, validation=run.held_out_batches,
                               step_counter=lambda: run.step)
        return model, model.teacher, desc, trainer

    def finish(self, run: RunContext) -> None:
        """STFPM has no students' BatchNorm option (its selection happens in the trainer)."""

    def loss_keys(self, model: nn.Module) -> tuple[str, ...]:
        return stfpm_loss_keys(model)

    def teacher_state(self, teacher: nn.Module, desc: dict[str, Any]) -> dict[str, Any]:
        return dict(desc)  # the teacher's weights are part of the model's state

    def postfix(self, terms: dict[str, float]) -> str:
        parts = " ".join(f"{k[5:]}:{v:.3f}" for k, v in terms.items() if k.startswith("layer"))
        return f"loss {terms['total']:.3f} (layers {parts})"

    def optimizers(self, opts: TrainOptions) -> dict[str, Any]:
        return {"student": {"type": "SGD", "lr": SGD_LR, "momentum": SGD_MOMENTUM, "weight_decay": SGD_WEIGHT_DECAY}}


FAMILIES = {"stlm": STLMFamily(), "stfpm": STFPMFamily()}


def family_of(cfg: Any) -> STLMFamily:
    return FAMILIES[getattr(cfg, "family", "stlm")]
