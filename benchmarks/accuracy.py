"""Accuracy benchmark: train for a fixed budget with several seeds, evaluate, report mean +- sd.

One training run is noise (within one 20-minute run the FA image AUROC of a real category moved
0.70 -> 0.90), so every row here is several seeds of the same recipe. ``--variants`` names rows of
the ablation table (:data:`VARIANTS`): ``current`` is the trainer's defaults; ``v0`` reproduces the
first trainer (teacher drawn from the students' seed, its first randomisation recipe, the first
texture bank, bilinear resize); ``v0+<change>`` adds one change to v0 and ``current-<change>``
removes one from the defaults, so each change is measured alone and together. The localisation round
has its own base, ``r2`` (the trainer before it: official train-mode student BatchNorm, the "reference"
teacher recipe, the highest held-out score as threshold), with ``r2+<change>`` rows. Rows whose change acts only
after the last step (``r2+recalibrated-bn``, ``r2+fpr-threshold``, ``current-fpr-threshold``: :data:`DERIVED_FROM`)
are not trained again: they re-finish their base row's run of the same seed (its ``last.ckpt``; the base runs first
in the same command, or ``--keep-runs`` holds it), a paired comparison on identical weights. ``tiled-<W>`` is the
current trainer with ``--work-size W`` (``--img-size`` is the tile); the group ``tiling`` is ``current``,
``tiled-512`` and ``tiled-768``. ``fa-grad-<A>``, ``fa-loss-focal`` and ``self-texture`` (texture bank
``reference+self``) are the current trainer with one training option changed; parts join with "+".
``--eval-grid original`` evaluates every row on the test images' own size
(``stlm-eval --grid original``), the grid on which untiled and tiled rows compare, and times that pass per
image (PyTorch eager on this machine: tiles included).

    python -m stlm_bench.accuracy --seeds 0,1,2 --time-budget 20             # the accuracy benchmark
    python -m stlm_bench.accuracy --variants ablation --seeds 0,1,2 --steps 150 --name ablation_bottle_xs
    python -m stlm_bench.accuracy --variants tiling --eval-grid original --seeds 0,1,2 --time-budget 20 \
        --data ../shared/data/mvtec3d_tire_rgb --category tire --name tiling_tire

Data: ``--data`` (an MVTec-layout root; default the bundled real sample, or ``generated``).
Results are merged run by run into ``benchmarks/results/<name>.json`` (so an interrupted sweep
resumes where it stopped; ``--fresh`` starts over) and the table is written next to it as ``.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .measure import machine_line
from .output import emit, run_main

RESULTS = Path(__file__).resolve().parent / "results"

#: What each change sets on TrainOptions (the value of the current defaults); v0 is all old values.
CHANGES: dict[str, dict[str, Any]] = {
    "independent-teacher": {"teacher_seed": None},
    "teacher-recipe": {"teacher_recipe": "reference"},
    "area-resize": {"resize": "area"},
    "texture-bank": {"texture_bank": "reference+grey"},  # "reference" then; the same on these colour images
    "augment-before-resize": {"augment_before_resize": True},
}
V0: dict[str, Any] = {"teacher_seed": "SEED", "teacher_recipe": "v1", "resize": "bilinear", "texture_bank": "v1",
                      "augment_before_resize": False, "student_bn": "train", "threshold_target": None,
                      "fa_grad": "students", "fa_target": "mask", "fa_input": "product", "train_images": "all"}
#: The localisation round: each change against the trainer before it (r2).
CHANGES_R3: dict[str, dict[str, Any]] = {
    "frozen-bn": {"student_bn": "frozen"},
    "recalibrated-bn": {"student_bn": "recalibrate"},
    "local-teacher": {"teacher_recipe": "local"},
    "fpr-threshold": {"threshold_target": "fpr<=0.05"},
    "detached-fa": {"fa_grad": "detached"},
}
R2: dict[str, Any] = {"student_bn": "train", "teacher_recipe": "reference", "threshold_target": None,
                      "fa_grad": "students", "fa_input": "product", "train_images": "all"}
VARIANTS: dict[str, dict[str, Any]] = {
    "v0": dict(V0),
    **{f"v0+{name}": {**V0, **change} for name, change in CHANGES.items()},
    **{f"current-{name}": {k: V0[k] for k in change} for name, change in CHANGES.items()},
    "r2": dict(R2),
    **{f"r2+{name}": {**R2, **change} for name, change in CHANGES_R3.items()},
    **{f"current-{name}": {k: R2[k] for k in change} for name, change in CHANGES_R3.items()
       if name not in ("recalibrated-bn", "detached-fa")},
    "current+detached-fa": dict(CHANGES_R3["detached-fa"]),
    "current-tlm-prior": {"fa_input": "product"},  # the trainer of the localisation tables' rows before 2026-12-07
    "current-prior-output": {"fa_output": "head"},  # the FA map with the head's learned correction (to 2026-12-07)
    "current": {},
}
#: Rows measured on another row's weights (same seed, resumed from its last.ckpt): their change acts only after
#: the last step (:mod:`stlm_train.training.refinish`), so the pair differs in nothing else, not even the steps.
DERIVED_FROM: dict[str, str] = {"r2+recalibrated-bn": "r2", "r2+fpr-threshold": "r2",
                                "current-fpr-threshold": "current", "current-prior-output": "current"}
GROUPS = {"ablation": ["v0", *(f"v0+{n}" for n in CHANGES), "current"],
          "localisation": ["r2", *(f"r2+{n}" for n in CHANGES_R3), "current"],
          "ablation-full": list(VARIANTS),
          "tiling": ["current", "tiled-512", "tiled-768"]}
#: ``tiled-<W>``: the current trainer with work size W (tiles of --img-size)
TILED = re.compile(r"^tiled-(\d+)$")
#: ``fa-grad-<A>``: the current trainer with the FA loss's gradient into the students scaled by A in (0, 1)
FA_GRAD = re.compile(r"^fa-grad-(0\.\d+)$")
#: ``fa-loss-focal``: the current trainer with the FA head trained on the focal loss alone (no L1)
FA_LOSS = re.compile(r"^fa-loss-(focal)$")
#: Named parts with fixed options, each the current trainer with one change: ``self-texture`` (half the pseudo
#: anomalies cut from the image itself, texture bank ``reference+self``), ``grey-textures`` (bank ``reference+grey``:
#: grey pseudo anomalies on grey images, the default) and ``colour-textures`` (bank ``reference``: coloured on every
#: image, the default before), ``fa-target-changed`` (the FA loss counts
#: only pixels where the pseudo mask and the teacher's change agree), ``amp`` / ``fp32`` (mixed precision forced
#: on: bf16 autocast on CPU, fp16 on CUDA / off), ``teacher-<recipe>`` (the built-in teacher's recipe named, whatever
#: the default), ``fa-input-absdiff`` (the FA head reads |l2n(Sp) - l2n(Sd)| instead of the official product),
#: ``fa-loss-dice`` (a soft Dice term added to the FA head's focal + L1), ``fa-input-tlm`` (the FA head also
#: reads the TLM map's per-level log distances through a prior path and starts as the TLM map),
#: ``fa-input-tlm-only`` (the FA head reads those log distances alone, not the product),
#: ``teacher-init`` / ``random-init`` (students and decoder start as copies of the TinyViT teacher / seeded random),
#: ``few-images`` (``train_images`` "auto": as many distinct images as the planned steps visit ~100 times each)
FIXED_PARTS: dict[str, dict[str, Any]] = {
    "self-texture": {"texture_bank": "reference+self"},
    "grey-textures": {"texture_bank": "reference+grey"},
    "colour-textures": {"texture_bank": "reference"},
    "teacher-reference": {"teacher_recipe": "reference"},
    "teacher-local": {"teacher_recipe": "local"},
    "fa-target-changed": {"fa_target": "changed"},
    "fa-input-absdiff": {"fa_input": "absdiff"},
    "fa-input-tlm": {"fa_input": "product+tlm"},
    "fa-input-tlm-only": {"fa_input": "tlm"},
    "fa-loss-dice": {"fa_loss": "focal+l1+dice"},
    "amp": {"amp": True},
    "fp32": {"amp": False},
    "teacher-init": {"student_init": "teacher"},
    "random-init": {"student_init": "random"},
    "few-images": {"train_images": "auto"},
}
METRICS = (("fa", "i_auroc"), ("fa", "p_auroc"), ("fa", "aupro"), ("tlm", "i_auroc"), ("tlm", "p_auroc"),
           ("tlm", "aupro"), ("fa", "fnr"), ("fa", "fpr"))


def overrides_of(variant: str) -> dict[str, Any]:
    """The TrainOptions a row sets: a named variant, or ``tiled-<W>`` (``work_size`` W), ``fa-grad-<A>``,
    ``fa-loss-focal`` and the :data:`FIXED_PARTS` joined by "+" (``tiled-512+fa-grad-0.3``)."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    out: dict[str, Any] = {}
    for part in variant.split("+"):
        if m := TILED.match(part):
            out["work_size"] = int(m.group(1))
        elif m := FA_GRAD.match(part):
            out["fa_grad"] = m.group(1)
        elif m := FA_LOSS.match(part):
            out["fa_loss"] = m.group(1)
        elif part in FIXED_PARTS:
            out.update(FIXED_PARTS[part])
        else:
            raise KeyError(variant)
    return out


