"""The frozen teacher of an STLM run: the built-in weightless one (own seed, BatchNorm calibrated on clean
training images, or restored when resuming) or a SAM / MobileSAM file. STFPM's teacher is part of its model
(``family.STFPMFamily.setup``)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_converted, load_teacher
from ..config import STLMConfig
from ..modeling.stlm import STLM
from ..modeling.teacher import Teacher, build_builtin_teacher, calibrate_batchnorm
from ..modeling.tiny_vit import TinyViT
from .options import TrainError, TrainOptions

Log = Callable[[str], None]


def build_teacher(opts: TrainOptions, cfg: STLMConfig, calib: Callable[[], Iterator[torch.Tensor]],
                  device: torch.device, state: dict[str, Any] | None = None,
                  log: Log = print) -> tuple[Teacher, dict[str, Any]]:
    """The frozen teacher (eval mode, on ``device``) and a description for the checkpoint.

    Built-in: ``build_builtin_teacher`` from the teacher's own seed, then its BatchNorm statistics are
    calibrated on clean training images (or restored from ``state`` when resuming). A path: SAM /
    MobileSAM file.
    """
    t0 = time.perf_counter()
    if opts.builtin_teacher:
        seed = opts.builtin_teacher_seed
        teacher = build_builtin_teacher(cfg, seed, opts.teacher_recipe)
        base = {"kind": "builtin", "seed": seed, "recipe": opts.teacher_recipe}
        if state is not None and "state_dict" in state:
            teacher.load_state_dict(state["state_dict"])
            teacher.to(device)
            desc = {**base, "calibration_images": state.get("calibration_images")}
            log(f"teacher: built-in (seed {seed}), restored from last.ckpt")
        else:
            teacher.to(device)
            n = calibrate_batchnorm(teacher, calib())
            dt = time.perf_counter() - t0
            desc = {**base, "calibration_images": n, "calibration_seconds": round(dt, 2)}
            log(f"teacher: built-in (seed {seed}, recipe {opts.teacher_recipe}), BatchNorm calibrated on {n} "
                f"clean training images in {dt:.1f} s")
    else:  # a missing file was refused by TrainOptions.validate; read_file names any other problem
        teacher = load_teacher(opts.teacher, cfg).to(device)
        desc = {"kind": teacher.kind, "path": str(Path(opts.teacher).resolve())}
        log(f"teacher: {teacher.kind} from {opts.teacher} ({time.perf_counter() - t0:.1f} s)")
    dim = teacher.decoder.no_mask_embed.weight.shape[1]
    if dim != cfg.decoder.dim:
        raise TrainError(f"teacher features have {dim} channels but config '{cfg.name}' students have "
                         f"{cfg.decoder.dim}; use --config paper with a SAM/MobileSAM teacher")
    return teacher.eval().requires_grad_(False), desc


@torch.no_grad()
def init_students_from_teacher(model: STLM, teacher: Teacher) -> STLM:
    """Both students := the teacher's encoder, the shared decoder := its decoder (``--student-init teacher``).

    Only a TinyViT teacher of the students' own shape (the built-in one, MobileSAM) has weights to copy; a SAM
    ViT teacher is refused with one line. Buffers (BatchNorm statistics) are copied too."""
    enc = teacher.encoder
    if not isinstance(enc, TinyViT):
        raise TrainError(f"--student-init teacher: the {teacher.kind} teacher's encoder is {type(enc).__name__}, not "
                         "the students' TinyViT (use --teacher builtin or a mobile_sam.pt)")
    for name, dst, src in (("plain", model.plain, enc), ("denoising", model.denoising, enc),
                           ("decoder", model.decoder, teacher.decoder)):
        try:  # strict: every key and shape, one line naming the first misfits
            load_converted(dst, src.state_dict(), None, f"--student-init teacher: the teacher's {name} weights")
        except CheckpointError as e:
            raise TrainError(f"{e} (the teacher must have the students' config)") from None
    return model
