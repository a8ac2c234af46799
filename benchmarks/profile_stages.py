"""Where the time goes: per-stage latency of one image in PyTorch eager, ONNX Runtime and OpenVINO.

    python -m stlm_bench.profile_stages --engine engines/demo --json benchmarks/results/profile_1024.json

Rows: eager fp32, ORT fp32 (and ``model.int8.onnx`` when the engine has it), OpenVINO f32/bf16 of the
fp32 graph and the INT8 IR (``openvino/model.int8.xml``) with its float remainder at f32 and bf16.
``--ops`` adds, per runtime, where the kernel time goes by op type (e.g. QLinearMatMul vs the
DequantizeLinear/Transpose/Reshape left around it), which is what says why INT8 is or is not faster.

Stages: preprocessing (normalize), plain encoder, denoising encoder, shared decoder, FA head, and
post-processing (l2 products, TLM map, upsampling, top-k). Eager stages are timed with forward hooks;
ONNX Runtime with its built-in profiler and OpenVINO with its per-layer performance counters, both
mapped back to stages through the node names the exporter writes (``/plain/...``, ``/decoder/...``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .measure import environment
from .output import emit, run_main

STAGES = ("normalize", "plain", "denoising", "decoder", "fa_head", "post", "fused")
#: Untimed ONNX Runtime runs before profiling (see :func:`ort_profile`: the second run builds the memory pattern).
ORT_WARMUP_RUNS = 2


def stage_of(node_name: str) -> str:
    """'/plain/layers.0/...' -> 'plain'; other exporter names -> 'post'; nodes a runtime created by
    fusion lose the exporter's path (ORT: 'BiasGelu_token_6') and are counted as 'fused'."""
    if not node_name.startswith("/"):
        return "fused"
    head = node_name.strip("/").split("/", 1)[0]
    for s in STAGES[:5]:
        if head == s or head.startswith(s + "."):
            return s
    return "post"


def eager_profile(ckpt: str | None, img_size: int, runs: int, threads: int) -> dict[str, float]:
    import torch

    from stlm_train import STLM, get_config, load_model

    torch.set_num_threads(threads)
    model = load_model(ckpt, img_size=img_size) if ckpt else STLM(get_config("paper", img_size)).eval()
    totals: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}

    def pre(name):
        return lambda *_: starts.__setitem__(name, time.perf_counter())

    def post(name):
        return lambda *_: totals.__setitem__(name, totals[name] + time.perf_counter() - starts[name])

    for name in STAGES[:5]:
        mod = getattr(model, name)
        mod.register_forward_pre_hook(pre(name))
        mod.register_forward_hook(post(name))
    x = torch.randint(0, 256, (1, img_size, img_size, 3), dtype=torch.uint8)
    model.predict(x)  # warm-up
    totals.clear()
    t0 = time.perf_counter()
    for _ in range(runs):
        model.predict(x)
    total = (time.perf_counter() - t0) / runs * 1000
    out = {k: totals[k] / runs * 1000 for k in STAGES[:5]}
    out["post"] = total - sum(out.values())
    out["fused"] = 0.0
    out["total"] = total
    return out


def random_image(img_size: int) -> np.ndarray:
    """The profiles' input: one random uint8 (1, S, S, 3) image (timing does not depend on the pixels)."""
    return np.random.default_rng(0).integers(0, 256, (1, img_size, img_size, 3), dtype=np.uint8)


