"""Load test of ``stlm-serve``: N concurrent clients x M requests over HTTP and gRPC on 127.0.0.1.

    python -m stlm_bench.serve_load --engine engines/serve256 --clients 4 --requests 25

1. In-process baseline: the same images through :meth:`Detector.predict` (same backend), batch 1 and a
   batch of ``--max-batch`` (before the server starts, so nothing competes for the CPUs).
2. ``stlm-serve`` is started as a user would (a subprocess on free loopback ports) and waited for.
3. Per protocol: ``--clients`` threads, each with its own tritonclient client (they are not
   thread-safe), send ``--requests`` one-image requests back to back; every request has a timeout.
   Throughput, p50/p90/p99 latency, errors and lost requests (sent but never answered) are counted,
   and Triton's own statistics (``/v2/models/NAME/stats``, ``batch_stats``) before/after show the
   batch sizes dynamic batching formed.

Prints a markdown table and writes ``benchmarks/results/serve_load_<img>.json`` + ``.md``. Exit code 1
when any request failed or was lost, or when no batch larger than 1 was formed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .measure import _percentile, environment
from .output import emit, run_main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(folder: str | None, n: int, size: int) -> list[np.ndarray]:
    """``n`` RGB images: from ``folder`` (recursively) when given and found, else seeded synthetic ones."""
    from stlm_deploy.batch import collect_inputs, read_image

    if folder and Path(folder).is_dir():
        files, _ = collect_inputs([folder])
        if files:
            return [read_image(p) for p, _ in files[:n]]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def in_process(engine: str, backend: str, images: list[np.ndarray], batch: int, rounds: int) -> dict[str, Any]:
    """Images/s of Detector.predict on this process, batch 1 and ``batch``."""
    from stlm_deploy import Detector

    out: dict[str, Any] = {}
    with Detector.load(engine, backend=backend, batch_size=batch) as det:
        det.predict(images[:batch])  # warm-up
        for b in sorted({1, batch}):
            n = 0
            t0 = time.perf_counter()
            for _ in range(rounds):
                for i in range(0, len(images), b):
                    det.predict(images[i:i + b])
                    n += len(images[i:i + b])
            dt = time.perf_counter() - t0
            out[f"batch_{b}"] = {"images": n, "seconds": dt, "img_per_s": n / dt}
        out["backend"] = det.info()["backend"]
        out["precision"] = det.info()["precision"]
    return out


def start_server(engine: str, backend: str, name: str, max_batch: int, delay_us: int,
                 timeout_s: float) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "stlm_deploy.serving.cli", engine, "--backend", backend, "--name", name,
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port",
           str(ports["metrics"]), "--max-batch", str(max_batch), "--max-queue-delay-us", str(delay_us)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if "ready (" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the pipe
            return proc, ports
    proc.kill()
    raise SystemExit(f"serve_load: stlm-serve did not become ready: {''.join(seen)[-1500:]}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def batch_stats(protocol: str, url: str, name: str) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics endpoint."""
    if protocol == "http":
        import tritonclient.http as tc

        client = tc.InferenceServerClient(url)
        stats = client.get_inference_statistics(name)
        client.close()
        rows = stats["model_stats"][0].get("batch_stats", [])
        return {int(r["batch_size"]): int(r["compute_infer"]["count"]) for r in rows}
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url)
    stats = client.get_inference_statistics(name)
    client.close()
    return {int(r.batch_size): int(r.compute_infer.count) for r in stats.model_stats[0].batch_stats}


