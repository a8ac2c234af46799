"""One-stage STLM training (paper section 3, official ``trainSTLM.py``), built for steps per second.

One step on a batch of (clean N, pseudo-anomalous I_a, mask M):

1. teacher features T(I_a) and T(N) from ONE batched teacher call under ``no_grad`` (N and I_a stacked
   on the batch axis; samples with no pasted anomaly, where I_a == N, are sent once);
2. both students on I_a through ``STLM.student_features`` (one batched decoder call for both streams);
3. FA head on ``fa_input`` (gradients flow into the students, as in the official code);
4. ``L_p + L_de + L_focal + L_l1`` (``stlm_train.losses``); Adam on students + shared decoder,
   SGD on the FA head (residual blocks lr 0.1, head lr 0.01).

Everything random is seeded: the model init (``seed``), the built-in teacher (``seed``), the data
order (``DistributedSampler`` shuffling with ``seed`` + epoch) and every synthesised sample (a numpy
generator from (seed, epoch, index)). The same seed and step count give identical weights, and a
run resumed from ``last.ckpt`` ends where an uninterrupted one would.

Held-out thresholds: a deterministic part of train/good (``holdout``, at least one image) is never
trained on; the image threshold is a high quantile of their FA scores and the pixel threshold a high
quantile of their FA map pixels.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .anomalies import sample_rng
from .checkpoint import CheckpointError, init_students_from_mobile_sam, load_teacher, read_file, save_checkpoint
from .config import STLMConfig, get_config
from .evaluate import BUILTIN_DATA, evaluate_model, format_table, predict_dataset
from .losses import LossTerms, stlm_loss
from .modeling.stlm import STLM, Features, fa_input
from .modeling.teacher import (DEFAULT_TEACHER_RECIPE, TEACHER_SEED_OFFSET, Teacher, build_builtin_teacher,
                               calibrate_batchnorm)
from .anomalies import DEFAULT_TEXTURE_BANK
from stlm_deploy.preprocess import DEFAULT_RESIZE

def _known_categories() -> set[str]:
    from .anomalies import NO_ROTATION_CATEGORIES, ROTATION_CATEGORIES, SLIGHT_ROTATION_CATEGORIES

    return {*NO_ROTATION_CATEGORIES, *SLIGHT_ROTATION_CATEGORIES, *ROTATION_CATEGORIES}


_KNOWN_CATEGORIES = _known_categories()
STATE_FORMAT = "stlm-train-state"
STATE_VERSION = 1
DEFAULT_STEPS = 100  # when no stopping flag is given: a quick demo run (the paper: 200 epochs)
LOSS_KEYS = ("plain", "denoising", "focal", "l1", "total")
HISTORY_KEYS = ("step", *LOSS_KEYS, "seconds")  # one row per step; seconds = training time so far
# Options that define a run: a resumed run takes them from last.ckpt, and they must not change.
IDENTITY_FIELDS = ("data", "format", "category", "config", "img_size", "seed", "batch_size", "teacher",
                   "anomaly_source", "augmentation", "init_mobile_sam", "holdout", "calib_images", "image_quantile",
                   "pixel_quantile", "teacher_seed", "teacher_recipe", "texture_bank", "resize")


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
    teacher: str = "builtin"  # "builtin" or a sam_vit_*.pth / mobile_sam.pt path
    anomaly_source: str | None = None  # texture folder (DTD); None: procedural textures
    augmentation: str = "auto"  # none | slight | rotation | auto (from the category / folder name)
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 2
    num_workers: int = 0
    amp: bool = False
    init_mobile_sam: str | None = None
    save_every: int = 100  # steps between last.ckpt saves (0: only at the end)
    resume: bool = False
    holdout: float = 0.2  # fraction of train/good kept for thresholds (at least 1 image)
    calib_images: int = 32  # clean training images used to calibrate the built-in teacher's BN
    image_quantile: float = 0.995
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

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path | None
    metrics_path: Path | None
    steps: int
    epochs: float
    seconds: float
    losses: dict[str, float]
    thresholds: dict[str, Any] | None
    metrics: dict[str, Any] | None
    model: STLM = field(repr=False)


# ----------------------------------------------------------------------------------------------
# distributed helpers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=2))
        here = True
    if device_type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, here)


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if info is not None and info.world_size > 1:
            return torch.device("cuda", info.local_rank)
        return torch.device(s)
    raise TrainError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")


# ----------------------------------------------------------------------------------------------
# data


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): ``max(1, round(n * fraction))`` images spread evenly."""
    if not 0.0 < fraction < 1.0:
        raise TrainError(f"holdout fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise TrainError(f"need at least 2 training images (1 is held out for thresholds), found {n}")
    k = min(n - 1, max(1, int(round(n * fraction))))
    held = sorted({int((i + 0.5) * n / k) for i in range(k)})
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


class TrainTriples(Dataset):
    """(epoch, i) -> (clean uint8 HxWx3, pseudo uint8 HxWx3, mask float32 HxW) as tensors.

    Each sample draws from its own generator seeded with (seed, epoch, i), so the result does not
    depend on workers, order or resumption.
    """

    def __init__(self, base: Any, indices: Sequence[int], synthesizer: Callable, seed: int) -> None:
        self.base, self.indices, self.synth, self.seed = base, list(indices), synthesizer, int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = key
        image = self.base[self.indices[i]].image
        clean, pseudo, mask = self.synth(image, sample_rng(self.seed, epoch, i))
        return (torch.from_numpy(np.ascontiguousarray(clean)), torch.from_numpy(np.ascontiguousarray(pseudo)),
                torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)))


