"""Which ops stay float in ``model.int8.onnx``: quantise with each candidate op set, measure, compare.

    python -m stlm_bench.int8_sensitivity --engine engines/bottle_256 --val-data ../shared/data/mvtec_bottle_xs \\
        --json benchmarks/results/int8_sensitivity_256.json --markdown benchmarks/results/int8_sensitivity_256.md

Every candidate is a :class:`stlm_export.int8.ort.QdqPolicy` applied to the engine's verified fp32
``model.onnx`` with the calibration images the export used (listed in its parity.json), then gated
against fp32 on the labelled validation images with the export's own gate
(:func:`stlm_export.int8.gate.int8_compare`) and timed (ONNX Runtime CPU, batch 1). The rows are the
evidence behind :data:`stlm_export.int8.ort.ORT_INT8_POLICY` (docs/int8.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any


from .measure import environment, time_fn
from .output import emit, run_main

CANDIDATES = {
    "policy: MatMul+Conv+Gemm, FA head float": {},
    "MatMul only": {"op_types": ("MatMul",)},
    "Conv only": {"op_types": ("Conv",)},
    "+ FA head quantised": {"exclude_prefixes": ()},
    "+ Add, Mul (residuals, l2 products)": {"op_types": ("MatMul", "Conv", "Gemm", "Add", "Mul")},
    "+ Add, Mul, Softmax, LayerNorm": {"op_types": ("MatMul", "Conv", "Gemm", "Add", "Mul", "Softmax",
                                                     "LayerNormalization")},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--val-data", required=True, help="labelled MVTec-style folder (test/, ground_truth/)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    from stlm_deploy.backends.ort import OrtBackend
    from stlm_deploy.spec import load_spec, resolve_engine
    from stlm_export.calib import load_images
    from stlm_export.gate import backend_outputs
    from stlm_export.int8.data import int8_validation
    from stlm_export.int8.gate import int8_compare
    from stlm_export.int8.ort import QdqPolicy, op_type_sensitivity

    engine_dir, _ = resolve_engine(args.engine)
    spec = load_spec(engine_dir)
    parity = json.loads((engine_dir / "parity.json").read_text())
    int8 = parity.get("int8") or {}
    paths = (int8.get("data") or {}).get("calibration", {}).get("images")
    if not paths:
        print(f"Error: {engine_dir}/parity.json: no int8 calibration images (export with --int8 first)", file=sys.stderr)
        return 1
    s, resize = spec.img_size, spec.preprocessing.resize
    calib = load_images([Path(p) for p in paths], s, resize)
    val = int8_validation(args.val_data, None, s, resize, None)
    fp32_backend = OrtBackend(engine_dir / "model.onnx", threads=args.threads)
    fp32 = backend_outputs(fp32_backend, val.images)

    def timed(path: Path) -> float:
        with OrtBackend(path, threads=args.threads) as b:
            x = {b.input_name: val.images[:1]}
            return time_fn(partial(b.infer, x), runs=args.runs, warmup=1).p50_ms

    def measure(path: Path) -> dict[str, Any]:
        got = backend_outputs(OrtBackend(path, threads=args.threads), val.images)
        rec = int8_compare(fp32, got, val.labels, val.masks, spec.thresholds.image, artifact=path.name,
                           backend="onnxruntime-cpu", image_source=val.source)
        return {**rec.metrics, "pass": rec.passed, "failures": rec.failures, "p50_ms": timed(path)}

    fp32_ms = timed(engine_dir / "model.onnx")
    rows = op_type_sensitivity(engine_dir / "model.onnx", calib, val.images, measure,
                               [(k, QdqPolicy(**v)) for k, v in CANDIDATES.items()])
    lines = [f"### INT8 Q/DQ sensitivity — `{engine_dir}` at {s} px ({args.threads} threads)", "",
             f"Calibration: {len(calib)} images from the export's parity.json; validation: {len(val)} images "
             f"({val.source}). ONNX Runtime fp32 p50: {fp32_ms:.1f} ms.", "",
             "| candidate | int8 MatMul/Conv/Add/Mul/Softmax/LN nodes | Δ image AUROC | Δ pixel AUROC | agreement "
             "| max abs Δmap | mean abs Δmap | Spearman | p50 ms | gate |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        q = r["quantized_by_op"]
        counts = "/".join(str(q.get(k, 0)) for k in ("MatMul", "Conv", "Add", "Mul", "Softmax", "LayerNormalization"))
        lines.append(f"| {r['candidate']} | {counts} | {f(r['image_auroc_drop'], '+.4f')} | "
                     f"{f(r['pixel_auroc_drop'], '+.4f')} | {r['agreement']:.0%} | {f(r['max_abs_map'], '.2e')} | "
                     f"{f(r['mean_abs_map'], '.2e')} | {f(r['spearman'], '.3f')} | {r['p50_ms']:.1f} | "
                     f"{'pass' if r['pass'] else 'FAIL'} |")
    lines.append("")
    lines.append("Δ = fp32 minus int8 (positive = int8 worse); gate: both Δ <= 0.01 and agreement >= 98 %.")
    text = "\n".join(lines) + "\n"
    emit(text, {"engine": str(engine_dir), "img_size": s, "fp32_p50_ms": fp32_ms, "rows": rows,
                "validation": val.source, "environment": environment(args.threads)},
         json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
