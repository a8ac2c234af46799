"""One training step, built for steps per second: the plumbing every family shares (:class:`StepRunner`)
and STLM's step (paper section 3, official ``trainSTLM.py``; STFPM's: :mod:`.stfpm_step`).

1. teacher features T(I_a) and T(N) from ONE batched teacher call under ``no_grad`` (N and I_a stacked
   on the batch axis; samples with no pasted anomaly, where I_a == N, are sent once);
2. both students on I_a through ``STLM.student_features`` (one batched decoder call for both streams);
3. FA head on ``fa_input`` (default ``product+tlm``: the official product plus the TLM prior path,
   :class:`stlm_train.modeling.fa_head.FAHead`); with ``fa_grad="students"`` (default, the official code)
   its loss also trains the students, with ``fa_grad="detached"`` only the FA head, with a number in
   (0, 1) the students get that fraction of its gradient (through the product and the prior path alike).
   Screened at 400 steps (sample 3 seeds, generated set 2):
   detached lifts the FA map on the bundled real sample (pixel AUROC 0.62 -> 0.73, AUPRO 0.42 -> 0.52)
   but breaks its image score on the generated set (image AUROC 0.33 and 0.17 on two seeds), and a factor
   of 0.3 does the same (sample: pixel 0.73, image 0.93; generated: image 0.19 and 0.31) and, on tire
   tiled at 512 for 20 minutes, lowers FA pixel AUROC to 0.70 / 0.77 from 0.90 / 0.86, so they are
   options, not the default;
4. ``L_p + L_de + L_focal + L_l1`` (``stlm_train.losses``), or without ``L_l1`` when ``fa_loss="focal"``, or
   plus a soft Dice term on the FA output when ``fa_loss="focal+l1+dice"``;
   with ``fa_target="changed"`` the FA terms count only the pixels where the pseudo mask and the teacher's
   change agree (screened in README "Localisation": FA AUPRO up on tire, the TLM map down: an option);
   Adam on students + shared decoder, SGD on the FA head (residual blocks lr 0.1, head and prior lr 0.01).

The students' BatchNorm (``student_bn``): the official code trains them in train mode, so every step
normalises with the statistics of two pseudo-anomalous images and the running statistics that
inference uses are an average of the last steps' pseudo-anomalous pairs, not of clean images; at
256 px the mostly zero-padded right/bottom attention windows can turn that mismatch into a fixed hot
band in the map (reproduced on the tire category: right column + bottom row 3.2x the rest, FA pixel
AUROC 0.31). ``recalibrate`` (default) trains as the official code and then re-estimates the
students' statistics on clean training images (same weights: edge ratio 3.2 -> 0.75, FA pixel AUROC
0.31 -> 0.81, TLM 0.23 -> 0.87). ``frozen`` keeps those layers in eval mode during training (the
function trained is the function deployed) with statistics estimated on clean images before the
first step and every ``BN_REFRESH_STEPS`` steps; on the tire category its TLM maps were worse
(pixel AUROC 0.62-0.74 vs 0.85-0.87), so it is an option. ``train`` is the official behaviour. The FA
head's BatchNorm always trains as usual: its statistics describe the products it was trained on.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..losses import LossTerms, stlm_loss
from ..modeling.stlm import STLM, Features
from ..modeling.teacher import calibrate_batchnorm
from .distributed import DistInfo, all_ranks_all
from .options import TrainError, TrainOptions, fa_grad_scale

#: Steps between re-estimations of the frozen students' BatchNorm statistics on clean images.
BN_REFRESH_STEPS = 100
#: Consecutive steps GradScaler may skip for a non-finite fp16 loss before the run is stopped.
MAX_SKIPPED_STEPS = 20


class NonFiniteLoss(TrainError):
    """The loss is NaN/inf on at least one rank; raised on every rank before any weight changes."""


class TrainGraph(nn.Module):
    """Students + shared decoder + FA head as one module (what DistributedDataParallel wraps).

    ``fa_grad_scale``: the factor on the FA head's loss gradient into the students' products (1: the
    official code; 0: the FA head reads them without training them); the forward values are unchanged.
    """

    def __init__(self, model: STLM, fa_grad_scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.fa_grad_scale = float(fa_grad_scale)

    def forward(self, x: torch.Tensor) -> tuple[Features, Features, torch.Tensor]:  # x: (B, 3, S, S)
        plain, denoising = self.model.student_features(x)
        products, prior = self.model.fa_head_inputs(plain, denoising)
        prior = self._scaled(prior) if prior is not None else None
        return plain, denoising, self.model.fa_head.logits(self._scaled(products), prior)  # logits (B, 1, h, w)

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        """t + a (t - t) in value, a dt in gradient (a = fa_grad_scale)."""
        if self.fa_grad_scale == 1.0:
            return t
        fixed = t.detach()
        return fixed + self.fa_grad_scale * (t - fixed) if self.fa_grad_scale else fixed


@torch.no_grad()
def teacher_features(teacher: nn.Module, x_clean: torch.Tensor, x_pseudo: torch.Tensor,
                     same: torch.Tensor) -> tuple[Features, Features]:
    """(T(I_a), T(N)) from one teacher call on [N; I_a where it differs from N]."""
    b = x_clean.shape[0]
    diff = (~same).nonzero().flatten()
    t1, t2 = teacher(torch.cat([x_clean, x_pseudo[diff]], dim=0))
    clean = (t1[:b], t2[:b])
    pseudo = []
    for t in (t1, t2):
        p = t[:b].clone()
        p[diff] = t[b:]
        pseudo.append(p)
    return (pseudo[0], pseudo[1]), clean


def student_batchnorms(model: STLM) -> list[nn.Module]:
    """The BatchNorm layers of both student encoders (the decoder has none, the FA head is not a student)."""
    return [m for enc in (model.plain, model.denoising) for m in enc.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_students(model: STLM, batches: Callable[[], Iterable[torch.Tensor]]) -> int:
    """Both students' BatchNorm statistics as a plain average over clean images; returns the image count."""
    n = 0
    for encoder in (model.plain, model.denoising):
        n = calibrate_batchnorm(encoder, batches())
    return n