def ort_profile(onnx_path: Path, img_size: int, runs: int, threads: int,
                ops: dict[str, float] | None = None, x: np.ndarray | None = None) -> dict[str, float]:
    """Per-stage kernel time of the steady state; ``ops`` (if given) gets kernel time per ORT op type.

    Two untimed runs first, and only the runs after them counted: ONNX Runtime plans its memory pattern
    on the first run and allocates that block on the second, whose first-touch page faults (115,900 at
    1024 px here, a 2x slower run) all land in the stream executed first. Counting those runs is what
    made "the denoising stream take twice the plain stream" (issue 24): both streams are the same
    TinyViT and take the same time from the third run on.

    ``x``: the graph's input (default :func:`random_image`; a graph without fused preprocessing, such as
    the plain conversion of ``stlm_bench.vs_plain``, takes its normalised float NCHW tensor)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = random_image(img_size) if x is None else x
    name = sess.get_inputs()[0].name
    for _ in range(ORT_WARMUP_RUNS):
        sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {name: x})
    total = (time.perf_counter() - t0) / runs * 1000
    events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
    first = starts[ORT_WARMUP_RUNS] if len(starts) > ORT_WARMUP_RUNS else 0
    per: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev.get("ts", 0) >= first:
            per[stage_of(ev["args"].get("node_name", ev["name"]))] += ev["dur"] / 1000
            if ops is not None:
                op = ev["args"].get("op_name", "?")
                ops[op] = ops.get(op, 0.0) + ev["dur"] / 1000 / runs
    out = {k: per[k] / runs for k in STAGES}
    out["total"] = total
    return out


def openvino_profile(onnx_path: Path, img_size: int, runs: int, threads: int, precision: str,
                     ops: dict[str, float] | None = None, hint: str = "LATENCY",
                     x: np.ndarray | None = None, batch1: bool = False) -> dict[str, float]:
    """Per-stage time from the CPU plugin's counters; ``ops`` gets time per executed layer type
    (e.g. ``MatMul_I8`` style names appear as the ``exec_type`` the plugin chose); ``x`` as for
    :func:`ort_profile`. ``batch1``: compile a dynamic batch axis as 1, as the runtime does for single
    images (:mod:`stlm_deploy.backends.openvino`)."""
    import openvino as ov

    core = ov.Core()
    cfg = {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint,
           "INFERENCE_PRECISION_HINT": precision}
    model = core.read_model(str(onnx_path))
    shape = model.inputs[0].get_partial_shape()
    if batch1 and shape.rank.is_static and shape[0].is_dynamic:
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([1, *list(shape)[1:]])})
    compiled = core.compile_model(model, "CPU", cfg)
    req = compiled.create_infer_request()
    x = random_image(img_size) if x is None else x
    req.infer({0: x})
    per: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    for _ in range(runs):
        req.infer({0: x})
        for info in req.profiling_info:
            per[stage_of(info.node_name)] += info.real_time.total_seconds() * 1000
            if ops is not None:
                key = f"{info.node_type}:{info.exec_type}"
                ops[key] = ops.get(key, 0.0) + info.real_time.total_seconds() * 1000 / runs
    total = (time.perf_counter() - t0) / runs * 1000
    out = {k: per[k] / runs for k in STAGES}
    out["total"] = total
    return out


def _unpublished_qdq(engine_dir: Path, spec: Any) -> Path:
    """The export's Q/DQ graph rebuilt in a temp folder (same policy, same calibration images)."""
    from stlm_export.calib import load_images
    from stlm_export.int8.ort import ORT_INT8_POLICY, quantize_qdq

    parity = json.loads((engine_dir / "parity.json").read_text())
    paths = [Path(p) for p in ((parity.get("int8") or {}).get("data") or {}).get("calibration", {}).get("images", [])]
    if not paths:
        raise SystemExit(f"Error: {engine_dir}/parity.json: no int8 calibration images (export with --int8)")
    out = Path(tempfile.mkdtemp(prefix="stlm-prof-")) / "model.int8.onnx"
    quantize_qdq(engine_dir / "model.onnx", out, load_images(paths, spec.img_size, spec.preprocessing.resize),
                 ORT_INT8_POLICY)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, help="engine directory whose model.onnx is profiled")
    ap.add_argument("--ckpt", default=None, help="checkpoint for the eager run (default: random paper weights)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--ops", type=int, default=0, help="show the N op types with the most kernel time per runtime")
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch row")
    ap.add_argument("--quantize-ort", action="store_true",
                    help="engines without model.int8.onnx (e.g. it failed its gate): build the Q/DQ graph with the "
                         "export's policy from the calibration images listed in parity.json, and profile that")
    args = ap.parse_args(argv)
    from stlm_deploy.spec import load_spec, resolve_engine

    engine_dir, _ = resolve_engine(args.engine)
    spec = load_spec(engine_dir)
    onnx_path = engine_dir / "model.onnx"
    s = spec.img_size
    ops: dict[str, dict[str, float]] = defaultdict(dict)
    rows: dict[str, dict[str, float]] = {}
    if not args.no_eager:
        rows["pytorch eager fp32"] = eager_profile(args.ckpt, s, args.runs, args.threads)
    rows["onnxruntime fp32"] = ort_profile(onnx_path, s, args.runs, args.threads, ops["onnxruntime fp32"])
    int8_onnx = engine_dir / "model.int8.onnx"
    if not int8_onnx.is_file() and args.quantize_ort:
        int8_onnx = _unpublished_qdq(engine_dir, spec)
    if int8_onnx.is_file():
        rows["onnxruntime int8 (Q/DQ)"] = ort_profile(int8_onnx, s, args.runs, args.threads,
                                                      ops["onnxruntime int8 (Q/DQ)"])
    graphs = [("openvino", onnx_path)]
    int8_ir = engine_dir / "openvino" / "model.int8.xml"
    if int8_ir.is_file():
        graphs.append(("openvino int8", int8_ir))
    for label, path in graphs:
        for prec in ("f32", "bf16"):
            name = f"{label} {prec}" if label == "openvino" else f"{label} + {prec}"
            try:
                rows[name] = openvino_profile(path, s, args.runs, args.threads, prec, ops[name])
            except Exception as e:  # noqa: BLE001 - not every CPU runs bf16
                print(f"{name}: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
    lines = [f"Per-stage time of one {s}x{s} image, ms ({args.threads} threads; ORT/OpenVINO stages are summed "
             "kernel times, 'total' is wall clock)", "",
             "| runtime | " + " | ".join(STAGES) + " | total |", "|---|" + "---|" * (len(STAGES) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in STAGES) + f" | {r['total']:.1f} |")
    if args.ops:
        for name, per in ops.items():
            if not per:
                continue
            total = sum(per.values()) or 1.0
            top = sorted(per.items(), key=lambda kv: -kv[1])[: args.ops]
            lines += ["", f"{name}: kernel time by op type (top {args.ops} of {len(per)})", "",
                      "| op | ms | share |", "|---|---|---|"]
            lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in top]
    text = "\n".join(lines) + "\n"
    emit(text, {"img_size": s, "rows": rows, "ops": {k: v for k, v in ops.items() if v},
                "environment": environment(args.threads)}, json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
