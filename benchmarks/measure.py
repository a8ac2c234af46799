"""Timing helpers shared by the benchmark scripts: warm-up, repeated runs, percentiles, environment."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any


@dataclass
class Timing:
    """Latency statistics of one configuration, in milliseconds."""

    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _percentile(sorted_ms: list[float], q: float) -> float:
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q / 100 * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_fn(fn: Callable[[], Any], runs: int = 10, warmup: int = 2) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed with perf_counter."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000)
    s = sorted(ms)
    return Timing(runs, statistics.fmean(ms), _percentile(s, 50), _percentile(s, 90), _percentile(s, 99), s[0])


def cpu_model() -> str:
    from stlm_deploy.timings import cpu_model_and_flags

    return cpu_model_and_flags()[0] or platform.processor() or platform.machine()


def machine_line() -> str:
    """The one-line machine label of a results file's meta data (accuracy, families, sharpness): the CPU
    model where /proc/cpuinfo names one (``platform.processor()`` is only "x86_64" on Linux)."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def cpu_flags() -> list[str]:
    from stlm_deploy.timings import cpu_model_and_flags

    return sorted(f for f in cpu_model_and_flags()[1] if f.startswith(("avx512", "amx", "avx2", "fma")))


def package_versions(names: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
                                               "onnxslim", "polygraphy", "tensorrt", "numpy", "opencv-python-headless")
                     ) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment(threads: int | None = None) -> dict[str, Any]:
    """What a reader needs to interpret the numbers: CPU, cores, threads, library versions."""
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "packages": package_versions()}