def set_train_mode(model: STLM, student_bn: str) -> None:
    """The mode a training step runs ``model`` in: train, except the students' BatchNorm when frozen."""
    model.train()
    if student_bn == "frozen":
        for bn in student_batchnorms(model):
            bn.eval()


def build_optimizers(model: STLM, opts: TrainOptions) -> tuple[torch.optim.Adam, torch.optim.SGD]:
    """The official optimisers: Adam for students + shared decoder, SGD with two groups for the FA head."""
    student_params = [*model.plain.parameters(), *model.denoising.parameters(), *model.decoder.parameters()]
    opt_students = torch.optim.Adam(student_params, lr=opts.lr_students, betas=(0.5, 0.999))
    opt_fa = torch.optim.SGD(
        [{"params": model.fa_head.res.parameters(), "lr": opts.lr_fa_res},
         {"params": [*model.fa_head.head.parameters(), *(model.fa_head.prior.parameters()
                                                          if model.fa_head.prior is not None else ())],
          "lr": opts.lr_fa_head}],
        lr=opts.lr_fa_head, momentum=0.9, weight_decay=1e-4)
    return opt_students, opt_fa


class StepRunner:
    """What every family's trainer shares: the DDP wrapper, AMP/GradScaler, the non-finite policy, the
    update of its optimisers, their state and the BatchNorm broadcast. A family's ``step`` computes its
    loss terms (``total`` plus named parts) and hands them to :meth:`update`."""

    def __init__(self, model: nn.Module, graph: nn.Module, device: torch.device, opts: TrainOptions,
                 info: DistInfo = DistInfo()) -> None:
        self.model, self.device, self.info = model, device, info
        self.graph: nn.Module = graph
        if info.world_size > 1:
            # depthwise-conv weights (C, 1, k, k) have ambiguous strides: harmless DDP layout warning
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ids = [device.index] if device.type == "cuda" else None
            self.graph = nn.parallel.DistributedDataParallel(graph, device_ids=ids)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.amp = bool(opts.amp)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and device.type == "cuda")
        self.skipped_in_a_row = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def update(self, total: torch.Tensor, terms: Any) -> None:
        """Backward ``total`` and step every optimiser, after every rank agreed the loss is finite.

        Without a GradScaler a NaN/inf loss stops the run with the weights untouched; with one (CUDA
        AMP) it is an fp16 overflow the scaler skips, up to MAX_SKIPPED_STEPS in a row.
        """
        finite = all_ranks_all(bool(torch.isfinite(total.detach())), self.info, self.device)
        if not finite and not self.scaler.is_enabled():
            raise NonFiniteLoss(f"loss is {terms.as_floats()}")
        self.skipped_in_a_row = 0 if finite else self.skipped_in_a_row + 1
        if self.skipped_in_a_row > MAX_SKIPPED_STEPS:
            raise NonFiniteLoss(f"loss non-finite for {self.skipped_in_a_row} steps in a row under AMP")
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()

    def end_of_epoch(self) -> None:
        """Called by the run after the last step of every epoch (model selection hooks in here)."""

    def finalize(self) -> dict[str, Any] | None:
        """Called once after the loop; returns a description of what it changed (or None)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**{k: o.state_dict() for k, o in self.optimizers.items()}, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(sd[k])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """BatchNorm running statistics drift per rank between DDP broadcasts: take rank 0's."""
        if self.info.world_size > 1:
            for b in self.model.buffers():
                dist.broadcast(b, 0)


