"""The cheap graph-level levers on CPU, measured in one run: what each buys at batch 1.

    python -m stlm_bench.cpu_levers --engine engines/bottle_256 --threads 2 --runs 10 \\
        --json benchmarks/results/cpu_levers_256.json --markdown benchmarks/results/cpu_levers_256.md

Rows (p50 of one ``infer`` on one image, no pre/post-processing, same process, back to back):

* ONNX Runtime fp32 as exported (ORT_ENABLE_ALL already fuses LayerNorm, Gelu, MatMul+bias) vs the
  ``onnxruntime.transformers`` optimizer (model_type ``vit``: attention/SkipLayerNorm fusions where the
  pattern matches), and the Q/DQ ``model.int8.onnx`` when present, next to two INT8 variants that
  show which kernels ONNX Runtime really runs on x86 (``kernels``: op types of the session's optimised
  graph): the same static Q/DQ recipe with unsigned activations (U8S8), and dynamic quantisation of the
  MatMuls (``DynamicQuantizeMatMul``: activations quantised per call, no calibration);
* OpenVINO IRs (fp32 graph at f32/bf16, INT8 IR with an f32/bf16 remainder) under the LATENCY and the
  THROUGHPUT hint, and with 1 vs ``--threads`` inference threads;
* the batch dimension (dynamic in the default export) made static at load time: ORT's free-dimension
  override, OpenVINO's ``reshape`` to ``[1, H, W, 3]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .measure import environment, time_fn
from .output import emit, run_main


def _ort(path: Path, threads: int, x: np.ndarray, runs: int, static_batch: bool = False) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if static_batch:  # the dynamic batch dim pinned: ORT folds the shape arithmetic of every reshape
        so.add_free_dimension_override_by_name("N", int(x.shape[0]))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return time_fn(partial(sess.run, None, {name: x}), runs=runs, warmup=2).p50_ms


INT8_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConv", "MatMulNBits",
                "MatMul", "FusedMatMul", "Conv", "DequantizeLinear", "QuantizeLinear")


def _kernels(path: Path, tmp: Path) -> dict[str, int]:
    """Op types ONNX Runtime runs after its own graph optimisation (int8 kernels vs DQ + float)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp / f"{path.stem}.ort-optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    return {k: ops.count(k) for k in INT8_KERNELS if ops.count(k)}


