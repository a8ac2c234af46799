"""Training speed: our batched STLM step vs a per-sample loop like the official trainSTLM.py.

Both variants start from the same weights, see the same pre-synthesised batches and the same frozen
built-in teacher, and are timed step by step in alternation (A, B, A, B, ...) in one process, so a
noisy shared machine slows both alike. Reported: median seconds per step, steps/s, images/s and the
speed-up; also the loss difference at the first step (both compute the same function).

- ours: one teacher call on [N; I_a] (samples without a pasted anomaly sent once), both students
  through ``STLM.student_features`` (one decoder call for both streams), ``stlm_train.training.Trainer``;
- official-like: the teacher called separately on I_a and on N, and the shared decoder called once
  per image and per stream (``Batch_Sam`` / ``Batch_SamE.forward`` in the official mob_sam.py).
  The official decoder also runs output upscaling, hypernetwork MLPs and the IoU head, which never
  reach the loss; they are not built here, so this baseline is, if anything, faster than the original.

    python -m stlm_bench.train_speed --config small --steps 10
    python -m stlm_bench.train_speed --config paper --img-size 256 --steps 4

Writes a table to stdout and merges the result into benchmarks/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stlm_train.anomalies import PseudoAnomalySynthesizer, sample_rng
from stlm_train.config import get_config
from stlm_train.data import build_dataset, make_generated_dataset
from stlm_train.losses import stlm_loss
from stlm_train.modeling import STLM, build_builtin_teacher, calibrate_batchnorm
from stlm_train.training import TrainOptions, Trainer, build_optimizers

from .output import run_main

RESULTS = Path(__file__).resolve().parent / "results"


class OfficialLikeStep:
    """The official step structure on our modules: per-call teacher, per-sample per-stream decoder."""

    def __init__(self, model: STLM, teacher, opts: TrainOptions) -> None:
        self.model, self.teacher = model, teacher
        self.opt_students, self.opt_fa = build_optimizers(model, opts)

    @staticmethod
    def _per_sample(decoder, embeddings):
        f1, f2 = [], []
        for e in embeddings:  # one decoder call per image, as Batch_Sam(E).forward
            a, b = decoder(e.unsqueeze(0))
            f1.append(a[0])
            f2.append(b[0])
        return torch.stack(f1), torch.stack(f2)

    def step(self, clean, pseudo, mask):
        m, t = self.model, self.teacher
        x_clean, x_pseudo = m.normalize(clean), m.normalize(pseudo)
        m.train()
        with torch.no_grad():
            t_pseudo = self._per_sample(t.decoder, t.encoder(x_pseudo))
            t_clean = self._per_sample(t.decoder, t.encoder(x_clean))
        plain = self._per_sample(m.decoder, m.plain(x_pseudo))
        denoising = self._per_sample(m.decoder, m.denoising(x_pseudo))
        prob = torch.sigmoid(m.fa_logits(plain, denoising))
        terms = stlm_loss(plain, denoising, t_pseudo, t_clean, prob, mask)
        self.opt_students.zero_grad(set_to_none=True)
        self.opt_fa.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt_students.step()
        self.opt_fa.step()
        return terms


def make_batches(cfg, n_batches: int, batch_size: int, seed: int = 0):
    """Pseudo-anomaly batches from the generated data set (half of the samples get an anomaly)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_generated_dataset(Path(tmp) / "d", n_train=8, n_test_good=0, n_test_bad=0, size=cfg.img_size)
        ds = build_dataset(root, "mvtec", None, "train", cfg.img_size)
        images = [ds[i].image for i in range(len(ds))]
    synth = PseudoAnomalySynthesizer(cfg.img_size, seed=seed)
    batches = []
    for s in range(n_batches):
        trip = [synth(images[(s * batch_size + j) % len(images)], sample_rng(seed, s, j)) for j in range(batch_size)]
        batches.append(tuple(torch.from_numpy(np.stack([t[k] for t in trip])) for k in range(3)))
    return images, batches


def run(config: str, img_size: int | None, steps: int, batch_size: int, warmup: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = get_config(config, img_size)
    images, batches = make_batches(cfg, steps + warmup, batch_size)
    torch.manual_seed(0)
    base = STLM(cfg)
    teacher = build_builtin_teacher(cfg, 0)
    t0 = time.perf_counter()
    calib = [base.normalize(torch.from_numpy(np.stack(images[i:i + 8]))) for i in range(0, len(images), 8)]
    n_cal = calibrate_batchnorm(teacher, calib)
    calib_s = time.perf_counter() - t0
    opts = TrainOptions(data="", out="")
    ours = Trainer(copy.deepcopy(base), teacher, torch.device("cpu"), opts)
    official = OfficialLikeStep(copy.deepcopy(base), teacher, opts)
    times: dict[str, list[float]] = {"ours": [], "official_like": []}
    first: dict[str, dict] = {}
    for i, (clean, pseudo, mask) in enumerate(batches):
        order = (("ours", ours), ("official_like", official)) if i % 2 == 0 else \
            (("official_like", official), ("ours", ours))
        for name, runner in order:
            t = time.perf_counter()
            terms = runner.step(clean, pseudo, mask)
            dt = time.perf_counter() - t
            if i == 0:
                first[name] = terms.as_floats()
            if i >= warmup:
                times[name].append(dt)
    res = {"config": cfg.name, "img_size": cfg.img_size, "batch_size": batch_size, "steps": steps,
           "warmup": warmup, "threads": torch.get_num_threads(), "teacher_calibration_s": round(calib_s, 3),
           "teacher_calibration_images": n_cal,
           "first_step_total_loss": {k: round(v["total"], 6) for k, v in first.items()},
           "first_step_max_abs_loss_diff": max(abs(first["ours"][k] - first["official_like"][k])
                                               for k in first["ours"]),
           "anomalous_fraction": float(np.mean([float((b[2].flatten(1).amax(1) > 0).float().mean())
                                                for b in batches]))}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"s_per_step_median": round(med, 4), "s_per_step_mean": round(statistics.fmean(ts), 4),
                     "steps_per_s": round(1 / med, 3), "images_per_s": round(batch_size / med, 3)}
    res["speedup"] = round(res["official_like"]["s_per_step_median"] / res["ours"]["s_per_step_median"], 3)
    return res


def table(res: dict) -> str:
    rows = [("variant", "s/step", "steps/s", "img/s")]
    for name in ("ours", "official_like"):
        r = res[name]
        rows.append((name, f"{r['s_per_step_median']:.4f}", f"{r['steps_per_s']:.3f}", f"{r['images_per_s']:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{res['config']}@{res['img_size']} batch {res['batch_size']}, {res['steps']} timed steps each "
             f"(median), {res['threads']} threads"]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"speed-up {res['speedup']:.2f}x; first-step loss |diff| {res['first_step_max_abs_loss_diff']:.2e}; "
                 f"teacher BN calibration {res['teacher_calibration_s']:.2f} s on {res['teacher_calibration_images']} "
                 "images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small", choices=("small", "paper"))
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=str(RESULTS / "train_speed.json"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        print("Error: --steps and --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        res = run(args.config, args.img_size, args.steps, args.batch_size, args.warmup, args.threads)
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    res["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "cpu": platform.processor()}
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(table(res))
    path = Path(args.json)
    all_res = {}
    if path.is_file():
        try:
            all_res = json.loads(path.read_text())
        except json.JSONDecodeError:
            all_res = {}
    all_res[f"{res['config']}@{res['img_size']}/b{res['batch_size']}"] = res
    from stlm_deploy.files import atomic_write_json

    atomic_write_json(path, all_res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