class Trainer(StepRunner):
    """STLM: owns the two official optimisers and performs steps; ``model`` is updated in place."""

    def __init__(self, model: STLM, teacher: nn.Module, device: torch.device, opts: TrainOptions,
                 info: DistInfo = DistInfo(), calibration: Callable[[], Iterable[torch.Tensor]] | None = None,
                 step_counter: Callable[[], int] | None = None) -> None:
        super().__init__(model, TrainGraph(model, fa_grad_scale(opts.fa_grad)), device, opts, info)
        self.teacher = teacher
        self.student_bn = opts.student_bn
        fa_terms = opts.fa_loss.split("+")  # one of FA_LOSSES: focal, then optional l1 and dice
        self.fa_l1, self.fa_dice = "l1" in fa_terms, "dice" in fa_terms
        self.fa_target = opts.fa_target
        self.calibration, self.step_counter = calibration, step_counter
        self.opt_students, self.opt_fa = build_optimizers(model, opts)
        self.optimizers = {"opt_students": self.opt_students, "opt_fa": self.opt_fa}

    def step(self, clean: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        """clean/pseudo uint8 (B, S, S, 3), mask float (B, S, S) -> loss terms (after the update)."""
        clean, pseudo = clean.to(self.device, non_blocking=True), pseudo.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        same = (clean == pseudo).flatten(1).all(dim=1)  # no anomaly pasted: T(I_a) == T(N)
        norm = self.model.normalize
        x_clean, x_pseudo = norm(clean), norm(pseudo)
        self.graph.train()
        set_train_mode(self.model, self.student_bn)
        with self._autocast():
            t_pseudo, t_clean = teacher_features(self.teacher, x_clean, x_pseudo, same)
            plain, denoising, logits = self.graph(x_pseudo)
        terms = stlm_loss(plain, denoising, t_pseudo, t_clean, torch.sigmoid(logits.float()), mask,
                           l1=self.fa_l1, fa_target=self.fa_target, dice=self.fa_dice)
        self.update(terms.total, terms)
        done = self.step_counter() + 1 if self.step_counter is not None else 0
        if self.student_bn == "frozen" and self.calibration is not None and done % BN_REFRESH_STEPS == 0:
            calibrate_students(self.model, self.calibration)
        return terms