def _int8_variants(fp32: Path, tmp: Path, images: np.ndarray) -> dict[str, Path]:
    """The U8S8 static and the dynamic INT8 models of ``fp32`` (the export's node exclusions)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from stlm_export.int8.ort import ORT_INT8_POLICY, _excluded, _Reader

    pre = tmp / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
    model = onnx.load(str(pre))
    excluded = _excluded(model, ORT_INT8_POLICY.exclude_prefixes)
    u8s8, dyn = tmp / "u8s8.onnx", tmp / "dynamic.onnx"
    quantize_static(str(pre), str(u8s8), _Reader(model.graph.input[0].name, images), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ORT_INT8_POLICY.op_types), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                    calibrate_method=CalibrationMethod.MinMax)
    quantize_dynamic(str(pre), str(dyn), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=excluded, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"static Q/DQ U8S8 (same op set)": u8s8, "dynamic MatMul (DynamicQuantizeMatMul)": dyn}


def _ov(path: Path, threads: int, x: np.ndarray, runs: int, precision: str, hint: str,
        static_batch: bool = False) -> float:
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    core = ov.Core()
    model = core.read_model(str(path))
    if static_batch:  # a static model: no runtime shape inference, memory planned once
        model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
    req = core.compile_model(model, "CPU", cfg).create_infer_request()
    return time_fn(partial(req.infer, {0: x}), runs=runs, warmup=2).p50_ms


def _transformer_optimized(path: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type="vit", num_heads=0, hidden_size=0, opt_level=1)
    opt.save_model_to_file(str(out))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--int8-variants", action="store_true",
                    help="also build and time the U8S8 static and the dynamic ORT INT8 models (kernel study)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    from stlm_deploy.spec import load_spec, resolve_engine

    engine_dir, _ = resolve_engine(args.engine)
    s = load_spec(engine_dir).img_size
    x = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    t, n = args.threads, args.runs
    rows: list[dict[str, Any]] = []

    def add(engine: str, lever: str, ms: float, **extra: Any) -> None:
        rows.append({"engine": engine, "lever": lever, "p50_ms": ms, **extra})
        print(f"{engine:28s} {lever:44s} {ms:8.1f} ms", file=sys.stderr)

    add("ort fp32", "as exported (ORT_ENABLE_ALL)", _ort(engine_dir / "model.onnx", t, x, n))
    add("ort fp32", "batch dim pinned to 1", _ort(engine_dir / "model.onnx", t, x, n, static_batch=True))
    with tempfile.TemporaryDirectory(prefix="stlm-levers-") as tmp:
        opt = Path(tmp) / "opt.onnx"
        try:
            fused = _transformer_optimized(engine_dir / "model.onnx", opt)
            add("ort fp32", "onnxruntime.transformers optimizer (vit)", _ort(opt, t, x, n), fused=fused)
        except Exception as e:  # noqa: BLE001 - the optimizer is best-effort on a custom graph
            rows.append({"engine": "ort fp32", "lever": "transformers optimizer", "error": str(e).splitlines()[0]})
        if (engine_dir / "model.int8.onnx").is_file():
            add("ort int8 (Q/DQ)", "as exported (S8S8)", _ort(engine_dir / "model.int8.onnx", t, x, n),
                kernels=_kernels(engine_dir / "model.int8.onnx", Path(tmp)))
        if args.int8_variants:
            calib = np.random.default_rng(1).integers(0, 256, (4, s, s, 3), dtype=np.uint8)
            for lever, path in _int8_variants(engine_dir / "model.onnx", Path(tmp), calib).items():
                add("ort int8", lever, _ort(path, t, x, n), kernels=_kernels(path, Path(tmp)))
    irs = [("openvino fp32 graph", engine_dir / "openvino" / "model.xml")]
    if (engine_dir / "openvino" / "model.int8.xml").is_file():
        irs.append(("openvino int8 IR", engine_dir / "openvino" / "model.int8.xml"))
    for name, path in irs:
        for prec in ("f32", "bf16"):
            add(f"{name} + {prec}", f"LATENCY hint, {t} threads", _ov(path, t, x, n, prec, "LATENCY"))
            add(f"{name} + {prec}", f"LATENCY hint, {t} threads, static batch 1",
                _ov(path, t, x, n, prec, "LATENCY", static_batch=True))
            add(f"{name} + {prec}", f"THROUGHPUT hint, {t} threads", _ov(path, t, x, n, prec, "THROUGHPUT"))
            if t > 1:
                add(f"{name} + {prec}", "LATENCY hint, 1 thread", _ov(path, 1, x, n, prec, "LATENCY"))
    lines = [f"### CPU levers — `{engine_dir}` at {s} px, batch 1 (p50 of {n} runs, same process)", "",
             "| engine | lever | p50 ms |", "|---|---|---|"]
    lines += [f"| {r['engine']} | {r['lever']} | " + (f"{r['p50_ms']:.1f}" if "p50_ms" in r else f"error: {r['error'][:80]}")
              + " |" for r in rows]
    fused = next((r.get("fused") for r in rows if r.get("fused")), None)
    if fused:
        lines += ["", "Transformer optimizer fusions: " + ", ".join(f"{k} {v}" for k, v in fused.items())]
    kern = [r for r in rows if r.get("kernels")]
    if kern:
        lines += ["", "ONNX Runtime kernels after its graph optimisation (int8 kernels vs DequantizeLinear + float):", "",
                  "| engine | lever | kernels |", "|---|---|---|"]
        lines += [f"| {r['engine']} | {r['lever']} | " + ", ".join(f"{k} {v}" for k, v in r["kernels"].items()) + " |"
                  for r in kern]
    text = "\n".join(lines) + "\n"
    emit(text, {"engine": str(engine_dir), "img_size": s, "rows": rows, "environment": environment(t)},
         json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