def _known(variant: str) -> bool:
    try:
        overrides_of(variant)
    except KeyError:
        return False
    return True


def bundled_sample_or_exit(alternative: str) -> str:
    """The bundled real sample as the default ``--data``; without it one ``Error:`` line naming ``alternative``."""
    from stlm_train.data.io import bundled_sample_root

    root = bundled_sample_root()
    if root is None:
        raise SystemExit("Error: --data not given and the bundled sample (../shared/data/mvtec_bottle_xs) "
                         f"is not there; {alternative}")
    return str(root)


def resolve_variants(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for name in GROUPS.get(part, [part]):
            if not _known(name):
                raise SystemExit(f"Error: --variants: unknown variant {name!r} (choose from "
                                 f"{', '.join([*GROUPS, *VARIANTS])}, tiled-<work size>, fa-grad-<0.A>, "
                                 "fa-loss-focal, self-texture, teacher-<recipe> or those joined by +)")
            names.append(name)
    return list(dict.fromkeys(names))


def run_one(variant: str, seed: int, args: argparse.Namespace, work: Path,
            base_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train + evaluate one (variant, seed), or re-finish its :data:`DERIVED_FROM` row's run (``base_row``: that
    row, whose steps it shares); the metrics row."""
    from stlm_train.training import TrainError, TrainOptions, refinish, train

    overrides = {k: (seed if v == "SEED" else v) for k, v in overrides_of(variant).items()}
    grid = getattr(args, "eval_grid", "model")
    evaluate = grid == "model" or "work_size" not in overrides
    out = work / f"{variant}-s{seed}"
    t0 = time.perf_counter()
    base = DERIVED_FROM.get(variant)
    kept = base is None and (out / "last.ckpt").is_file()
    if kept:  # a kept run of this row (its result superseded by a post-training default): finish it again
        fin = out.with_name(out.name + "-refinished")
        try:
            changes, had = kept_run_changes(out, variant, seed, args)
            res = refinish(out, fin, changes, evaluate=evaluate)
        except TrainError as e:
            raise SystemExit(f"Error: --keep-runs {out}: {e}") from None
        record = out / "metrics.json"  # the precision its steps ran in, as the run recorded it
        amp = bool(json.loads(record.read_text())["train"].get("amp", False)) if record.is_file() else False
        fa_in = had.fa_input
    elif base is not None:
        src = work / f"{base}-s{seed}"
        if not (src / "last.ckpt").is_file():
            raise SystemExit(f"Error: --variants {variant}: measured on the weights of {base} seed {seed}, but "
                             f"{src / 'last.ckpt'} is not there (run {base} in the same command, or pass "
                             "--keep-runs DIR holding it)")
        try:
            res = refinish(src, out, post_training_changes(variant, base), evaluate=evaluate)
        except TrainError as e:
            raise SystemExit(f"Error: --variants {variant}: {e}") from None
        amp = bool((base_row or {}).get("amp", False))  # rows from before the field: fp32 steps
        fa_in = trained_fa_input(base_row) if base_row is not None else expected_fa_input(base)
    else:
        opts = TrainOptions(data=args.data, out=str(out), category=args.category, config=args.config,
                            img_size=args.img_size, steps=args.steps, time_budget=args.time_budget, seed=seed,
                            progress=False, save_every=0, evaluate=evaluate, **overrides)
        try:
            opts.validate()
        except TrainError as e:
            raise SystemExit(f"Error: --variants {variant}: {e}") from None
        res = train(opts, log=lambda s: None)
        amp = bool(opts.amp)  # the precision the steps ran in (the trainer's own reading of it)
        fa_in = opts.fa_input
    metrics, eval_s, model_grid = res.metrics, None, None
    if grid != "model" and res.model_path is not None:  # on the images' own grid, timed (untiled rows keep both)
        from stlm_train.evaluate import evaluate_checkpoint

        model_grid = metrics  # the trainer's own evaluation (untiled rows), kept beside the original-grid one
        t1 = time.perf_counter()
        metrics = evaluate_checkpoint(res.model_path, args.data, category=args.category, grid=grid)
        eval_s = time.perf_counter() - t1
    if metrics is None:
        raise SystemExit(f"Error: --data {args.data}: no test split to evaluate")
    row = {"variant": variant, "seed": seed, "steps": res.steps, "train_seconds": round(res.seconds, 1),
           "wall_seconds": round(time.perf_counter() - t0, 1), "overrides": overrides, "amp": amp,
           "fa_input": fa_in, "fa_output": getattr(res.model.cfg, "fa_output", None),
           **({"derived_from": base} if base is not None else {}),
           **({"refinished_from": str(out)} if kept else {})}
    if eval_s is not None:
        row["eval_ms_per_image"] = round(1000 * eval_s / max(1, metrics["n_images"]), 1)
    row.update(metric_columns(metrics))
    if model_grid is not None:
        row["model_grid"] = metric_columns(model_grid)
    return row


def kept_run_changes(run: Path, variant: str, seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(the post-training options that finish the kept ``run`` as ``variant`` today, the options it trained with);
    its steps are reused: a row whose result a post-training default made stale needs no new training. An error
    when the run trained otherwise than the variant would (another option, data or budget)."""
    from stlm_train.training import POST_TRAINING_OPTIONS, TrainError, TrainOptions
    from stlm_train.training.options import IDENTITY_FIELDS, merge_resume_options
    from stlm_train.training.state import load_run_state

    state = load_run_state(run)
    overrides = {k: (seed if v == "SEED" else v) for k, v in overrides_of(variant).items()}
    want = TrainOptions(data=args.data, out=str(run), category=args.category, config=args.config,
                        img_size=args.img_size, seed=seed, **overrides)
    had = merge_resume_options(TrainOptions(data="", out=str(run)), state["options"], set())
    same_data = Path(str(had.data)).resolve() == Path(str(want.data)).resolve()
    differ = [k for k in IDENTITY_FIELDS if k not in POST_TRAINING_OPTIONS and k not in ("data", "train_images")
              and getattr(had, k) != getattr(want, k)] + ([] if same_data else ["data"])
    if not _same_training_images(run, had.train_images, want.train_images):
        differ.append("train_images")
    if args.steps is not None and int(state["step"]) != args.steps:
        differ.append(f"steps ({state['step']})")
    if args.time_budget is not None and abs(float(state["seconds"]) - 60 * args.time_budget) > 60:
        differ.append(f"time budget ({float(state['seconds']):.0f} s)")
    if differ:
        raise TrainError(f"it trained with other {', '.join(differ)} than {variant} seed {seed}; move it away to "
                         "train the row again")
    return {k: getattr(want, k) for k in POST_TRAINING_OPTIONS if getattr(had, k) != getattr(want, k)}, had


def _same_training_images(run: Path, had: str, want: str) -> bool:
    """Whether a kept run's stored ``train_images`` (a resolved count, or ``all``) is what ``want`` trains on:
    ``auto`` matches a count it resolved, and ``all`` where the run had no more images than ``auto`` keeps."""
    from stlm_train.checkpoint import read_file
    from stlm_train.training.sampling import AUTO_TRAIN_MIN_IMAGES

    if want != "auto" or had == "auto":
        return had == want
    if had != "all":
        return True
    model = run / "model.ckpt"
    n = read_file(model).get("train", {}).get("n_train_images") if model.is_file() else None
    return n is not None and int(n) <= AUTO_TRAIN_MIN_IMAGES


def trained_fa_input(row: dict[str, Any]) -> str:
    """The FA input a recorded row's model was trained with (rows from before the field: the official product,
    the trainer's only default then, unless the row set it)."""
    return row.get("fa_input", row.get("overrides", {}).get("fa_input", "product"))


def expected_fa_input(variant: str) -> str:
    """The FA input a variant trains with today (its override, else the trainer's default)."""
    from stlm_train.config import TRAIN_FA_INPUT

    return overrides_of(variant).get("fa_input", TRAIN_FA_INPUT)


def finished_fa_output(row: dict[str, Any]) -> str:
    """The FA output a recorded row's model was finished with (STLM rows from before the field: the head)."""
    return row.get("fa_output", "head")


def expected_fa_output(variant: str) -> str:
    """The FA output a variant's model gets today (its override, else the trainer's choice for its FA input)."""
    from stlm_train.training import TrainOptions

    o = overrides_of(variant)
    return TrainOptions(data="", out="", fa_input=o.get("fa_input", expected_fa_input(variant)),
                        fa_output=o.get("fa_output")).resolved_fa_output()


def split_stale(rows: list[dict[str, Any]], fa_head: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows still describing their variant, rows trained before a default they rely on changed): a ``current``
    row from before the FA prior, or its prior-alone output, became the default no longer stands for
    ``current``; it is kept in the file under ``superseded`` and the variant runs again (a kept run of it is
    re-finished, :func:`kept_run_changes`). ``fa_head``: the rows' config has an FA head (STFPM has none)."""
    keep, stale = [], []
    for r in rows:
        old = _known(r["variant"]) and (trained_fa_input(r) != expected_fa_input(r["variant"]) or (
            fa_head and finished_fa_output(r) != expected_fa_output(r["variant"])))
        (stale if old else keep).append(r)
    return keep, stale


def labelled_stale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Superseded rows with the FA input and output their models had in the variant name (rows superseded for
    different reasons are summarised apart)."""
    return [{**r, "variant": f"{r['variant']} ({trained_fa_input(r)}, {finished_fa_output(r)} output)"}
            for r in rows]


def post_training_changes(variant: str, base: str) -> dict[str, Any]:
    """The options ``variant`` sets differently from ``base`` (both over the trainer's defaults)."""
    from stlm_train.training import TrainOptions

    defaults = TrainOptions(data="", out="")
    a, b = overrides_of(variant), overrides_of(base)
    return {k: a.get(k, getattr(defaults, k)) for k in {*a, *b}
            if a.get(k, getattr(defaults, k)) != b.get(k, getattr(defaults, k))}


def run_order(variants: list[str]) -> list[str]:
    """``variants`` with each derived row's base before it (added when not asked for: its run is needed)."""
    out: list[str] = []
    for v in variants:
        base = DERIVED_FROM.get(v)
        if base is not None and base not in out:
            out.append(base)
        if v not in out:
            out.append(v)
    return out


def metric_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's METRICS as flat ``<map>_<metric>`` columns (STFPM has no TLM map: its tlm_* are None)."""
    return {f"{m}_{k}": (metrics[m] or {}).get(k) for m, k in METRICS}


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """mean +- sd per variant (in ``variants`` order, then any other variant the rows hold)."""
    out = []
    for v in dict.fromkeys([*variants, *(r["variant"] for r in rows)]):
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        s: dict[str, Any] = {"variant": v, "n": len(rs), "seeds": [r["seed"] for r in rs],
                             "steps": statistics.mean(r["steps"] for r in rs)}
        for key in [*(f"{m}_{k}" for m, k in METRICS), "eval_ms_per_image"]:
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            s[key] = ([statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0] if vals
                      else [None, None])
        out.append(s)
    return out


def _table(summary: list[dict[str, Any]]) -> list[str]:
    timed = any((s.get("eval_ms_per_image") or [None])[0] is not None for s in summary)
    head = ["variant", "seeds", "steps", *(f"{m.upper()} {k.replace('_', '-')}" for m, k in METRICS),
            *(["eval ms/img"] if timed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: list[Any], fmt: str = ".3f") -> str:
        return "–" if v[0] is None else f"{v[0]:{fmt}} +- {v[1]:{fmt}}"

    for s in summary:
        cells = [s["variant"], str(s["n"]), f"{s['steps']:.0f}", *(cell(s[f"{m}_{k}"]) for m, k in METRICS),
                 *([cell(s.get("eval_ms_per_image") or [None, None], ".0f")] if timed else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any],
             superseded: list[dict[str, Any]] | None = None) -> str:
    """The results table; ``superseded``: the summary of :func:`split_stale`'s rows, in a table of their own."""
    grid = meta.get("eval_grid", "model")
    lines = [f"# Accuracy: {meta['data']} ({meta['budget']}, config {meta['config']} at {meta['img_size']} px)",
             "", f"mean +- sd over seeds; fa-fnr / fa-fpr = defective test images missed / good test images "
             "flagged at the stored threshold. "
             + ("Pixel metrics on the test images' own grid (stlm-eval --grid original); eval ms/img: the "
                "evaluation pass per image, PyTorch eager, tiles included. " if grid == "original" else "")
             + f"Machine: {meta['machine']}. Command: `{meta['command']}`", "", *_table(summary)]
    if superseded:
        lines += ["", "## Superseded rows", "", "Trained or finished before a trainer default they relied on changed "
                  "(the FA input, `product+tlm` since 2026-12-07, or the FA output, the prior path alone since "
                  "2026-12-07); each row names the input and output its models had. Kept for the record, no "
                  "longer what their variant gives:", "", *_table(superseded)]
    return "\n".join(lines) + "\n"


def merged_history(earlier: str | None, mine: str) -> str:
    """``earlier`` ("a; then b") with ``mine`` appended unless it is already there."""
    parts = earlier.split("; then ") if earlier else []
    return "; then ".join(parts if mine in parts else [*parts, mine])


def same_setup(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether runs recorded under ``old`` meta data can be merged with new ones: same data (the same
    folder however it was spelled, relative or absolute), config, image size and budget."""
    def where(d: str | None) -> str | None:
        return d if d in (None, "generated") else str(Path(d).resolve())
    return where(old.get("data")) == where(new["data"]) and \
        all(old.get(k) == new[k] for k in ("config", "img_size", "budget")) and \
        old.get("eval_grid", "model") == new.get("eval_grid", "model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stlm_bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="MVTec-layout root or 'generated' (default: bundled sample)")
    p.add_argument("--category", default=None)
    p.add_argument("--config", default="paper")
    p.add_argument("--img-size", type=int, default=256)
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--steps", type=int, default=None)
    stop.add_argument("--time-budget", type=float, default=None, help="minutes of training per run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="current", help="comma list of variants or groups (ablation, ablation-full, "
                   "localisation, tiling); tiled-<W>: the current trainer with --work-size W")
    p.add_argument("--name", default=None, help="results file stem (default accuracy_<data>)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    p.add_argument("--keep-runs", default=None, metavar="DIR",
                   help="train into DIR/<variant>-s<seed> and keep the runs (model.ckpt for stlm-eval, stlm-infer, "
                   "python -m stlm_train.diagnostics); default: a temporary folder, deleted at the end")
    p.add_argument("--eval-grid", choices=("model", "original"), default="model",
                   help="pixel metrics on each model's own map grid (the trainer's evaluation) or on the test images' "
                   "own size (compare untiled and tiled rows); 'original' also times the evaluation per image")
    args = p.parse_args(argv)
    if args.steps is None and args.time_budget is None:
        args.steps = 150
    if args.data is None:
        args.data = bundled_sample_or_exit("pass --data ROOT or --data generated")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"Error: --seeds: expected comma-separated integers, got {args.seeds!r}") from None
    variants = run_order(resolve_variants(args.variants))
    name = args.name or f"accuracy_{Path(args.data).name}"
    json_path = Path(args.out_dir) / f"{name}.json"
    budget = f"{args.steps} steps" if args.steps is not None else f"{args.time_budget:g} min"
    meta = {"data": args.data, "category": args.category, "config": args.config, "img_size": args.img_size,
            "budget": budget, "machine": machine_line(), **({"eval_grid": args.eval_grid}
                                                             if args.eval_grid != "model" else {}),
            "command": "python -m stlm_bench.accuracy " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows: list[dict[str, Any]] = []
    superseded: list[dict[str, Any]] = []
    if json_path.is_file() and not args.fresh:
        old = json.loads(json_path.read_text())
        if same_setup(old.get("meta", {}), meta):
            from stlm_train.config import CONFIGS

            rows, stale = split_stale(old.get("runs", []), CONFIGS[args.config].family == "stlm")
            superseded = [*old.get("superseded", []), *stale]
            if rows:  # the merged rows keep the commands and machines that produced them
                for key in ("command", "machine"):
                    meta[key] = merged_history(old.get("meta", {}).get(key), meta[key])
    def publish() -> str:
        """Results so far -> JSON + Markdown (after every run, so an interrupted sweep keeps its rows)."""
        summary = summarize(rows, list(VARIANTS))
        doc = {"meta": meta, "summary": summary, "runs": rows, **({"superseded": superseded} if superseded else {})}
        return emit(markdown(summary, meta, summarize(labelled_stale(superseded), list(VARIANTS))), doc,
                    json_path=json_path,
                    markdown_path=json_path.with_suffix(".md"), echo=None)

    with tempfile.TemporaryDirectory(prefix="stlm-accuracy-") as tmp:
        work = Path(args.keep_runs) if args.keep_runs else Path(tmp)
        for v in variants:
            for seed in seeds:
                if any(r["variant"] == v and r["seed"] == seed for r in rows):
                    continue
                base_row = next((r for r in rows if r["variant"] == DERIVED_FROM.get(v) and r["seed"] == seed), None)
                row = run_one(v, seed, args, work, base_row)
                rows.append(row)
                print(f"{v:32s} seed {seed}: FA I-AUROC {row['fa_i_auroc']:.3f} P-AUROC {row['fa_p_auroc']:.3f} "
                      f"AUPRO {row['fa_aupro']:.3f} | TLM I-AUROC {float('nan') if row['tlm_i_auroc'] is None else row['tlm_i_auroc']:.3f} "
                      f"({row['steps']} steps, {row['wall_seconds']:.0f} s)", flush=True)
                publish()
    print(publish())
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
