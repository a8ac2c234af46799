"""Model families side by side: STLM and STFPM trained on the same data with the same time budget,
evaluated, exported and benchmarked on the same machine.

    nice -n 10 python -m stlm_bench.families --time-budget 3 --img-size 256      # the bundled real sample

Per family: image/pixel AUROC and AUPRO@0.3 on the test split (the deployed map), parameters and GFLOP
of the deployed model (STLM: the student-only graph; STFPM: teacher + student, both run at inference),
and ms per image (p50, batch 1, ``Detector.predict`` incl. pre/post-processing) for PyTorch eager and
every engine the export produced (``stlm_bench.bench.run_bench``). Both use the built-in weightless
teacher unless ``--teacher-<family>`` gives a file, so the accuracy here is the pipeline's, not the
papers' (they need ImageNet / SAM teachers). Results: ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from .accuracy import bundled_sample_or_exit
from .measure import machine_line
from .output import emit_beside, run_main, write_json

RESULTS = Path(__file__).resolve().parent / "results"
#: The official batch of each family's recipe (STLM: this trainer's default; STFPM: gdwang08/STFPM main.py).
RECIPE_BATCH = {"paper": 2, "small": 2, "stfpm": 32}
ENGINE_VARIANTS = ("ort/fp32", "ort/fp16", "openvino/fp32", "openvino/bf16")


def gflop_per_image(model: Any, img_size: int) -> float:
    """Forward GFLOP of one image (torch's FlopCounterMode: 2 x multiply-accumulates of conv/matmul)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, img_size, img_size, 3, dtype=torch.uint8)
    with FlopCounterMode(display=False) as fc:
        model.predict(x)
    return fc.get_total_flops() / 1e9


def run_family(config: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train, evaluate, export and benchmark one config; returns its row."""
    from stlm_export.pipeline import ExportOptions, export_engine
    from stlm_train import load_model
    from stlm_train.data import build_dataset
    from stlm_train.training import TrainOptions, holdout_split, train

    from .bench import load_labelled, parse_variants, run_bench

    n_train = len(holdout_split(len(build_dataset(args.data, "mvtec", args.category, "train", None)), 0.2)[0])
    # a batch larger than the training set only repeats images (same update, more time): cap it
    batch = min(RECIPE_BATCH.get(config, 2), n_train)
    teacher = getattr(args, f"teacher_{config}", None) or "builtin"
    run_dir = work / config
    t0 = time.perf_counter()
    res = train(TrainOptions(data=args.data, out=str(run_dir), category=args.category, config=config,
                             img_size=args.img_size, time_budget=args.time_budget, seed=args.seed, batch_size=batch,
                             teacher=teacher, progress=False, save_every=0), log=lambda s: None)
    train_wall = time.perf_counter() - t0
    model = load_model(res.model_path)
    family = getattr(model.cfg, "family", "stlm")
    row: dict[str, Any] = {
        "config": config, "family": family, "img_size": args.img_size, "teacher": teacher, "batch_size": batch,
        "steps": res.steps, "epochs": round(res.epochs, 2), "train_seconds": round(res.seconds, 1),
        "train_wall_seconds": round(train_wall, 1),
        "i_auroc": res.metrics["fa"]["i_auroc"], "p_auroc": res.metrics["fa"]["p_auroc"],
        "aupro": res.metrics["fa"]["aupro"],
        "params": int(sum(p.numel() for p in model.parameters())),
        "gflop": round(gflop_per_image(model, args.img_size), 3),
    }
    del model
    exp = export_engine(ExportOptions(ckpt=res.model_path, out=work / "engines" / config, fp16=True),
                        log=lambda s: None)
    row["export_parity"] = {r["artifact"]: {"max_abs_map": r["max_abs_map"], "pass": r["pass"]} for r in exp.parity}
    data = load_labelled(args.data, "mvtec", args.category, args.img_size, model_resize(exp.spec))
    report = run_bench(str(exp.engine_dir), reference=str(res.model_path),
                       variants=parse_variants(",".join(ENGINE_VARIANTS), exp.engine_dir), runs=args.runs,
                       warmup=2, threads=args.threads, data=data)
    ms = {"pytorch/fp32": report["reference"]["timings"][1]["p50_ms"]}
    acc = {"pytorch/fp32": report["reference"]["accuracy"]}
    for r in report["results"]:
        ms[r["label"]] = None if r["error"] else r["timings"][1]["p50_ms"]
        acc[r["label"]] = r["accuracy"]
    row.update(ms_per_image=ms, engine_accuracy=acc, environment=report["environment"])
    return row


def model_resize(spec: dict[str, Any]) -> str:
    return spec["preprocessing"]["resize"]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    labels = ["pytorch/fp32", *ENGINE_VARIANTS]
    head = ["family (config)", "teacher", "batch", "steps", "I-AUROC", "P-AUROC", "AUPRO@0.3", "params (M)",
            "GFLOP", *(f"ms/img {lab}" for lab in labels)]
    lines = [f"# Model families: {meta['data']} ({meta['budget']} of training each, {meta['img_size']} px)", "",
             f"Same data, same time budget, same machine ({meta['machine']}). Accuracy: the deployed map on the "
             "test split (eager fp32). ms/img: p50 of one `predict` call on one image (batch 1) incl. "
             f"pre/post-processing. 1-minute load average (other jobs share this machine, so absolute ms and "
             f"steps vary between runs): {', '.join(f'{k} {v}' for k, v in meta['load_average_1min'].items())}. "
             f"Command: `{meta['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)
    for r in rows:
        cells = [f"{r['family']} ({r['config']})", r["teacher"], str(r["batch_size"]), str(r["steps"]),
                 f(r["i_auroc"], ".3f"), f(r["p_auroc"], ".3f"), f(r["aupro"], ".3f"), f(r["params"] / 1e6, ".2f"),
                 f(r["gflop"], ".2f"), *(f(r["ms_per_image"].get(lab), ".1f") for lab in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Built-in teachers are random networks calibrated on the training images: these numbers measure "
              "the pipeline on a 5+5+5-image sample, not the papers' accuracy (STFPM needs the ImageNet "
              "ResNet-18, `--teacher resnet18-f37072fd.pth`; STLM a SAM / MobileSAM teacher)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stlm_bench.families", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="MVTec-layout root (default: the bundled sample)")
    p.add_argument("--category", default=None)
    p.add_argument("--configs", default="paper,stfpm", help="comma list of configs (one per family or more)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--time-budget", type=float, default=3.0, help="minutes of training per config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=10, help="timed runs per engine variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--teacher-paper", default=None, metavar="PATH", help="SAM/MobileSAM teacher for STLM")
    p.add_argument("--teacher-stfpm", default=None, metavar="PATH", help="resnet18-*.pth teacher for STFPM")
    p.add_argument("--name", default=None, help="results file stem (default families_<data>_<img>)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.data is None:
        args.data = bundled_sample_or_exit("pass --data ROOT")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    from stlm_train.config import CONFIGS

    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"Error: --configs: unknown {bad} (choose from {', '.join(sorted(CONFIGS))})")
    name = args.name or f"families_{Path(args.data).name}_{args.img_size}"
    json_path = Path(args.out_dir) / f"{name}.json"
    meta = {"data": args.data, "img_size": args.img_size, "budget": f"{args.time_budget:g} min",
            "seed": args.seed, "machine": machine_line(),
            "command": "python -m stlm_bench.families " + " ".join(sys.argv[1:] if argv is None else argv),
            "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stlm-families-") as tmp:
        for config in configs:
            row = run_family(config, args, Path(tmp))
            rows.append(row)
            meta["load_average_1min"][f"after_{config}"] = round(os.getloadavg()[0], 2)
            print(f"{row['family']:6s} ({config}): I-AUROC {row['i_auroc']:.3f} P-AUROC {row['p_auroc']:.3f} "
                  f"AUPRO {row['aupro']:.3f}, {row['steps']} steps, {row['params'] / 1e6:.2f} M params, "
                  f"{row['gflop']:.2f} GFLOP, " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms_per_image"].items()
                                                            if v is not None), flush=True)
            write_json(json_path, {"meta": meta, "rows": rows})
    emit_beside(markdown(rows, meta), {"meta": meta, "rows": rows}, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
