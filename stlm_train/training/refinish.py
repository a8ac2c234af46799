"""Finish a trained run again under options that act only after its last step (a paired ablation).

``student_bn`` "train" vs "recalibrate" (the students' statistics re-estimated on clean images once training
is over) and ``threshold_target`` change nothing in the steps, so their effect is measured best on the same
weights: resume the run's ``last.ckpt`` (saved before the run's own finish) into a new folder with no step
left, and run the finish there, thresholds, checkpoint and evaluation included. Two trainings of the same
seed differ in their step count under a time budget and across machines; this way the row differs only in
the change.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .options import TrainError, TrainOptions, merge_resume_options
from .run import Log, TrainResult, train_resumed
from .state import load_run_state

#: option -> the values a finished run can be re-finished with (``frozen`` BatchNorm changes the steps)
POST_TRAINING_OPTIONS: dict[str, tuple[Any, ...] | None] = {"student_bn": ("train", "recalibrate"),
                                                            "threshold_target": None, "fa_output": None}


def refinish(run_dir: str | os.PathLike, out: str | os.PathLike, changes: dict[str, Any], evaluate: bool = True,
             log: Log | None = None) -> TrainResult:
    """``run_dir``'s weights finished into ``out`` with ``changes`` (keys of :data:`POST_TRAINING_OPTIONS`)."""
    src, dst = Path(run_dir), Path(out)
    if dst.resolve() == src.resolve():
        raise TrainError(f"refinish: {dst} is the run itself; give another folder")
    state = load_run_state(src)
    # the run's own step count as the stop rule: the loop has nothing left to do (it writes out/last.ckpt itself)
    opts = TrainOptions(data=str(state["options"].get("data", "")), out=str(dst), resume=True,
                        steps=int(state["step"]), progress=False, save_every=0, evaluate=evaluate)
    run = merge_resume_options(opts, state["options"], set())  # older runs: their options' values then
    for key, value in changes.items():
        if key not in POST_TRAINING_OPTIONS:
            raise TrainError(f"refinish: {key} changes the training steps; only "
                             f"{', '.join(POST_TRAINING_OPTIONS)} act after the last step")
        allowed = POST_TRAINING_OPTIONS[key]
        if allowed is not None and (value not in allowed or getattr(run, key) not in allowed):
            raise TrainError(f"refinish: {key} {getattr(run, key)!r} -> {value!r}: only "
                             f"{' and '.join(map(repr, allowed))} train the same steps")
    return train_resumed(replace(run, **changes), state, log)
