"""Where the time goes: per-stage latency of one image in PyTorch eager, ONNX Runtime and OpenVINO.

    python -m stlm_bench.profile_stages --engine engines/demo --img-size 1024 --json benchmarks/results/profile_1024.json

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

import numpy as np

from .timing import environment, write_json

STAGES = ("normalize", "plain", "denoising", "decoder", "fa_head", "post", "fused")


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


def ort_profile(onnx_path: Path, img_size: int, runs: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (1, img_size, img_size, 3), dtype=np.uint8)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {name: x})
    total = (time.perf_counter() - t0) / runs * 1000
    events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per[stage_of(ev["args"].get("node_name", ev["name"]))] += ev["dur"] / 1000
    n_runs = runs + 1  # the profiler saw the warm-up too
    out = {k: per[k] / n_runs for k in STAGES}
    out["total"] = total
    return out


def openvino_profile(onnx_path: Path, img_size: int, runs: int, threads: int, precision: str) -> dict[str, float]:
    import openvino as ov

    core = ov.Core()
    cfg = {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
           "INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", cfg)
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).integers(0, 256, (1, img_size, img_size, 3), dtype=np.uint8)
    req.infer({0: x})
    per: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    for _ in range(runs):
        req.infer({0: x})
        for info in req.profiling_info:
            per[stage_of(info.node_name)] += info.real_time.total_seconds() * 1000
    total = (time.perf_counter() - t0) / runs * 1000
    out = {k: per[k] / runs for k in STAGES}
    out["total"] = total
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, help="engine directory whose model.onnx is profiled")
    ap.add_argument("--ckpt", default=None, help="checkpoint for the eager run (default: random paper weights)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from stlm_deploy.spec import load_spec, resolve_engine

    engine_dir, _ = resolve_engine(args.engine)
    spec = load_spec(engine_dir)
    onnx_path = engine_dir / "model.onnx"
    s = spec.img_size
    rows: dict[str, dict[str, float]] = {
        "pytorch eager fp32": eager_profile(args.ckpt, s, args.runs, args.threads),
        "onnxruntime fp32": ort_profile(onnx_path, s, args.runs, args.threads),
        "openvino f32": openvino_profile(onnx_path, s, args.runs, args.threads, "f32"),
    }
    try:
        rows["openvino bf16"] = openvino_profile(onnx_path, s, args.runs, args.threads, "bf16")
    except Exception as e:  # noqa: BLE001 - not every CPU runs bf16
        print(f"openvino bf16: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
    print(f"Per-stage time of one {s}x{s} image, ms ({args.threads} threads; ORT/OpenVINO stages are summed "
          "kernel times, 'total' is wall clock)\n")
    print("| runtime | " + " | ".join(STAGES) + " | total |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in STAGES) + f" | {r['total']:.1f} |")
    if args.json:
        write_json(args.json, {"img_size": s, "rows": rows, "environment": environment(args.threads)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