class EpochBatchSampler(Sampler):
    """Endless batches of (epoch, index) keys, starting at global step ``start_step``.

    Each epoch shards a ``DistributedSampler`` permutation (seed + epoch) over the ranks; a rank
    makes ``steps_per_epoch`` full batches of its shard (the rest is dropped, as with
    ``drop_last``; a shard smaller than one batch is repeated cyclically to fill it).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=False)
        self.steps_per_epoch = max(1, len(self._sampler) // batch_size)
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._sampler.set_epoch(epoch)
            self._cache = (epoch, list(self._sampler))
        return self._cache[1]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return [(epoch, order[j % len(order)]) for j in range(k * self.batch_size, (k + 1) * self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # DataLoader wants one; the stream is endless
        return 2**62


def resolve_augmentation(mode: str, category: str) -> str:
    """``auto``: the official per-category mode of ``category``, or of a known MVTec category named
    in it as a ``_``/``-``-separated part (``mvtec_bottle_xs`` -> bottle -> rotation); else ``none``."""
    from .anomalies import AUGMENTATIONS, augmentation_for_category

    if mode != "auto":
        if mode not in AUGMENTATIONS:
            raise TrainError(f"--augmentation must be auto or one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
        return mode
    tokens = [t for t in re.split(r"[-_.\s]+", category.lower()) if t]
    candidates = [category.lower(), *("_".join(tokens[i:i + 2]) for i in range(len(tokens) - 1)), *tokens]
    for c in candidates:
        if augmentation_for_category(c) != "none" or c in _KNOWN_CATEGORIES:
            return augmentation_for_category(c)
    return "none"


def resolve_data(opts: TrainOptions, cfg: STLMConfig, info: DistInfo) -> tuple[Path, str]:
    """The data root and format; ``builtin`` generates the procedural set into RUN_DIR/data."""
    if opts.data.lower() in BUILTIN_DATA:
        from .data import make_generated_dataset

        root = Path(opts.out) / "data"
        if info.main:
            make_generated_dataset(root, size=cfg.img_size, seed=0)
        if info.world_size > 1:
            dist.barrier()
        return root, "mvtec"
    return Path(opts.data), opts.format


# ----------------------------------------------------------------------------------------------
# teacher


def teacher_spec(opts: TrainOptions) -> str:
    return "builtin" if str(opts.teacher).lower() == "builtin" else str(opts.teacher)


def teacher_seed(opts: TrainOptions) -> int:
    """The built-in teacher's own seed: never the stream that initialises the students."""
    return int(opts.teacher_seed) if opts.teacher_seed is not None else int(opts.seed) + TEACHER_SEED_OFFSET


