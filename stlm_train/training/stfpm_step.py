"""STFPM's training step and model selection (official gdwang08/STFPM ``main.py``).

* step: teacher pyramid under ``no_grad`` (teacher always in eval mode), student pyramid with
  gradients, ``stfpm_loss``; SGD lr 0.4, momentum 0.9, weight decay 1e-4 on the student only.
* selection: after every epoch the held-out good images are scored (mean of the layer1-resolution
  product map, the official validation error) and the student with the lowest error is kept; the
  run ends with that student (official ``best.pth.tar``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..modeling.stfpm import STFPM, stfpm_loss, stfpm_map
from .distributed import DistInfo
from .loop import StepRunner
from .options import TrainOptions

#: The official optimiser (student only).
SGD_LR, SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.4, 0.9, 1e-4


class STFPMTerms:
    """Per-stage losses and their sum (``total``), each a 0-d tensor."""

    def __init__(self, per_layer: dict[str, torch.Tensor]) -> None:
        self.per_layer = per_layer
        parts = list(per_layer.values())
        self.total = parts[0]
        for p in parts[1:]:
            self.total = self.total + p

    def as_floats(self) -> dict[str, float]:
        return {**{k: float(v.detach()) for k, v in self.per_layer.items()}, "total": float(self.total.detach())}


def loss_keys(model: STFPM) -> tuple[str, ...]:
    return (*(f"layer{i}" for i in model.cfg.layers), "total")


class StudentGraph(nn.Module):
    """The student trunk as one module (what DistributedDataParallel wraps)."""

    def __init__(self, model: STFPM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.student(x)


class Selection(NamedTuple):
    err: float
    step: int
    state_dict: dict[str, torch.Tensor]


class STFPMTrainer(StepRunner):
    """Official optimiser and per-epoch selection; ``validation`` yields normalised held-out batches."""

    def __init__(self, model: STFPM, device: torch.device, opts: TrainOptions, info: DistInfo = DistInfo(),
                 validation: Callable[[], Iterator[torch.Tensor]] | None = None,
                 step_counter: Callable[[], int] = lambda: 0) -> None:
        super().__init__(model, StudentGraph(model), device, opts, info)
        self.opt_student = torch.optim.SGD(model.student.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM,
                                           weight_decay=SGD_WEIGHT_DECAY)
        self.optimizers = {"opt_student": self.opt_student}
        self.validation, self.step_counter = validation, step_counter
        self.best: Selection | None = None
        self.history: list[tuple[int, float]] = []  # (step, validation error) per epoch

    def step(self, clean: torch.Tensor, pseudo: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> STFPMTerms:
        """clean uint8 (B, S, S, 3) -> per-stage loss terms (after the update); pseudo/mask are unused."""
        x = self.model.normalize(clean.to(self.device, non_blocking=True))
        self.graph.train()
        with self._autocast():
            with torch.no_grad():
                t = self.model.teacher(x)
            s = self.graph(x)
        names = [f"layer{i}" for i in self.model.cfg.layers]
        # the loss in fp32 whatever ran under autocast: the ResNet features come out in bf16 there
        terms = STFPMTerms({n: stfpm_loss([ti.float()], [si.float()]) for n, ti, si in zip(names, t, s)})
        self.update(terms.total, terms)
        return terms

    @torch.no_grad()
    def validation_error(self) -> float:
        """Official validation error: mean of the layer1-resolution product map over the held-out images."""
        assert self.validation is not None
        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        try:
            for x in self.validation():
                t, s = self.model.features(x)
                m = stfpm_map(t, s, self.model.cfg.map_size)
                total += float(m.double().sum() / m[0].numel())
                n += x.shape[0]
        finally:
            self.model.train(was)
        return total / max(n, 1)

    def end_of_epoch(self) -> None:
        if self.validation is None:
            return
        self.sync_buffers()  # every rank validates the same weights and makes the same choice
        step = self.step_counter()
        err = self.validation_error()
        self.history.append((step, err))
        if self.best is None or err < self.best.err:
            self.best = Selection(err, step, copy.deepcopy(self.model.student.state_dict()))

    def finalize(self) -> dict[str, Any] | None:
        """Validate the last weights too (a time budget ends mid-epoch), then load the best student."""
        if self.validation is None:
            return None
        if not self.history or self.history[-1][0] != self.step_counter():
            self.end_of_epoch()
        assert self.best is not None
        self.model.student.load_state_dict(self.best.state_dict)
        return {"rule": "lowest held-out validation error (official: mean product map over the 20 % held out)",
                "selected_step": self.best.step, "validation_error": self.best.err,
                "validations": [[s, round(e, 8)] for s, e in self.history]}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["selection"] = {"history": [list(h) for h in self.history],
                           "best": None if self.best is None else self.best._asdict()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        sel = sd.get("selection") or {}
        self.history = [(int(s), float(e)) for s, e in sel.get("history", [])]
        best = sel.get("best")
        self.best = None if best is None else Selection(float(best["err"]), int(best["step"]), best["state_dict"])
