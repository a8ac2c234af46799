"""One training run, start to finish: data, model, teacher, the step loop, thresholds, checkpoint, eval.

The same run serves every model family; what differs (model, teacher, step, loss terms, selection) is
the family's strategy (:mod:`.family`), picked by the config's ``family``.

Everything random is seeded: the students' init (``seed``), the built-in teacher (its own seed,
``seed + 1000``, never the students' stream), the data order (``DistributedSampler`` shuffling with
``seed`` + epoch) and every synthesised sample (a numpy generator from (seed, epoch, index)). The same
seed and step count give identical weights, and a run resumed from ``last.ckpt`` ends where an
uninterrupted one would.

Held-out thresholds: a deterministic part of train/good (``holdout``, at least one image) is never
trained on; the image threshold is a high quantile of their FA scores and the pixel threshold a high
quantile of their FA map pixels. The lowest/highest image score over those images and their
pseudo-anomalous versions (one synthetic defect each) is recorded as ``score_min``/``score_max``: the
span of the normalized score (stlm_deploy/decision.py), which maps the image threshold to 0.5.

Tiled runs (``work_size`` > img_size; :mod:`stlm_deploy.tiling`): the training samples are img_size crops of
each image's work image (the crop drawn from the sample's generator), the teachers' and students' BatchNorm
calibration and STFPM's held-out selection see the tiles of the work images, and the thresholds, the
calibration score range and the evaluation are computed on stitched maps, as every runtime computes them.
"""
from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stlm_deploy.thresholds import choose_threshold, parse_target

from ..anomalies import PseudoAnomalyDataset, PseudoAnomalySynthesizer, sample_rng
from ..checkpoint import save_checkpoint
from ..config import ModelConfig, STLMConfig, get_config
from ..data import DataError, build_dataset
from stlm_deploy.preprocess import work_image

from ..evaluate import BUILTIN_DATA, clean_json, evaluate_model, format_table, model_split, predict_dataset
from ..metrics import threshold_from_good
from ..modeling.predict import predict_tiled, tiling_of
from ..modeling.stfpm import STFPM
from ..modeling.stlm import STLM
from .distributed import DistInfo, all_ranks_max, barrier, resolve_device, setup_distributed, teardown
from .family import family_of
from .loop import NonFiniteLoss
from .options import TrainError, TrainOptions, merge_resume_options, parse_train_images
from .sampling import AUTO_TRAIN_EPOCHS, EpochBatchSampler, auto_train_images, holdout_split, spread_subset
from .state import load_run_state, rng_state, save_run_state, set_rng_state, summarize_history

Log = Callable[[str], None]
#: the "epoch" key of the pseudo-anomalies drawn for the calibration score range (never a training epoch)
CALIBRATION_STREAM = 2**32 - 1


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
    model: STLM | STFPM = field(repr=False)


def train(opts: TrainOptions, explicit: set[str] | None = None, log: Log | None = None) -> TrainResult:
    """Run (or resume) one training run; rank 0 writes RUN_DIR/{last.ckpt, model.ckpt, metrics.json}.

    ``explicit``: option names the user set on purpose (checked against the run when resuming).
    """
    state = load_run_state(opts.out) if opts.resume else None
    if state is not None:
        opts = merge_resume_options(opts, state["options"], explicit or set())
    return train_resumed(opts, state, log)


def train_resumed(opts: TrainOptions, state: dict[str, Any] | None, log: Log | None = None) -> TrainResult:
    """:func:`train` with the run state already read and merged into ``opts`` (None: a new run)."""
    opts.validate()
    cfg = replace(get_config(opts.config, opts.img_size), resize=opts.resize)
    if isinstance(cfg, STLMConfig):
        cfg = replace(cfg, fa_input=opts.fa_input, fa_output=opts.resolved_fa_output())
    info = setup_distributed(resolve_device(opts.device).type)  # a bad --device fails before joining a group
    try:
        return _Run(opts, cfg, state, info, log).execute()
    finally:
        teardown(info)


def resolve_data(opts: TrainOptions, cfg: ModelConfig, info: DistInfo) -> tuple[Path, str]:
    """The data root and format; ``builtin`` generates the procedural set into RUN_DIR/data."""
    if opts.data.lower() in BUILTIN_DATA:
        from ..data import make_generated_dataset

        root = Path(opts.out) / "data"
        if info.main:
            make_generated_dataset(root, size=cfg.img_size, seed=0)
        barrier(info)
        return root, "mvtec"
    return Path(opts.data), opts.format


