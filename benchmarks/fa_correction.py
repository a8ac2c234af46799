"""How much of a trained FA map is the TLM prior and how much the head's learned correction, on real defects.

An FA head with the TLM prior path (``fa_input`` ``product+tlm`` or ``tlm``) outputs
``sigmoid(prior(log distances) + correction)``, the correction being the official head's output (its last
1x1 convolution is linear). Scaling that convolution by ``alpha`` scales the correction exactly: alpha 0 is the
trained prior alone (the TLM map's ranking with learned per-level weights; what a model with ``fa_output``
"prior", the trainer's default, outputs), 1 is the head's output (``fa_output`` "head"). The
correction is learned on pseudo anomalies only; this measures, on labelled test images, whether it helps
real defects (each checkpoint evaluated as trained, nothing retrained).

    python -m stlm_bench.fa_correction --runs runs/loc_bottle_xs/*/model.ckpt --name fa_correction_bottle_xs

Results: ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .accuracy import bundled_sample_or_exit
from .measure import machine_line
from .output import emit_beside, run_main

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _metrics(pred: Any) -> dict[str, dict[str, float]]:
    """FA and TLM image / pixel AUROC and AUPRO of one prediction pass (the evaluator's own metrics)."""
    from stlm_train.evaluate import metrics_from_predictions

    out = metrics_from_predictions(pred)
    return {name: {"image_auroc": out[name]["i_auroc"], "pixel_auroc": out[name]["p_auroc"],
                   "aupro": out[name]["aupro"]} for name in ("fa", "tlm")}


def sweep(ckpt: Path, data: str, category: str | None, alphas: tuple[float, ...]) -> dict[str, Any]:
    """FA metrics of one checkpoint at each correction scale, and its TLM map's."""
    import torch

    from stlm_train.evaluate import load_for_eval, model_split, predict_dataset, resolve_eval_data

    model, _ = load_for_eval(ckpt)
    head = getattr(model, "fa_head", None)
    if head is None or head.prior is None:
        raise ValueError(f"{ckpt}: expected an STLM checkpoint whose FA head has the TLM prior path "
                         f"(fa_input product+tlm or tlm)")
    fa_output = model.cfg.fa_output
    model.cfg = replace(model.cfg, fa_output="head")  # the sweep scales the head's correction: compute it
    with tempfile.TemporaryDirectory() as tmp:
        root = resolve_eval_data(data, model.cfg.img_size, tmp)
        dataset = model_split(model, root, "mvtec", category, "test")
        last = head.head[-1]
        weight, bias = last.weight.detach().clone(), last.bias.detach().clone()
        rows: dict[str, Any] = {}
        try:
            for a in alphas:
                with torch.no_grad():
                    last.weight.copy_(weight * a)
                    last.bias.copy_(bias * a)
                measured = _metrics(predict_dataset(model, dataset))
                rows[f"{a:g}"] = measured["fa"]
        finally:
            with torch.no_grad():
                last.weight.copy_(weight)
                last.bias.copy_(bias)
        tlm = measured["tlm"]  # the students' map: the same at every alpha
    return {"ckpt": str(ckpt), "fa_input": model.cfg.fa_input, "fa_output": fa_output, "fa": rows, "tlm": tlm,
            "prior_weight": [round(float(w), 4) for w in head.prior.weight.detach().flatten()],
            "prior_bias": round(float(head.prior.bias.detach().item()), 4)}


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    alphas = list(runs[0]["fa"])
    lines = [f"# FA correction scale: {meta['data']}", "",
             "FA map with the head's learned correction scaled by alpha (0: the trained TLM prior alone, 1: the "
             f"trained model), mean +- sd over {len(runs)} checkpoints. {meta['machine']}. "
             f"Command: `{meta['command']}`", "",
             "| map | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for a in alphas:
        lines.append(f"| FA, alpha {a} | " + " | ".join(_cell([r["fa"][a][m] for r in runs])
                                                     for m in ("image_auroc", "pixel_auroc", "aupro")) + " |")
    lines.append("| TLM | " + " | ".join(_cell([r["tlm"][m] for r in runs])
                                        for m in ("image_auroc", "pixel_auroc", "aupro")) + " |")
    lines += ["", "Per checkpoint, pixel AUROC at each alpha:", "",
              "| checkpoint | fa_input | " + " | ".join(alphas) + " | TLM |",
              "|---|---|" + "---|" * (len(alphas) + 1)]
    for r in runs:
        lines.append(f"| {r['ckpt']} | {r['fa_input']} | "
                     + " | ".join(f"{r['fa'][a]['pixel_auroc']:.3f}" for a in alphas)
                     + f" | {r['tlm']['pixel_auroc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="model.ckpt files of one data set")
    ap.add_argument("--data", default=None, help="MVTec-layout root or 'generated' (default: the bundled sample)")
    ap.add_argument("--category", default=None)
    ap.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS))
    ap.add_argument("--name", default="fa_correction")
    args = ap.parse_args(argv)
    data = args.data or bundled_sample_or_exit("--data DIR")
    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        raise ValueError(f"--alphas: expected comma-separated numbers, got {args.alphas!r}") from None
    for ckpt in args.runs:
        if not Path(ckpt).is_file():
            raise ValueError(f"{ckpt}: no such checkpoint file")
    runs = []
    for ckpt in args.runs:
        runs.append(sweep(Path(ckpt), data, args.category, alphas))
        print(f"{ckpt}: FA pixel AUROC " + " ".join(f"{a}:{v['pixel_auroc']:.3f}" for a, v in runs[-1]["fa"].items())
              + f" | TLM {runs[-1]['tlm']['pixel_auroc']:.3f}", flush=True)
    meta = {"data": data, "category": args.category, "machine": machine_line(),
            "command": "python -m stlm_bench.fa_correction " + " ".join(sys.argv[1:] if argv is None else argv)}
    emit_beside(markdown(runs, meta), {"meta": meta, "runs": runs}, RESULTS / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