def build_teacher(opts: TrainOptions, cfg: STLMConfig, calib: Callable[[], Iterator[torch.Tensor]],
                  device: torch.device, state: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> tuple[Teacher, dict[str, Any]]:
    """The frozen teacher (eval mode, on ``device``) and a description for the checkpoint.

    Built-in: ``build_builtin_teacher(cfg, seed)``, then its BatchNorm statistics are calibrated on
    clean training images (or restored from ``state`` when resuming). A path: SAM / MobileSAM file.
    """
    spec = teacher_spec(opts)
    t0 = time.perf_counter()
    if spec == "builtin":
        seed = teacher_seed(opts)
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
    else:
        if not Path(spec).is_file():
            raise CheckpointError(f"{spec}: no such teacher file (use --teacher builtin or a sam_vit_*.pth / "
                                  "mobile_sam.pt path)")
        teacher = load_teacher(spec, cfg).to(device)
        desc = {"kind": teacher.kind, "path": str(Path(spec).resolve())}
        log(f"teacher: {teacher.kind} from {spec} ({time.perf_counter() - t0:.1f} s)")
    dim = teacher.decoder.no_mask_embed.weight.shape[1]
    if dim != cfg.decoder.dim:
        raise TrainError(f"teacher features have {dim} channels but config '{cfg.name}' students have "
                         f"{cfg.decoder.dim}; use --config paper with a SAM/MobileSAM teacher")
    return teacher.eval().requires_grad_(False), desc


# ----------------------------------------------------------------------------------------------
# the training step


class TrainGraph(nn.Module):
    """Students + shared decoder + FA head as one module (what DistributedDataParallel wraps)."""

    def __init__(self, model: STLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[Features, Features, torch.Tensor]:  # x: (B, 3, S, S)
        plain, denoising = self.model.student_features(x)
        return plain, denoising, self.model.fa_head.logits(fa_input(plain, denoising))  # logits (B, 1, h, w)


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


def build_optimizers(model: STLM, opts: TrainOptions) -> tuple[torch.optim.Adam, torch.optim.SGD]:
    """The official optimisers: Adam for students + shared decoder, SGD with two groups for the FA head."""
    student_params = [*model.plain.parameters(), *model.denoising.parameters(), *model.decoder.parameters()]
    opt_students = torch.optim.Adam(student_params, lr=opts.lr_students, betas=(0.5, 0.999))
    opt_fa = torch.optim.SGD(
        [{"params": model.fa_head.res.parameters(), "lr": opts.lr_fa_res},
         {"params": model.fa_head.head.parameters(), "lr": opts.lr_fa_head}],
        lr=opts.lr_fa_head, momentum=0.9, weight_decay=1e-4)
    return opt_students, opt_fa


class Trainer:
    """Owns the optimisers and performs steps; ``model`` is updated in place."""

    def __init__(self, model: STLM, teacher: nn.Module, device: torch.device, opts: TrainOptions,
                 info: DistInfo = DistInfo()) -> None:
        self.model, self.teacher, self.device, self.info = model, teacher, device, info
        self.graph: nn.Module = TrainGraph(model)
        if info.world_size > 1:
            # depthwise-conv weights (C, 1, k, k) have ambiguous strides: harmless DDP layout warning
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ids = [device.index] if device.type == "cuda" else None
            self.graph = nn.parallel.DistributedDataParallel(self.graph, device_ids=ids)
        self.opt_students, self.opt_fa = build_optimizers(model, opts)
        self.amp = bool(opts.amp)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and device.type == "cuda")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def step(self, clean: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        """clean/pseudo uint8 (B, S, S, 3), mask float (B, S, S) -> loss terms (after the update)."""
        clean, pseudo = clean.to(self.device, non_blocking=True), pseudo.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        same = (clean == pseudo).flatten(1).all(dim=1)  # no anomaly pasted: T(I_a) == T(N)
        norm = self.model.normalize
        x_clean, x_pseudo = norm(clean), norm(pseudo)
        self.graph.train()
        with self._autocast():
            t_pseudo, t_clean = teacher_features(self.teacher, x_clean, x_pseudo, same)
            plain, denoising, logits = self.graph(x_pseudo)
        terms = stlm_loss(plain, denoising, t_pseudo, t_clean, torch.sigmoid(logits.float()), mask)
        self.opt_students.zero_grad(set_to_none=True)
        self.opt_fa.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        self.scaler.step(self.opt_students)
        self.scaler.step(self.opt_fa)
        self.scaler.update()
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"opt_students": self.opt_students.state_dict(), "opt_fa": self.opt_fa.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt_students.load_state_dict(sd["opt_students"])
        self.opt_fa.load_state_dict(sd["opt_fa"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """BatchNorm running statistics drift per rank between DDP broadcasts: take rank 0's."""
        if self.info.world_size > 1:
            for b in self.model.buffers():
                dist.broadcast(b, 0)


# ----------------------------------------------------------------------------------------------
# run state (last.ckpt)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_tuples(st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_run_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "last.ckpt"
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found (nothing to resume; drop --resume to start a new run)")
    st = read_file(path)
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state file (format {STATE_FORMAT!r})")
    if int(st.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {st.get('version')} is newer than supported")
    return st


def merge_resume_options(opts: TrainOptions, stored: dict[str, Any], explicit: set[str]) -> TrainOptions:
    """Identity options come from the run; an explicitly given different value is an error."""
    for k in IDENTITY_FIELDS:
        if k in explicit and k in stored and getattr(opts, k) != stored[k]:
            flag = "--" + k.replace("_", "-")
            raise TrainError(f"--resume: {flag} {getattr(opts, k)!r} differs from the run's {stored[k]!r} "
                             "(a resumed run keeps its data, model, seed and teacher)")
    return replace(opts, **{k: stored[k] for k in IDENTITY_FIELDS if k in stored})


# ----------------------------------------------------------------------------------------------
# history


def summarize_history(history: list[list[float]], points: int = 50) -> dict[str, Any]:
    """Rows of HISTORY_KEYS -> {first, last: mean loss terms over the first/last 10 % of the steps
    (at least one), s_per_step: median step time, curve: at most ``points`` rows}."""
    keys = list(HISTORY_KEYS)
    if not history:
        return {"keys": keys, "first": None, "last": None, "s_per_step_median": None, "curve": []}
    h = np.asarray(history, dtype=np.float64)  # (n, 7): step, 5 terms, seconds
    k = max(1, len(h) // 10)
    terms = slice(1, 1 + len(LOSS_KEYS))

    def mean(rows: np.ndarray) -> dict[str, float]:
        return {key: round(float(v), 6) for key, v in zip(LOSS_KEYS, rows[:, terms].mean(axis=0))}
    dts = np.diff(np.r_[0.0, h[:, -1]])
    stride = max(1, math.ceil(len(h) / points))
    curve = [[int(r[0]), *(round(float(v), 5) for v in r[1:-1]), round(float(r[-1]), 2)] for r in h[::stride]]
    return {"keys": keys, "first": mean(h[:k]), "last": mean(h[-k:]), "steps_averaged": k,
            "s_per_step_median": round(float(np.median(dts)), 4), "curve": curve}


# ----------------------------------------------------------------------------------------------
# the run


def _stop_rule(opts: TrainOptions) -> tuple[str, float]:
    given = [(n, v) for n, v in (("epochs", opts.epochs), ("steps", opts.steps), ("time_budget", opts.time_budget))
             if v is not None]
    if len(given) > 1:
        raise TrainError("use only one of --epochs, --steps, --time-budget")
    if not given:
        return "steps", float(DEFAULT_STEPS)
    name, v = given[0]
    if not (v > 0) or (name != "time_budget" and int(v) != v):
        kind = "number" if name == "time_budget" else "integer"
        raise TrainError(f"--{name.replace('_', '-')} must be a positive {kind}, got {v}")
    return name, float(v)


def _check_options(opts: TrainOptions) -> None:
    if opts.batch_size < 1:
        raise TrainError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.num_workers < 0:
        raise TrainError(f"--num-workers must be >= 0, got {opts.num_workers}")
    if opts.save_every < 0:
        raise TrainError(f"--save-every must be >= 0, got {opts.save_every}")
    if opts.init_mobile_sam is not None and not Path(opts.init_mobile_sam).is_file():
        raise TrainError(f"--init-mobile-sam: {opts.init_mobile_sam}: no such file")
    if teacher_spec(opts) != "builtin" and not Path(opts.teacher).is_file():
        raise TrainError(f"--teacher: {opts.teacher}: no such file (use builtin or a sam_vit_*.pth / mobile_sam.pt)")
    from .anomalies import TEXTURE_BANKS
    from .modeling.teacher import TEACHER_RECIPES
    from stlm_deploy.preprocess import RESIZE_POLICIES

    for name, value, choices in (("teacher_recipe", opts.teacher_recipe, TEACHER_RECIPES),
                                 ("texture_bank", opts.texture_bank, TEXTURE_BANKS),
                                 ("resize", opts.resize, RESIZE_POLICIES)):
        if value not in choices:
            raise TrainError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    for q in (opts.image_quantile, opts.pixel_quantile):
        if not 0.0 < q <= 1.0:
            raise TrainError(f"threshold quantiles must be in (0, 1], got {q}")


@torch.no_grad()
def held_out_thresholds(model: STLM, dataset: Any, indices: Sequence[int], opts: TrainOptions,
                        device: torch.device) -> dict[str, Any]:
    """Image/pixel thresholds from held-out good images only (FA map; TLM image threshold too)."""
    from .metrics import threshold_from_good

    pred = predict_dataset(model, dataset, batch_size=opts.eval_batch_size, indices=indices, device=device)
    iq, pq = opts.image_quantile, opts.pixel_quantile
    return {
        "image": threshold_from_good(pred.fa_scores, iq),
        "pixel": float(np.quantile(pred.fa_maps, pq)),
        "method": (f"held-out good: quantile {iq} of FA image scores (+1e-6) and quantile {pq} of FA map pixels "
                   f"over {len(indices)} train/good images never trained on"),
        "tlm_image": threshold_from_good(pred.tlm_scores, iq),
        "tlm_pixel": float(np.quantile(pred.tlm_maps, pq)),
        "n_images": len(indices),
        "held_out": [Path(p).name for p in pred.paths],
    }


def train(opts: TrainOptions, explicit: set[str] | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) one training run; rank 0 writes RUN_DIR/{last.ckpt, model.ckpt, metrics.json}.

    ``explicit``: option names the user set on purpose (checked against the run when resuming).
    """
    from .anomalies import PseudoAnomalySynthesizer
    from .data import build_dataset

    out = Path(opts.out)
    state = load_run_state(out) if opts.resume else None
    if state is not None:
        opts = merge_resume_options(opts, state["options"], explicit or set())
    stop_kind, stop_value = _stop_rule(opts)
    _check_options(opts)
    cfg = replace(get_config(opts.config, opts.img_size), resize=opts.resize)
    device_type = "cuda" if str(opts.device).lower().startswith("cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {opts.device}: CUDA is not available on this machine (use --device cpu)")
    info = setup_distributed(device_type)
    try:
        return _train(opts, cfg, state, stop_kind, stop_value, info, log,
                      PseudoAnomalySynthesizer, build_dataset)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(opts, cfg, state, stop_kind, stop_value, info, log, synth_cls, build_dataset) -> TrainResult:
    device = resolve_device(opts.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(opts.out)
    say = (log or (lambda s: print(s, flush=True))) if info.main and opts.progress else (lambda s: None)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)

    # a teacher file is read first: a bad one fails before any data work
    early_teacher = None
    if teacher_spec(opts) != "builtin":
        early_teacher = build_teacher(opts, cfg, lambda: iter(()), device, None, say)

    # data: train split minus a deterministic held-out part
    root, fmt = resolve_data(opts, cfg, info)
    train_ds = build_dataset(root, fmt, opts.category, "train", cfg.img_size, cfg.resize)
    train_idx, held_idx = holdout_split(len(train_ds), opts.holdout)
    category = opts.category or (getattr(train_ds, "root", None) or root).name
    augmentation = resolve_augmentation(opts.augmentation, category)
    synth = synth_cls(cfg.img_size, anomaly_source=opts.anomaly_source, augmentation=augmentation,
                      probability=0.5, seed=opts.seed, texture_bank=opts.texture_bank, resize=cfg.resize)
    say(f"data: {train_ds.name}: {len(train_idx)} training images, {len(held_idx)} held out for thresholds; "
        f"augmentation '{augmentation}', textures {opts.anomaly_source or 'procedural'}")

    # model (seeded init), optional MobileSAM init, teacher
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % 2**32)
    random.seed(opts.seed)
    model = STLM(cfg)
    if opts.init_mobile_sam and state is None:
        init_students_from_mobile_sam(model, opts.init_mobile_sam)
    model.to(device)

    def calib_batches() -> Iterator[torch.Tensor]:
        n = min(opts.calib_images, len(train_idx))
        picks = [train_idx[int(j)] for j in np.linspace(0, len(train_idx) - 1, n).round()]
        for s in range(0, n, 8):
            imgs = np.stack([train_ds[i].image for i in picks[s:s + 8]])
            yield model.normalize(torch.from_numpy(imgs).to(device))

    teacher, teacher_desc = early_teacher or build_teacher(opts, cfg, calib_batches, device,
                                                           state.get("teacher") if state else None, say)
    trainer = Trainer(model, teacher, device, opts, info)

    step, seconds, history = 0, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["optim"])
        step, seconds, history = int(state["step"]), float(state["seconds"]), state["history"].tolist()
        _set_rng_state(state["rng"])
        if int(state.get("world_size", 1)) != info.world_size:
            raise TrainError(f"--resume: the run used {state.get('world_size', 1)} processes, now {info.world_size}")
        say(f"resume: step {step}, {seconds / 60:.1f} min trained so far")

    sampler = EpochBatchSampler(len(train_idx), opts.batch_size, opts.seed, info.rank, info.world_size, step)
    spe = sampler.steps_per_epoch
    if stop_kind == "epochs":
        target_steps: int | None = int(stop_value) * spe
    elif stop_kind == "steps":
        target_steps = int(stop_value)
    else:
        target_steps = None
    budget_s = stop_value * 60.0 if stop_kind == "time_budget" else None

    def done() -> bool:
        if target_steps is not None:
            return step >= target_steps
        if info.world_size > 1:  # ranks must agree, or one would wait forever in the next all-reduce
            t = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t) >= budget_s
        return seconds >= budget_s

    def save_state() -> None:
        if not info.main:
            return
        tstate = ({"kind": "builtin", "state_dict": teacher.state_dict(),
                   "calibration_images": teacher_desc.get("calibration_images")}
                  if teacher_desc["kind"] == "builtin" else dict(teacher_desc))
        payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "options": opts.identity(),
                   "config": cfg.to_dict(), "model": model.state_dict(), "optim": trainer.state_dict(),
                   "step": step, "epoch": step / spe, "seconds": seconds,
                   "history": torch.tensor(history, dtype=torch.float64).reshape(-1, len(HISTORY_KEYS)),
                   "rng": _rng_state(), "teacher": tstate, "world_size": info.world_size}
        from stlm_deploy.fsutil import atomic_output

        with atomic_output(out / "last.ckpt") as tmp:
            torch.save(payload, tmp)

    # Workers are spawned, never forked: a fork of a process that has loaded OpenVINO/TBB or ONNX Runtime
    # thread pools (e.g. training from a notebook or the test suite) can crash in the atfork handlers.
    loader = DataLoader(TrainTriples(train_ds, train_idx, synth, opts.seed), batch_sampler=sampler,
                        num_workers=opts.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=opts.num_workers > 0,
                        multiprocessing_context="spawn" if opts.num_workers > 0 else None)
    imgs_per_step = opts.batch_size * info.world_size
    say(f"training: config '{cfg.name}' at {cfg.img_size} px, batch {opts.batch_size} x {info.world_size} "
        f"process(es), {spe} steps/epoch, stop at "
        + (f"{target_steps} steps" if target_steps is not None else f"{stop_value:g} min") + f", device {device}"
        + (", AMP" if opts.amp else ""))
    bar = _progress(opts, info, target_steps, budget_s, step, seconds)
    ema_rate, last_terms = None, {}
    start_step = step
    loop_t0 = time.perf_counter()
    try:
        it = iter(loader)
        while not done():
            t0 = time.perf_counter()
            clean, pseudo, mask = next(it)
            terms = trainer.step(clean, pseudo, mask)
            last_terms = terms.as_floats()
            if not all(math.isfinite(v) for v in last_terms.values()):
                raise TrainError(f"loss became non-finite at step {step + 1}: {last_terms} "
                                 "(try without --amp or a different seed)")
            dt = time.perf_counter() - t0
            step += 1
            seconds += dt
            history.append([step, *(last_terms[k] for k in LOSS_KEYS), seconds])
            rate = imgs_per_step / max(dt, 1e-9)
            ema_rate = rate if ema_rate is None else 0.8 * ema_rate + 0.2 * rate
            if bar is not None:
                bar.set_postfix_str(f"loss {last_terms['total']:.3f} (Lp {last_terms['plain']:.3f} "
                                    f"Lde {last_terms['denoising']:.3f} foc {last_terms['focal']:.4f} "
                                    f"l1 {last_terms['l1']:.3f}) {ema_rate:.2f} img/s ep {step / spe:.1f}",
                                    refresh=False)
                bar.update(1 if budget_s is None else min(dt, max(0.0, budget_s - bar.n)))
            if opts.save_every and step % opts.save_every == 0 and not done():
                save_state()
        del it
    except KeyboardInterrupt:
        save_state()
        if bar is not None:
            bar.close()
        say(f"interrupted at step {step}: state saved to {out / 'last.ckpt'} (continue with --resume)")
        raise
    if bar is not None:
        bar.close()
    loop_s = time.perf_counter() - loop_t0
    trainer.sync_buffers()
    save_state()
    if info.world_size > 1:
        dist.barrier()
    ran = step - start_step
    say(f"trained {ran} steps in {loop_s:.1f} s ({loop_s / max(ran, 1):.3f} s/step, "
        f"{ran * imgs_per_step / max(loop_s, 1e-9):.2f} img/s); total {step} steps, {step / spe:.2f} epochs")

    if not info.main:
        return TrainResult(out, None, None, step, step / spe, seconds, last_terms, None, None, model.eval())

    # thresholds on held-out good images, the final checkpoint, the test split
    thresholds = held_out_thresholds(model, train_ds, held_idx, opts, device)
    say(f"thresholds: image {thresholds['image']:.5f}, pixel {thresholds['pixel']:.5f} "
        f"({len(held_idx)} held-out good image(s))")
    train_info = {
        "steps": step, "epochs": round(step / spe, 4), "steps_per_epoch": spe, "seconds": round(seconds, 2),
        "seed": opts.seed, "teacher": teacher_desc, "config": cfg.name, "img_size": cfg.img_size,
        "data": str(opts.data), "format": fmt, "category": category, "augmentation": augmentation,
        "anomaly_source": opts.anomaly_source, "texture_bank": opts.texture_bank, "resize": cfg.resize,
        "batch_size": opts.batch_size, "world_size": info.world_size,
        "amp": bool(opts.amp), "device": str(device), "init_mobile_sam": opts.init_mobile_sam,
        "n_train_images": len(train_idx), "n_held_out": len(held_idx),
        "optimizers": {"students": {"type": "Adam", "lr": opts.lr_students, "betas": [0.5, 0.999]},
                       "fa": {"type": "SGD", "lr_res": opts.lr_fa_res, "lr_head": opts.lr_fa_head,
                              "momentum": 0.9, "weight_decay": 1e-4}},
        "losses": summarize_history(history),
    }
    model_path = save_checkpoint(out / "model.ckpt", model.eval(), thresholds=thresholds, train=train_info)
    say(f"saved {model_path}")

    metrics = None
    if opts.evaluate:
        test_ds = _test_split(build_dataset, root, fmt, opts.category, cfg.img_size, cfg.resize)
        if test_ds is None:
            say("evaluation: the data set has no test split; skipped")
        else:
            metrics = evaluate_model(model, test_ds, thresholds, batch_size=opts.eval_batch_size, device=device)
            say(format_table(metrics))
    from stlm_deploy.fsutil import atomic_write_json

    from .evaluate import _clean

    metrics_path = atomic_write_json(out / "metrics.json", _clean(
        {"checkpoint": str(model_path), "train": {k: v for k, v in train_info.items() if k != "losses"},
         "losses": {k: v for k, v in train_info["losses"].items() if k != "curve"},
         "thresholds": thresholds, "eval": metrics}))
    return TrainResult(out, model_path, metrics_path, step, step / spe, seconds, last_terms, thresholds, metrics,
                       model)


def _test_split(build_dataset, root, fmt, category, img_size, resize):
    from .data import DataError

    try:
        return build_dataset(root, fmt, category, "test", img_size, resize)
    except DataError:
        return None


def _progress(opts: TrainOptions, info: DistInfo, target_steps: int | None, budget_s: float | None,
              step: int, seconds: float):
    if not (opts.progress and info.main):
        return None
    from tqdm import tqdm

    if budget_s is not None:
        return tqdm(total=round(budget_s, 1), initial=round(min(seconds, budget_s), 1), unit="s", desc="train",
                    dynamic_ncols=True, mininterval=1.0,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s "
                               "[{elapsed}<{remaining}{postfix}]")
    return tqdm(total=target_steps, initial=step, unit="step", desc="train", dynamic_ncols=True, mininterval=1.0)


__all__ = ["TrainOptions", "TrainResult", "TrainError", "Trainer", "TrainGraph", "train", "holdout_split",
           "EpochBatchSampler", "TrainTriples", "teacher_features", "build_teacher", "summarize_history",
           "DEFAULT_STEPS", "IDENTITY_FIELDS"]
