"""Peak memory of scoring one very large image through the Detector (issue 26: a 20-megapixel image under 2 GB).

    python -m stlm_bench.large_image --engine engines/tire_768 --width 5000 --height 4000 --threads 2

A deterministic synthetic RGB image (gradients, blobs and noise, so neither the PNG nor the resize is trivial) of
``--width`` x ``--height`` is written as a PNG; a fresh Python process then loads the engine, reads the file with
the runtime's one reader and scores it once, and reports its peak resident set size (VmHWM) after loading and
after scoring: the whole cost of one image, decoded, resized to the work shape, tiled in chunks, blended and
mapped back to its size. A separate process, so nothing the parent allocated counts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlm_deploy.files import atomic_write_json

from .measure import machine_line
from .output import run_main


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) RGB: smooth colour gradients, a few discs and mild noise, built band by band."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), np.uint8)
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    discs = [(rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.01, 0.05) * min(height, width),
              rng.integers(0, 256, 3)) for _ in range(12)]
    band = 512
    for y0 in range(0, height, band):
        yy = np.linspace(y0 / height, min(y0 + band, height) / height, min(band, height - y0),
                         endpoint=False, dtype=np.float32)[:, None]
        base = 60 + 120 * xx + 60 * yy
        img = np.stack([base, 0.8 * base + 20, 200 - base], axis=2)
        rows = np.arange(y0, y0 + len(yy), dtype=np.float32)[:, None]
        cols = np.arange(width, dtype=np.float32)[None, :]
        for cy, cx, r, colour in discs:
            img[(rows - cy) ** 2 + (cols - cx) ** 2 < r * r] = colour
        img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
        out[y0:y0 + len(yy)] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(engine: str, image: str, backend: str, threads: int | None) -> dict[str, Any]:
    """In the measuring process: load, read, score once; VmHWM at each stage."""
    from stlm_deploy import Detector
    from stlm_deploy.images import read_image_rgb

    t0 = time.perf_counter()
    det = Detector.load(engine, backend=backend, threads=threads)
    loaded = _vm_hwm_mib()
    rgb = read_image_rgb(image)  # the runtime's reader, its default 64-megapixel cap
    t1 = time.perf_counter()
    pred = det.predict(rgb)
    seconds = time.perf_counter() - t1
    info = det.info()
    return {"backend": info["backend"], "precision": info["precision"], "tiling": info["tiling"],
            "image": list(rgb.shape), "n_tiles": pred.n_tiles, "score": pred.score,
            "map_shape": list(pred.anomaly_map.shape), "load_seconds": round(t1 - t0, 2),
            "predict_seconds": round(seconds, 2), "peak_rss_after_load_mib": round(loaded, 1),
            "peak_rss_mib": round(_vm_hwm_mib(), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stlm_bench.large_image", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--width", type=int, default=5000)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report here (atomically)")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.backend, args.threads)))
        return 0
    if args.width <= 0 or args.height <= 0:
        raise SystemExit(f"Error: --width/--height: must be positive, got {args.width} x {args.height}")
    if not Path(args.engine).exists():
        raise SystemExit(f"Error: --engine {args.engine}: no such engine directory or file")
    import cv2

    with tempfile.TemporaryDirectory(prefix="stlm-large-") as tmp:
        png = Path(tmp) / f"synthetic_{args.width}x{args.height}.png"
        rgb = synthetic_image(args.height, args.width)
        if not cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise SystemExit(f"Error: cannot write {png}")
        del rgb
        cmd = [sys.executable, "-m", "stlm_bench.large_image", "--engine", args.engine, "--backend", args.backend,
               "--child", str(Path(args.engine).resolve()), str(png)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise SystemExit(f"Error: scoring failed: {lines[-1] if lines else proc.returncode}")
    report = {"width": args.width, "height": args.height, "megapixels": round(args.width * args.height / 1e6, 1),
              "engine": args.engine, "threads": args.threads, "machine": machine_line(),
              **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