@torch.no_grad()
def pseudo_anomaly_scores(model: STLM, images: Sequence[np.ndarray], synth: PseudoAnomalySynthesizer, seed: int,
                          batch_size: int, device: torch.device) -> np.ndarray:
    """FA image scores of ``images`` each with one synthetic defect (``synth`` should apply it always; a tiled
    model: ``synth`` returns the whole work image, scored on its stitched map)."""
    was_training = model.training
    model.eval()
    scores = []
    try:
        if tiling_of(model) is not None:  # synth keeps the whole work image (crop=False): scored stitched
            for j, im in enumerate(images):
                work = synth(im, sample_rng(seed, CALIBRATION_STREAM, j))[1]
                scores.append(np.asarray([predict_tiled(model, im, batch_size, work=work).score], np.float32))
        else:
            for start in range(0, len(images), max(1, int(batch_size))):
                pseudo = [synth(im, sample_rng(seed, CALIBRATION_STREAM, start + j))[1]
                          for j, im in enumerate(images[start:start + batch_size])]
                x = torch.from_numpy(np.stack(pseudo)).to(device)
                scores.append(model(model.normalize(x)).score.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


@torch.no_grad()
def held_out_thresholds(model: STLM | STFPM, dataset: Any, indices: Sequence[int], opts: TrainOptions,
                        device: torch.device, synth: PseudoAnomalySynthesizer | None = None) -> dict[str, Any]:
    """Image/pixel thresholds from held-out images (the deployed map; STLM's TLM map too), plus the
    calibration score range (good held-out scores and, with ``synth``, their pseudo-anomalous versions).

    The image threshold follows ``opts.threshold_target`` (:mod:`stlm_deploy.thresholds`): ``fpr<=A`` on
    the held-out good scores, or ``f1`` / ``fnr<=B`` with the pseudo-anomalous versions as the defective
    class; the rates it reaches on both are stored with the scores, so the trade-off is visible and
    ``stlm-threshold`` can move it. ``threshold_target=None``: the older rule, a high quantile.
    """
    pred = predict_dataset(model, dataset, batch_size=opts.eval_batch_size, indices=indices, device=device)
    iq, pq = opts.image_quantile, opts.pixel_quantile
    which = "FA" if pred.tlm_maps is not None else "anomaly"
    pseudo = (pseudo_anomaly_scores(model, [dataset[i].image for i in indices], synth, opts.seed,
                                    opts.eval_batch_size, device) if synth is not None else np.zeros(0))
    seen = np.concatenate([pred.fa_scores, pseudo])
    target = opts.threshold_target
    if target is None:
        image_threshold = threshold_from_good(pred.fa_scores, iq)
        rule = f"quantile {iq} of {which} image scores (+1e-6)"
    else:
        tgt = parse_target(target)
        image_threshold = choose_threshold(pred.fa_scores, pseudo, tgt).threshold
        rule = f"target {tgt} of {which} image scores" + (" (defective: their pseudo-anomalous versions)"
                                                            if tgt.needs_defective else "")
    lo, hi = float(min(seen.min(), image_threshold)), float(max(seen.max(), image_threshold))
    if not hi > lo:  # a single constant score: keep a non-empty span so the normalized score is defined
        hi = lo + 1e-6
    out = {
        "image": image_threshold,
        "pixel": float(np.quantile(pred.fa_maps, pq)),
        "score_min": lo,
        "score_max": hi,
        "method": (f"held-out good: {rule} and quantile {pq} of {which} map pixels over {len(indices)} "
                   "train/good images never trained on"),
        "target": target,
        "held_out_fpr": float(np.mean(pred.fa_scores > image_threshold)),
        "pseudo_fnr": float(np.mean(pseudo <= image_threshold)) if pseudo.size else None,
        "calibration_scores": {"good": [round(float(v), 6) for v in pred.fa_scores],
                               "pseudo": [round(float(v), 6) for v in pseudo]},
    }
    if pred.tlm_maps is not None:
        out.update(tlm_image=threshold_from_good(pred.tlm_scores, iq), tlm_pixel=float(np.quantile(pred.tlm_maps, pq)))
    return {**out, "n_images": len(indices), "held_out": [Path(p).name for p in pred.paths]}


class _Run:
    """The state of one run, so the phases below share it without closures."""

    def __init__(self, opts: TrainOptions, cfg: ModelConfig, state: dict[str, Any] | None, info: DistInfo,
                 log: Log | None) -> None:
        self.opts, self.cfg, self.state, self.info = opts, cfg, state, info
        self.family = family_of(cfg)
        self.device = resolve_device(opts.device, info)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(opts.out)
        quiet = not (info.main and opts.progress)
        self.say: Log = (lambda s: None) if quiet else (log or (lambda s: print(s, flush=True)))
        self.step, self.seconds, self.history = 0, 0.0, []
        self.selection: dict[str, Any] | None = None

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        opts, cfg, info, say = self.opts, self.cfg, self.info, self.say
        if info.main:
            self.out.mkdir(parents=True, exist_ok=True)
        # a teacher file is read first: a bad one fails before any data work
        early = self.family.early_teacher(self)

        # data: train split minus a deterministic held-out part (tiled: images at their own size)
        self.tiling = opts.tiling()
        self.root, self.fmt = resolve_data(opts, cfg, info)
        self.train_ds = build_dataset(self.root, self.fmt, opts.category, "train",
                                      None if self.tiling else cfg.img_size, cfg.resize)
        self.train_idx, self.held_idx = holdout_split(len(self.train_ds), opts.holdout)
        self.category = opts.category or (getattr(self.train_ds, "root", None) or self.root).name
        self.augmentation = self.family.augmentation(opts, self.category)
        full_res = opts.augment_before_resize and self.augmentation != "none"
        synth = PseudoAnomalySynthesizer(cfg.img_size, anomaly_source=opts.anomaly_source,
                                         augmentation=self.augmentation, probability=self.family.anomaly_probability,
                                         seed=opts.seed,
                                         texture_bank=opts.texture_bank, resize=cfg.resize,
                                         augment_before_resize=full_res, tiling=self.tiling)
        source = build_dataset(self.root, self.fmt, opts.category, "train", None) \
            if full_res and not self.tiling else self.train_ds
        self.triples = PseudoAnomalyDataset(source, synth, seed=opts.seed, indices=self.train_idx)
        textures = (f", textures {opts.anomaly_source or 'procedural (' + opts.texture_bank + ' bank)'}"
                    if self.family.anomaly_probability else ", no pseudo anomalies")
        say(f"data: {self.train_ds.name}: {len(self.train_idx)} training images, {len(self.held_idx)} held out "
            f"for thresholds; augmentation '{self.augmentation}'{textures}"
            + (f"; tiled: {self.tiling.describe()}, training on random {cfg.img_size} px crops" if self.tiling else ""))

        # model (seeded init), teacher (its own seed), the family's trainer
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed % 2**32)
        random.seed(opts.seed)
        self.model, self.teacher, self.teacher_desc, self.trainer = self.family.setup(self, early)
        self.model.tiling = self.tiling  # recorded in model.ckpt; thresholds and evaluation stitch with it
        self.loss_keys = self.family.loss_keys(self.model)

        if self.state is not None:
            st = self.state
            if int(st.get("world_size", 1)) != info.world_size:
                raise TrainError(f"--resume: the run used {st.get('world_size', 1)} processes, now {info.world_size}")
            self.model.load_state_dict(st["model"])
            self.trainer.load_state_dict(st["optim"])
            self.step, self.seconds, self.history = int(st["step"]), float(st["seconds"]), st["history"].tolist()
            set_rng_state(st["rng"])
            say(f"resume: step {self.step}, {self.seconds / 60:.1f} min trained so far")

        self.select_training_images()
        self.sampler = EpochBatchSampler(len(self.train_idx), opts.batch_size, opts.seed, info.rank,
                                         info.world_size, self.step)
        self.spe = self.sampler.steps_per_epoch
        kind, value = opts.stop_rule()
        self.target_steps = int(value) * self.spe if kind == "epochs" else int(value) if kind == "steps" else None
        self.budget_s = value * 60.0 if kind == "time_budget" else None
        self.stop_text = f"{self.target_steps} steps" if self.target_steps is not None else f"{value:g} min"

    def select_training_images(self) -> None:
        """The distinct images the students learn from (``train_images``): resolved once, before the first step,
        and stored with the run as a count (or ``all``), so a resumed or re-finished run keeps the same images."""
        opts, available = self.opts, len(self.train_idx)
        choice = parse_train_images(opts.train_images)
        reason = f"--train-images {choice}"
        if choice == "all" or (choice == "auto" and self.family.name != "stlm"):  # "auto" is measured on STLM only
            k = available
        elif choice == "auto":
            planned = self.planned_samples()
            k = auto_train_images(available, planned)
            if planned is not None:
                reason = (f"auto: about {planned:.0f} planned samples / {AUTO_TRAIN_EPOCHS} visits each, "
                          "--train-images all to use every image")
        else:
            k = min(int(choice), available)
        if k < available:
            self.train_idx = spread_subset(self.train_idx, k)
            self.triples = PseudoAnomalyDataset(self.triples.base, self.triples.synthesizer, seed=opts.seed,
                                                indices=self.train_idx)
            self.say(f"training images: {k} of {available}, spread evenly ({reason})")
        self.opts = replace(opts, train_images=str(k) if k < available else "all")

    def planned_samples(self) -> float | None:
        """Images the run will step through (steps x batch x processes); a time budget: from a few timed probe
        steps; an epoch count: None (the user asked for passes over every image)."""
        kind, value = self.opts.stop_rule()
        per_step = self.opts.batch_size * self.info.world_size
        if kind == "epochs":
            return None
        if kind == "steps":
            return value * per_step
        return value * 60.0 / self.probe_seconds_per_step() * per_step

    def probe_seconds_per_step(self, steps: int = 3) -> float:
        """Seconds per training step, timed on ``steps`` real steps whose effect is undone afterwards (weights,
        BatchNorm statistics, optimiser and random state restored); the first step (warm-up) is not counted."""
        from torch.utils.data import default_collate

        model_state, optim_state = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.trainer.state_dict())
        rng = rng_state()
        batch = default_collate([self.triples[(0, j % len(self.triples))] for j in range(self.opts.batch_size)])
        times = []
        try:
            for _ in range(max(2, steps)):
                t0 = time.perf_counter()
                self.trainer.step(batch["clean"], batch["pseudo"], batch["mask"])
                times.append(time.perf_counter() - t0)
        finally:
            self.model.load_state_dict(model_state)
            self.trainer.load_state_dict(optim_state)
            set_rng_state(rng)
        return all_ranks_max(float(np.mean(times[1:])), self.info, self.device)

    def _views(self, indices: Sequence[int], batch: int) -> Iterator[torch.Tensor]:
        """What the model sees of ``train_ds[indices]``, normalised, ``batch`` at a time: the img_size images, or
        (tiled) every tile of their work images."""
        pending: list[np.ndarray] = []
        for i in indices:
            image = self.train_ds[i].image
            if self.tiling is None:
                pending.append(image[None])
            else:
                work = work_image(image, self.tiling, self.cfg.resize)
                pending.append(self.tiling.crop(work, self.tiling.grid(work.shape[:2])))
            views = np.concatenate(pending)
            while len(views) >= batch:
                yield self.model.normalize(torch.from_numpy(views[:batch]).to(self.device))
                views = views[batch:]
            pending = [views] if len(views) else []
        if pending:
            yield self.model.normalize(torch.from_numpy(np.concatenate(pending)).to(self.device))

    def held_out_batches(self) -> Iterator[torch.Tensor]:
        """The held-out good images (tiled: their tiles), normalised, for a family's model selection."""
        return self._views(self.held_idx, max(1, self.opts.eval_batch_size))

    def calibration_batches(self) -> Iterator[torch.Tensor]:
        """Clean training images (evenly spread, never held-out ones; tiled: their tiles) for BatchNorm."""
        n = min(self.opts.calib_images, len(self.train_idx))
        picks = [self.train_idx[int(j)] for j in np.linspace(0, len(self.train_idx) - 1, n).round()]
        return self._views(picks, 8)

    # -- the loop -----------------------------------------------------------------------------------

    def done(self) -> bool:
        if self.target_steps is not None:
            return self.step >= self.target_steps
        return all_ranks_max(self.seconds, self.info, self.device) >= self.budget_s

    def save_state(self) -> None:
        """last.ckpt, only from finite weights (every rank checks the same DDP-synchronised weights)."""
        bad = next((n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainError(f"weights became non-finite at step {self.step} ({bad}); nothing saved, "
                             f"{self.out / 'last.ckpt'} keeps the last good state")
        if not self.info.main:
            return
        tstate = self.family.teacher_state(self.teacher, self.teacher_desc)
        save_run_state(self.out / "last.ckpt", self.loss_keys, options=self.opts.identity(), config=self.cfg.to_dict(),
                       model=self.model.state_dict(), optim=self.trainer.state_dict(), step=self.step,
                       epoch=self.step / self.spe, seconds=self.seconds, history=self.history, teacher=tstate,
                       world_size=self.info.world_size)

    def loop(self) -> dict[str, float]:
        opts, info = self.opts, self.info
        # Workers are spawned, never forked: a fork of a process that has loaded OpenVINO/TBB or ONNX Runtime
        # thread pools (e.g. training from a notebook or the test suite) can crash in the atfork handlers.
        loader = DataLoader(self.triples, batch_sampler=self.sampler, num_workers=opts.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=opts.num_workers > 0,
                            multiprocessing_context="spawn" if opts.num_workers > 0 else None)
        imgs_per_step = opts.batch_size * info.world_size
        self.say(f"training: config '{self.cfg.name}' at {self.cfg.img_size} px, batch {opts.batch_size} x "
                 f"{info.world_size} process(es), {self.spe} steps/epoch, stop at {self.stop_text}, device "
                 f"{self.device}" + (", AMP" if opts.amp else ""))
        bar = _progress(opts, info, self.target_steps, self.budget_s, self.step, self.seconds)
        ema_rate, terms = None, {}
        start_step, t_start = self.step, time.perf_counter()
        consistent = True  # weights, optimiser state, step counter and history describe the same step
        try:
            it = iter(loader)
            while not self.done():
                t0 = time.perf_counter()
                batch = next(it)
                consistent = False
                try:
                    terms = self.trainer.step(batch["clean"], batch["pseudo"], batch["mask"]).as_floats()
                except NonFiniteLoss as e:
                    raise TrainError(f"{e} at step {self.step + 1}; stopped before the update, "
                                     f"{self.out / 'last.ckpt'} keeps the last saved state (try without --amp, "
                                     "a lower learning rate or another seed)") from None
                self.step += 1
                if self.step % self.spe == 0:
                    self.trainer.end_of_epoch()  # model selection, where the family has one
                dt = time.perf_counter() - t0
                self.seconds += dt
                self.history.append([self.step, *(terms[k] for k in self.loss_keys), self.seconds])
                consistent = True
                rate = imgs_per_step / max(dt, 1e-9)
                ema_rate = rate if ema_rate is None else 0.8 * ema_rate + 0.2 * rate
                if bar is not None:
                    bar.set_postfix_str(f"{self.family.postfix(terms)} {ema_rate:.2f} img/s ep "
                                        f"{self.step / self.spe:.1f}", refresh=False)
                    bar.update(1 if self.budget_s is None else min(dt, max(0.0, self.budget_s - bar.n)))
                if opts.save_every and self.step % opts.save_every == 0 and not self.done():
                    self.save_state()
            del it
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if consistent:
                self.save_state()
                self.say(f"interrupted at step {self.step}: state saved to {self.out / 'last.ckpt'} "
                         "(continue with --resume)")
            else:  # mid-update: saving now would mix two steps
                self.say(f"interrupted during step {self.step + 1}: nothing saved, {self.out / 'last.ckpt'} "
                         "keeps the last saved state (continue with --resume)")
            raise
        if bar is not None:
            bar.close()
        loop_s = time.perf_counter() - t_start
        self.trainer.sync_buffers()
        self.save_state()
        barrier(info)
        ran = self.step - start_step
        self.say(f"trained {ran} steps in {loop_s:.1f} s ({loop_s / max(ran, 1):.3f} s/step, "
                 f"{ran * imgs_per_step / max(loop_s, 1e-9):.2f} img/s); total {self.step} steps, "
                 f"{self.step / self.spe:.2f} epochs")
        return terms

    # -- the end ------------------------------------------------------------------------------------

    def train_info(self) -> dict[str, Any]:
        opts, cfg = self.opts, self.cfg
        return {
            "steps": self.step, "epochs": round(self.step / self.spe, 4), "steps_per_epoch": self.spe,
            "seconds": round(self.seconds, 2), "seed": opts.seed, "teacher": self.teacher_desc, "config": cfg.name,
            "model_family": self.family.name,
            "img_size": cfg.img_size, "data": str(opts.data), "format": self.fmt, "category": self.category,
            "augmentation": self.augmentation, "anomaly_source": opts.anomaly_source,
            "texture_bank": opts.texture_bank, "resize": cfg.resize,
            "augment_before_resize": opts.augment_before_resize, "student_bn": opts.student_bn,
            "fa_grad": opts.fa_grad, "fa_loss": opts.fa_loss, "fa_target": opts.fa_target,
            **({"fa_input": cfg.fa_input, "fa_output": cfg.fa_output} if isinstance(cfg, STLMConfig) else {}),
            "batch_size": opts.batch_size, "student_init": opts.student_init,
            **({"work_size": self.tiling.work_size, "tile_overlap": self.tiling.overlap} if self.tiling else {}),
            "world_size": self.info.world_size, "amp": bool(opts.amp), "device": str(self.device),
            "init_mobile_sam": opts.init_mobile_sam, "n_train_images": len(self.train_idx),
            "train_images": opts.train_images,
            "n_held_out": len(self.held_idx),
            "optimizers": self.family.optimizers(opts),
            "selection": self.selection,
            "losses": summarize_history(self.history, loss_keys=self.loss_keys),
        }

    def finish(self, terms: dict[str, float]) -> TrainResult:
        """Thresholds on held-out good images, the final checkpoint, the test split (rank 0 only)."""
        opts, cfg, say, model = self.opts, self.cfg, self.say, self.model
        epochs = self.step / self.spe
        self.selection = self.trainer.finalize()  # e.g. STFPM: back to the best held-out student (every rank)
        self.family.finish(self)
        if self.selection is not None:
            say(f"selection: the student of step {self.selection['selected_step']} "
                f"(held-out error {self.selection['validation_error']:.6f})")
        if not self.info.main:
            return TrainResult(self.out, None, None, self.step, epochs, self.seconds, terms, None, None, model.eval())
        calib_synth = PseudoAnomalySynthesizer(cfg.img_size, anomaly_source=opts.anomaly_source, augmentation="none",
                                               probability=1.0, seed=opts.seed, texture_bank=opts.texture_bank,
                                               resize=cfg.resize, augment_before_resize=False, tiling=self.tiling,
                                               crop=False)
        thresholds = held_out_thresholds(model, self.train_ds, self.held_idx, opts, self.device, calib_synth)
        say(f"thresholds: image {thresholds['image']:.5f}, pixel {thresholds['pixel']:.5f} "
            f"({len(self.held_idx)} held-out good image(s))")
        info = self.train_info()
        model_path = save_checkpoint(self.out / "model.ckpt", model.eval(), thresholds=thresholds, train=info)
        say(f"saved {model_path}")
        metrics = None
        if opts.evaluate:
            try:
                test_ds = model_split(model, self.root, self.fmt, opts.category, "test")
            except DataError:
                test_ds = None
            if test_ds is None:
                say("evaluation: the data set has no test split; skipped")
            else:
                metrics = evaluate_model(model, test_ds, thresholds, batch_size=opts.eval_batch_size,
                                         device=self.device)
                say(format_table(metrics))
        from stlm_deploy.files import atomic_write_json

        metrics_path = atomic_write_json(self.out / "metrics.json", clean_json(
            {"checkpoint": str(model_path), "train": {k: v for k, v in info.items() if k != "losses"},
             "losses": {k: v for k, v in info["losses"].items() if k != "curve"},
             "thresholds": thresholds, "eval": metrics}))
        return TrainResult(self.out, model_path, metrics_path, self.step, epochs, self.seconds, terms, thresholds,
                           metrics, model)

    def execute(self) -> TrainResult:
        self.setup()
        terms = self.loop()
        return self.finish(terms)


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
