"""The project's engines beside the plain conversion of the official graph, in one run, at each size.

    python -m stlm_bench.vs_plain --ckpt runs/bottle/model.ckpt --sizes 256,1024 --threads 2 --runs 10

What a user has without this toolkit: the official STLM inference written as the official code runs it
(each student, then the shared decoder, per stream; FA head; bilinear upsampling; top-k score) on the
same weights, exported with a plain ``torch.onnx.export(model, x, "stlm.onnx")`` (TorchScript exporter,
opset 17, its defaults: static batch 1, constants folded, no simplifier, no fused preprocessing) and run
directly by ONNX Runtime (fp32) and OpenVINO (f32, and bf16 / f16 where the CPU has them). Beside it:
the project's engine from ``stlm-export`` (exported here unless ``--engine SIZE=DIR`` names one),
every variant it has, and what ``backend="auto"`` runs right after the export; PyTorch eager fp32 is the
common yardstick.

Timing: one graph call on one image (batch 1), the input already prepared (uint8 NHWC for the engines,
normalised float NCHW for the plain graph, whose host-side normalisation is *not* counted), after
``--warmup`` calls; all rows of one size are timed in interleaved rounds (each round calls every row once,
in a rotating order), so a load change on a shared machine hits every row alike. Each row also reports
max |Δmap| against the engine's ORT fp32 output on the same image (the plain conversion must match it
within 1e-4: same weights, same numerics).

With ``--profile-sizes`` (default: the smallest size): per-stage (plain encoder, denoising encoder,
decoder, FA head, post) and per-op-type kernel time of the ORT fp32 and OpenVINO f32/bf16 rows of both
graphs (:mod:`stlm_bench.profile_stages`).

Results: a table on stdout, ``--out-dir/<name>.json`` and ``.md`` (default ``benchmarks/results/vs_plain_<sizes>``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .measure import environment
from .output import emit, run_main

RESULTS = Path(__file__).resolve().parent / "results"
PLAIN_OPSET = 17
#: OpenVINO inference precisions tried on each graph, with the capability they need.
OV_PRECISIONS = (("fp32", None), ("bf16", "BF16"), ("fp16", "FP16"))
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


# --------------------------------------------------------------------------------- the plain graph
def official_graph(stlm: Any) -> Any:
    """The official STLM inference as one ``nn.Module`` over the same (shared) submodules.

    Normalised float (1, 3, S, S) in; ``anomaly_map`` (1, S, S) and ``score`` (1,) out. Each stream runs its
    student and then the shared decoder on its own (the official ``encoderT``/``encoderS`` + ``Batch_Sam``
    path), with no fused preprocessing and no batching of the two streams: nothing of the project's fusion.
    Submodule names match the project's graph (``plain``, ``denoising``, ``decoder``, ``fa_head``) so the
    stage profile maps both graphs alike.
    """
    import torch
    from torch import nn

    from stlm_train.modeling import topk_score, upsample
    from stlm_train.modeling.stlm import fa_prior

    class OfficialGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain, self.denoising, self.decoder, self.fa_head = \
                stlm.plain, stlm.denoising, stlm.decoder, stlm.fa_head
            self.size, self.k = int(stlm.cfg.img_size), int(stlm.cfg.top_k)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fp = self.decoder(self.plain(x))
            fd = self.decoder(self.denoising(x))
            # through its own fa_head (not stlm.fa_logits), so the ONNX nodes keep the /fa_head/ stage names; the
            # same FA output as the model's (its prior path alone with fa_output "prior")
            if stlm.cfg.fa_output == "prior":
                prob = torch.sigmoid(self.fa_head.prior(fa_prior(fp, fd)))
            else:
                prob = self.fa_head(*stlm.fa_head_inputs(fp, fd))
            amap = upsample(prob, (self.size, self.size))
            return amap, topk_score(amap, self.k)

    return OfficialGraph().eval()


def export_plain(stlm: Any, path: Path) -> Path:
    """``torch.onnx.export`` of :func:`official_graph` with the exporter's defaults (static batch 1)."""
    import warnings

    import torch

    s = int(stlm.cfg.img_size)
    x = torch.zeros(1, 3, s, s)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(official_graph(stlm), (x,), str(path), dynamo=False, opset_version=PLAIN_OPSET,
                          input_names=["x"], output_names=["anomaly_map", "score"])
    return path