def run_protocol(protocol: str, url: str, name: str, images: list[np.ndarray], clients: int, requests: int,
                 timeout_s: float) -> dict[str, Any]:
    """``clients`` threads x ``requests`` one-image requests; latencies, errors, lost requests."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = [0]
    lock = threading.Lock()
    outputs = ("score", "normalized_score", "is_anomalous")

    def worker(k: int) -> None:
        if protocol == "http":
            import tritonclient.http as tc

            client = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as tc  # type: ignore[no-redef]

            client = tc.InferenceServerClient(url)
        try:
            for i in range(requests):
                img = images[(k * requests + i) % len(images)][None]
                inp = tc.InferInput("image", list(img.shape), "UINT8")
                inp.set_data_from_numpy(img)
                outs = [tc.InferRequestedOutput(o) for o in outputs]
                with lock:
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
                    res = client.infer(name, [inp], outputs=outs, **kw)
                    ok = res.as_numpy("score") is not None and res.as_numpy("score").size == 1
                    with lock:
                        if ok:
                            latencies.append((time.perf_counter() - t0) * 1000)
                        else:
                            errors.append("empty score output")
                except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
                    with lock:
                        errors.append(" ".join(str(e).split())[:200])
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * requests + 60)
    wall = time.perf_counter() - t0
    s = sorted(latencies)
    answered = len(latencies) + len(errors)
    return {"protocol": protocol, "clients": clients, "requests_per_client": requests, "sent": sent[0],
            "ok": len(latencies), "errors": len(errors), "lost": sent[0] - answered,
            "error_samples": errors[:5], "seconds": wall, "img_per_s": len(latencies) / wall if wall else 0.0,
            "p50_ms": _percentile(s, 50) if s else None, "p90_ms": _percentile(s, 90) if s else None,
            "p99_ms": _percentile(s, 99) if s else None}


def markdown(report: dict[str, Any]) -> str:
    env, base = report["environment"], report["in_process"]
    lines = [f"### stlm-serve load test — `{report['engine']}` at {report['img_size']} px",
             "",
             f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs); backend {base['backend']} "
             f"({base['precision'] or 'default'}); Triton max_batch {report['max_batch']}, max_queue_delay "
             f"{report['max_queue_delay_us']} us; images {report['image_shape']} sent as UINT8, one per request; "
             f"1-min load average {report['load_average_1m']['start']:.1f} at start, "
             f"{report['load_average_1m']['end']:.1f} at end (other processes share the CPUs)",
             "",
             "| path | clients x requests | ok | errors | lost | img/s | p50 ms | p90 ms | p99 ms | Triton batches (size: count) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in base if k.startswith("batch_")):
        b = base[key]
        lines.append(f"| in-process Detector.predict, {key.replace('_', ' ')} | - | {b['images']} | 0 | 0 | "
                     f"{b['img_per_s']:.2f} | | | | |")
    for r in report["runs"]:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(r["batches"].items()))
        fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| stlm-serve {r['protocol']} | {r['clients']} x {r['requests_per_client']} | {r['ok']} | "
                     f"{r['errors']} | {r['lost']} | {r['img_per_s']:.2f} | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | "
                     f"{fmt(r['p99_ms'])} | {hist} |")
    lines += ["", f"Largest batch formed by dynamic batching: {report['largest_batch']}; "
              f"verdict: {'PASS' if report['passed'] else 'FAIL'} (0 errors, 0 lost, a batch > 1)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", required=True, help="engine directory")
    p.add_argument("--backend", default="auto")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=25, help="requests per client and protocol")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=5000)
    p.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "mvtec_bottle_xs" / "test"),
                   help="folder of images to send (default: the bundled sample; synthetic when absent)")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--baseline-rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--name", default=None, help="results file stem (default serve_load_<img>)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    from stlm_deploy.spec import load_spec

    spec = load_spec(args.engine)
    load_start = os.getloadavg()[0]  # other work on the machine shows in every number below
    images = load_images(args.images, args.n_images, spec.img_size)
    print(f"serve_load: {len(images)} images {images[0].shape}; in-process baseline ...", flush=True)
    base = in_process(args.engine, args.backend, images, args.max_batch, args.baseline_rounds)
    name = "stlm"
    proc, ports = start_server(args.engine, args.backend, name, args.max_batch, args.max_queue_delay_us, 180)
    runs = []
    try:
        for protocol in [x.strip() for x in args.protocols.split(",") if x.strip()]:
            url = f"127.0.0.1:{ports[protocol]}"
            before = batch_stats(protocol, url, name)
            print(f"serve_load: {protocol}: {args.clients} clients x {args.requests} requests ...", flush=True)
            r = run_protocol(protocol, url, name, images, args.clients, args.requests, args.timeout)
            after = batch_stats(protocol, url, name)
            r["batches"] = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) - before.get(b, 0)}
            runs.append(r)
    finally:
        rc = stop_server(proc)
    largest = max((b for r in runs for b in r["batches"]), default=0)
    passed = all(r["errors"] == 0 and r["lost"] == 0 for r in runs) and largest > 1
    report = {"engine": str(args.engine), "img_size": spec.img_size, "image_shape": list(images[0].shape),
              "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us, "in_process": base,
              "runs": runs, "largest_batch": largest, "passed": passed, "server_exit_code": rc,
              "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}, "environment": environment()}
    stem = Path(args.out_dir) / (args.name or f"serve_load_{spec.img_size}")
    emit(markdown(report), report, json_path=stem.with_suffix(".json"), markdown_path=stem.with_suffix(".md"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
