"""STLM training: options (validated once), distributed set-up, run state, the step, the run.

``train(TrainOptions(...))`` is what ``stlm-train`` calls; tests and benchmarks call it directly.
"""
from .distributed import DistInfo, resolve_device, setup_distributed
from .loop import TrainGraph, Trainer, build_optimizers, teacher_features
from .options import DEFAULT_STEPS, IDENTITY_FIELDS, TrainError, TrainOptions, merge_resume_options
from .run import TrainResult, held_out_thresholds, train
from .refinish import POST_TRAINING_OPTIONS, refinish
from .teachers import build_teacher
from .sampling import EpochBatchSampler, holdout_split, resolve_augmentation
from .state import HISTORY_KEYS, LOSS_KEYS, load_run_state, summarize_history

__all__ = ["DEFAULT_STEPS", "HISTORY_KEYS", "IDENTITY_FIELDS", "LOSS_KEYS", "POST_TRAINING_OPTIONS", "DistInfo",
           "EpochBatchSampler", "TrainError", "TrainGraph", "TrainOptions", "TrainResult", "Trainer",
           "build_optimizers", "build_teacher", "held_out_thresholds", "holdout_split", "load_run_state",
           "merge_resume_options", "refinish", "resolve_augmentation", "resolve_device", "setup_distributed",
           "summarize_history", "teacher_features", "train"]