# ------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One thing timed: its label, what it is and a zero-argument call that runs one image."""

    label: str
    graph: str  # "eager", "project" or "plain"
    runtime: str  # "pytorch", "onnxruntime", "openvino"
    precision: str
    call: Callable[[], dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)
    gated: bool | None = None
    times: list[float] = field(default_factory=list)
    max_abs_map: float | None = None

    def summary(self) -> dict[str, Any]:
        t = np.asarray(self.times)
        return {"label": self.label, "graph": self.graph, "runtime": self.runtime, "precision": self.precision,
                "gated": self.gated, "notes": self.notes, "runs": int(t.size),
                "p50_ms": float(np.median(t)) if t.size else None, "min_ms": float(t.min()) if t.size else None,
                "mean_ms": float(t.mean()) if t.size else None, "max_abs_map_vs_ort_fp32": self.max_abs_map}


def _ort_call(path: Path, threads: int, x: np.ndarray) -> Callable[[], dict[str, np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name, outs = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    return lambda: dict(zip(outs, sess.run(None, {name: x})))


def _ov_call(path: Path, threads: int, precision: str, x: np.ndarray) -> tuple[Callable[[], dict], str]:
    """A compiled model's one-image call and the inference precision OpenVINO reports it runs at."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": _OV_HINT[precision]})
    req = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.outputs]

    def call() -> dict[str, np.ndarray]:
        res = req.infer({0: x})
        return {n: np.array(res[p]) for n, p in zip(names, compiled.outputs)}

    t = compiled.get_property(hints.inference_precision)
    used = (t.get_type_name() if hasattr(t, "get_type_name") else str(t)).lower()
    return call, {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(used, used)


def _ov_capabilities() -> set[str]:
    import openvino as ov

    return {str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def engine_rows(engine: Path, image: np.ndarray, threads: int) -> list[Row]:
    """Every variant of the project's engine (through the runtime's own loader) plus what auto runs."""
    from stlm_deploy import Detector
    from stlm_deploy.spec import load_spec

    from .bench import default_variants

    spec = load_spec(engine)
    rows: list[Row] = []
    for v in [None, *default_variants(engine)]:
        if v is not None and v.backend == "tensorrt":
            continue
        try:
            det = Detector.load(engine, backend=v.backend if v else "auto", precision=v.precision if v else None,
                                threads=threads)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            print(f"{engine}: {v.label if v else 'auto'}: not run ({str(e).splitlines()[0]})", file=sys.stderr)
            continue
        b = det.backend
        used = b.precision or "fp32"
        if v is not None and v.precision not in (None, used):
            det.close()  # e.g. bf16 downgraded on a CPU without BF16: not that variant
            continue
        runtime = {"ort": "onnxruntime", "openvino": "openvino"}[b.name]
        label = (f"auto after export -> {b.name}/{used}" if v is None
                 else f"engine {b.name}/{used}" + (" (INT8 IR)" if used == "int8" and b.name == "openvino" else ""))
        variant = spec.variants.get(f"{b.name}/{used}")
        row = Row(label, "project", runtime, used, lambda b=b: b.infer({b.input_name: image}),
                  gated=variant.gated if variant is not None else None)
        if v is None:
            row.notes = [n for n in det.selection_notes if n.startswith(("timings:", "static:"))]
        rows.append(row)
    return rows


def plain_rows(path: Path, x: np.ndarray, threads: int, graph: str = "plain",
               name: str = "plain torch.onnx.export") -> list[Row]:
    """A graph file on ONNX Runtime fp32 and on OpenVINO at each precision the CPU has."""
    rows = [Row(f"{name}, onnxruntime fp32", graph, "onnxruntime", "fp32", _ort_call(path, threads, x))]
    caps = _ov_capabilities()
    for prec, need in OV_PRECISIONS:
        if need and need not in caps:
            continue
        call, used = _ov_call(path, threads, prec, x)
        if used == prec:
            rows.append(Row(f"{name}, openvino {prec}", graph, "openvino", prec, call))
    return rows


#: ``--layouts`` rows: the project's fused graph (static batch 1, fp32 weights, simplified) with the
#: students in the carried window layout and in the official block order, through the same harness as
#: the plain conversion: the same-run A/B that keeps or drops the window-layout rewrite (issue 24).
LAYOUTS = (("window-layout", True, "project graph, window layout"),
           ("token-layout", False, "project graph, official block order"))


def export_layout(stlm: Any, path: Path, window_layout: bool) -> Path:
    from stlm_export.onnx_export import export_onnx, save_onnx

    return save_onnx(export_onnx(stlm, batch=1, window_layout=window_layout).model, path)


def time_interleaved(rows: list[Row], runs: int, warmup: int) -> None:
    """Warm every row up, then ``runs`` rounds calling each row once in a rotating order (module docstring)."""
    for r in rows:
        for _ in range(warmup):
            r.call()
    for i in range(runs):
        k = i % len(rows)
        for r in rows[k:] + rows[:k]:
            t0 = time.perf_counter()
            r.call()
            r.times.append((time.perf_counter() - t0) * 1000)


# ------------------------------------------------------------------------------------------ a size
def _image(img_size: int, resize: str) -> np.ndarray:
    from stlm_export.calib import calibration_images

    return np.ascontiguousarray(calibration_images(None, img_size, 1, resize).images[:1])


def _engine_for(size: int, args: argparse.Namespace, work: Path, ckpt_sha: str) -> Path:
    """``--engine SIZE=DIR`` (checked: that size, exported from this checkpoint), else a fresh export."""
    from stlm_deploy.spec import load_spec

    given = dict(args.engine or [])
    if size in given:
        eng = Path(given[size])
        spec = load_spec(eng)
        if spec.img_size != size:
            raise SystemExit(f"Error: --engine {size}={eng}: stlm.json img_size is {spec.img_size}, not {size}")
        if spec.source.sha256 and spec.source.sha256 != ckpt_sha:
            raise SystemExit(f"Error: --engine {size}={eng}: exported from another checkpoint (source.sha256 "
                             f"{spec.source.sha256[:12]}... is not --ckpt's {ckpt_sha[:12]}...)")
        return eng
    from stlm_export.pipeline import ExportOptions, export_engine

    out = work / f"engine_{size}"
    print(f"exporting {args.ckpt} at {size} px -> {out}", file=sys.stderr)
    export_engine(ExportOptions(ckpt=args.ckpt, out=out, img_size=size, int8=args.int8, calib_data=args.calib_data,
                                val_data=args.val_data, int8_accuracy_control=False, parity_images=2,
                                gate_images=args.gate_images),
                  log=lambda m: print(f"  {m}", file=sys.stderr))
    return out


def run_size(size: int, args: argparse.Namespace, work: Path, record: Any) -> dict[str, Any]:
    """Every row at one image size (module docstring); returns the JSON-able section."""
    import torch

    from .profile_stages import STAGES, openvino_profile, ort_profile

    torch.set_num_threads(args.threads)
    model = record.model(size)
    engine = _engine_for(size, args, work, record.sha256)
    image = _image(size, model.cfg.resize)
    with torch.no_grad():
        xf = np.ascontiguousarray(model.normalize(torch.from_numpy(image)).numpy())
    plain = export_plain(model, work / f"plain_{size}.onnx")
    rows: list[Row] = []
    if not args.no_eager:
        xt = torch.from_numpy(xf)

        def eager() -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = model(xt)
            return {"anomaly_map": out.anomaly_map.numpy(), "score": out.score.numpy()}

        rows.append(Row("pytorch eager fp32", "eager", "pytorch", "fp32", eager))
    rows += engine_rows(engine, image, args.threads)
    rows += plain_rows(plain, xf, args.threads)
    if args.layouts and model.cfg.family == "stlm":
        for graph, window_layout, name in LAYOUTS:
            path = export_layout(model, work / f"{graph}_{size}.onnx", window_layout)
            rows += plain_rows(path, image, args.threads, graph, name)
    ref = _ort_call(engine / "model.onnx", args.threads, image)()["anomaly_map"]
    for r in rows:
        r.max_abs_map = float(np.abs(np.asarray(r.call()["anomaly_map"], np.float64) - ref).max())
    time_interleaved(rows, args.runs, args.warmup)
    section: dict[str, Any] = {"img_size": size, "engine": str(engine), "plain_onnx": str(plain),
                               "rows": [r.summary() for r in rows]}
    if size in args.profile_sizes:
        stages: dict[str, dict[str, float]] = {}
        ops: dict[str, dict[str, float]] = defaultdict(dict)
        graphs = (("engine", engine / "model.onnx", engine / "openvino" / "model.xml", image),
                  ("plain", plain, plain, xf))
        caps = _ov_capabilities()
        for name, onnx_path, ov_path, x in graphs:
            key = f"{name} onnxruntime fp32"
            stages[key] = ort_profile(onnx_path, size, args.profile_runs, args.threads, ops[key], x=x)
            for prec, need in OV_PRECISIONS[:2]:
                if need and need not in caps:
                    continue
                key = f"{name} openvino {prec}"
                path = ov_path if ov_path.is_file() else onnx_path
                stages[key] = openvino_profile(path, size, args.profile_runs, args.threads, _OV_HINT[prec],
                                               ops[key], x=x, batch1=True)
        section["profile"] = {"stages": stages, "stage_names": list(STAGES),
                              "ops": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in ops.items()}}
    return section


# ------------------------------------------------------------------------------------------ output
def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


def markdown(report: dict[str, Any], ops_top: int = 8) -> str:
    """The tables: latency per size with × eager and × plain (same runtime and precision), then profiles."""
    env = report["environment"]
    lines = [f"### Project engines vs the plain conversion of the official graph ({report['checkpoint']})", "",
             f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, {report['threads']} threads); batch 1, one "
             f"graph call on a prepared input, p50 of {report['runs']} interleaved rounds after {report['warmup']} "
             "warm-up calls. × plain: the plain conversion's p50 on the same runtime and precision divided by this "
             "row's."]
    if report.get("smoke"):
        lines += ["", "**Smoke run** (few rounds, shared machine): the numbers prove the script runs, not the speed."]
    for sec in report["sizes"]:
        rows = sec["rows"]
        eager = next((r["p50_ms"] for r in rows if r["graph"] == "eager"), None)
        plain = {(r["runtime"], r["precision"]): r["p50_ms"] for r in rows if r["graph"] == "plain"}
        lines += ["", f"#### {sec['img_size']} px", "",
                  "| row | gated | p50 ms | min ms | × eager | × plain | max abs Δmap vs ORT fp32 |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            gated = {True: "yes", False: "no", None: ""}[r["gated"]]
            same = plain.get((r["runtime"], r["precision"])) if r["graph"] not in ("eager", "plain") else None
            d = r["max_abs_map_vs_ort_fp32"]
            lines.append(f"| {r['label']} | {gated} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | "
                         f"{_ratio(eager, r['p50_ms'])} | {_ratio(same, r['p50_ms'])} | "
                         f"{'–' if d is None else format(d, '.1e')} |")
        layout = {(r["graph"], r["runtime"], r["precision"]): r["p50_ms"] for r in rows if r["graph"].endswith("-layout")}
        ab = [f"{rt} {pr} ×{_ratio(layout[('token-layout', rt, pr)], ms)}" for (g, rt, pr), ms in layout.items()
              if g == "window-layout" and ("token-layout", rt, pr) in layout]
        if ab:
            lines += ["", "Window layout carried across blocks vs the official block order (same graph otherwise; "
                          ">1 = the window layout is faster): " + ", ".join(ab)]
        for r in rows:
            for n in r["notes"]:
                lines.append(f"\n{r['label']}: {n}")
        prof = sec.get("profile")
        if prof:
            names = prof["stage_names"]
            lines += ["", f"Kernel time per stage at {sec['img_size']} px, ms (ORT profiler / OpenVINO counters; "
                          "'total' is wall clock)", "", "| graph, runtime | " + " | ".join(names) + " | total |",
                      "|---|" + "---|" * (len(names) + 1)]
            for k, st in prof["stages"].items():
                lines.append(f"| {k} | " + " | ".join(f"{st[n]:.1f}" for n in names) + f" | {st['total']:.1f} |")
            for k, per in prof["ops"].items():
                total = sum(per.values()) or 1.0
                lines += ["", f"{k} at {sec['img_size']} px: kernel time by op type (top {ops_top} of {len(per)})",
                          "", "| op | ms | share |", "|---|---|---|"]
                lines += [f"| {op} | {ms:.1f} | {ms / total:.0%} |" for op, ms in list(per.items())[:ops_top]]
    pk = env.get("packages", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in pk.items())]
    return "\n".join(lines) + "\n"


def _size_list(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated image sizes (e.g. 256,1024), got {text!r}")
    if not sizes or any(s <= 0 or s % 64 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive multiples of 64, got {text!r}")
    return sizes


def _engine_arg(text: str) -> tuple[int, str]:
    size, sep, path = text.partition("=")
    if not sep or not size.isdigit() or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"expected SIZE=ENGINE_DIR with an existing directory, got {text!r}")
    return int(size), path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stlm_bench.vs_plain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="project checkpoint or official STLM state dict (the weights)")
    ap.add_argument("--sizes", type=_size_list, default=[256, 1024], help="image sizes (default 256,1024)")
    ap.add_argument("--engine", type=_engine_arg, action="append", metavar="SIZE=DIR",
                    help="an existing engine exported from --ckpt at SIZE (else one is exported into --work)")
    ap.add_argument("--work", default=None, help="folder for exported engines and plain ONNX files (default: temp)")
    ap.add_argument("--int8", action="store_true", help="export the engines with --int8 as well (needs calibration "
                                                        "data: the checkpoint's, or --calib-data)")
    ap.add_argument("--calib-data", default=None)
    ap.add_argument("--val-data", default=None, help="labelled gate images for the export's task gates")
    ap.add_argument("--gate-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=10, help="interleaved timed rounds per size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager row")
    ap.add_argument("--layouts", action="store_true",
                    help="also time the project graph with the students' window layout carried across blocks "
                         "and in the official block order (same harness as the plain rows)")
    ap.add_argument("--profile-sizes", type=_size_list, default=None,
                    help="sizes with the per-stage / per-op profile (default: the smallest size; 0 runs: none)")
    ap.add_argument("--profile-runs", type=int, default=2)
    ap.add_argument("--ops", type=int, default=8, help="op types shown per profiled runtime")
    ap.add_argument("--name", default=None, help="results file stem (default vs_plain_<sizes>)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--smoke", action="store_true", help="mark the results as a smoke run (numbers not meaningful)")
    args = ap.parse_args(argv)
    if not Path(args.ckpt).is_file():
        ap.error(f"--ckpt {args.ckpt}: not a file")
    if args.runs < 1 or args.warmup < 0 or args.threads < 1 or args.profile_runs < 0:
        ap.error("--runs and --threads must be >= 1, --warmup and --profile-runs >= 0")
    args.profile_sizes = [min(args.sizes)] if args.profile_sizes is None else args.profile_sizes
    if args.profile_runs == 0:
        args.profile_sizes = []
    from stlm_train.checkpoint import read_checkpoint

    record = read_checkpoint(args.ckpt)
    sha = record.sha256
    with tempfile.TemporaryDirectory(prefix="stlm-vs-plain-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sections = [run_size(s, args, work, record) for s in args.sizes]
    report = {"checkpoint": args.ckpt, "sha256": sha, "threads": args.threads, "runs": args.runs,
              "warmup": args.warmup, "smoke": bool(args.smoke), "environment": environment(args.threads),
              "sizes": sections}
    out = Path(args.out_dir) / (args.name or "vs_plain_" + "_".join(map(str, args.sizes)))
    emit(markdown(report, args.ops), report, json_path=f"{out}.json", markdown_path=f"{out}.md")
    print(f"wrote {out}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
