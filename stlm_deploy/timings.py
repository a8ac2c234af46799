"""Which CPU variant ``backend="auto"`` runs first: measured on this machine if it was, else a static preference.

Which engine is fastest depends on the CPU, not the model: on an AMX Xeon the bf16 graph beats the
INT8 IR, on a VNNI-only EPYC the INT8 IR wins (docs/int8.md). Timing every variant at load would cost
seconds of compilation, so:

* ``stlm-bench --engine E`` records what it measured in ``E/timings.json`` (one record per machine and
  thread count), and the runtimes (this module and the C++ ``timings.cpp``, the same rule) read it:
  a record applies when its ``machine`` (CPU model + ISA flags, :func:`machine_key`) and ``threads``
  equal this process's; the fastest *gated*, *current* variant (batch-1 p50) goes first among the CPU
  candidates (GPU candidates keep their place before it);
* without such a record (right after ``stlm-export``), :func:`static_pick` takes the first gated
  variant of :data:`STATIC_PREFERENCE` for this CPU's class (:func:`cpu_class`), an order measured on
  these CPUs (docs/engine_format.md, "Default backend and precision").

A variant is *gated* (:func:`gated`) when the export says so in stlm.json ``variants`` (bf16/fp16 by the
task gate, INT8 by the INT8 gate, fp32 by the parity gate); for engines written before ``variants``
existed: ``ort/fp32`` and ``openvino/fp32`` always, ``openvino/bf16``/``fp16`` when the IR records that
``inference_precision``, ``openvino/int8``/``ort/int8``/``ort/fp16`` when that artifact is listed with that
precision. A timing counts only while the artifact's sha256 is still the one that was timed.

The timings file is advisory: an unreadable or malformed one is reported in the selection notes and
the static preference is used, so a damaged timing record never stops a station from running.
"""
from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .files import atomic_write_json
from .spec import EngineSpec, display_path

__all__ = ["TIMINGS_FILE", "ISA_FLAGS", "VARIANTS", "STATIC_PREFERENCE", "Pick", "cpu_model_and_flags", "cpu_class",
           "machine_key", "record_timings", "gated", "variant_artifact", "measured_pick", "static_pick"]

TIMINGS_FILE = "timings.json"
FORMAT_VERSION = 1
#: The CPU features that decide which kernels OpenVINO / ONNX Runtime run (and so which variant wins).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
#: Variants the runtimes can select, in the order used to break exact ties.
VARIANTS = ("openvino/int8", "openvino/bf16", "openvino/fp16", "openvino/fp32", "ort/int8", "ort/fp32", "ort/fp16")
#: Without timings: the variants tried in order per CPU class (:func:`cpu_class`), the first gated one runs.
#: Measured (docs/engine_format.md): AMX Xeon bf16 311-436 ms < INT8 IR 336-517 < OpenVINO f32 972 < ORT f32 1119
#: at 1024 px; AVX-512-BF16 EPYC without AMX: INT8 IR 1.17x faster than bf16 at 1024, 40 vs 57 ms at 256.
STATIC_PREFERENCE = {
    "amx": ("openvino/bf16", "openvino/fp16", "openvino/int8", "openvino/fp32", "ort/fp32"),
    "avx512_bf16": ("openvino/int8", "openvino/bf16", "openvino/fp32", "ort/fp32"),
    "vnni": ("openvino/int8", "openvino/fp32", "ort/fp32"),
    "other": ("openvino/fp32", "ort/fp32"),
}
#: CPU features a reduced float precision needs to run natively (else OpenVINO falls back to f32).
_NEEDS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
#: The conventional artifact of each variant (engines without ``variants`` name nothing else).
_ARTIFACT = {"ort/fp32": "model.onnx", "ort/fp16": "model.fp16.onnx", "ort/int8": "model.int8.onnx",
             "openvino/fp32": "openvino/model.xml", "openvino/bf16": "openvino/model.xml",
             "openvino/fp16": "openvino/model.xml", "openvino/int8": "openvino/model.int8.xml"}


def cpu_model_and_flags(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """The first ``model name`` and ``flags`` of /proc/cpuinfo (or of the text given); "" and {} if absent."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_class(flags: Iterable[str]) -> str:
    """The key of :data:`STATIC_PREFERENCE` for a CPU with these /proc/cpuinfo ``flags``."""
    f = set(flags)
    if "amx_bf16" in f:
        return "amx"
    if "avx512_bf16" in f:
        return "avx512_bf16"
    if f & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "other"


def machine_key(cpuinfo: str | None = None) -> str:
    """``"<model name> [<ISA flags>]"`` from /proc/cpuinfo (C++: the same text), else the platform name."""
    model, flags = cpu_model_and_flags(cpuinfo)
    model = " ".join(model.split()) or platform.machine() or "unknown"
    return f"{model} [{' '.join(f for f in ISA_FLAGS if f in flags)}]"


def _artifact_sha(spec: EngineSpec, rel: str | None) -> str | None:
    entry = spec.artifacts.get(rel) if rel else None
    return entry.sha256 if entry else None


def _relative(engine_dir: Path, artifact: str | None) -> str | None:
    """The artifact as stlm.json names it. The bench reports the path it loaded, relative to the
    working directory when ``--engine`` was relative (``engines/x/model.onnx``); a path outside the
    engine directory is taken as already relative to it."""
    if not artifact:
        return None
    try:
        return Path(artifact).resolve().relative_to(Path(engine_dir).resolve()).as_posix()
    except ValueError:
        return Path(artifact).as_posix()


def record_timings(engine_dir: str | Path, spec: EngineSpec, report: dict[str, Any]) -> Path | None:
    """Merge a stlm-bench report's batch-1 p50s into ``engine_dir/timings.json``; returns the path.

    Only variants that ran at the precision they asked for are recorded (bf16 downgraded to fp32 on a
    CPU without BF16 is not a bf16 timing). None when the report has nothing to record."""
    engine_dir = Path(engine_dir)
    variants: dict[str, dict[str, Any]] = {}
    for r in report.get("results", []):
        t = (r.get("timings") or {}).get(1) or (r.get("timings") or {}).get("1")
        label = f"{r.get('backend')}/{r.get('requested_precision')}"
        if r.get("error") or not t or label not in VARIANTS or r.get("precision_used") != r.get("requested_precision"):
            continue
        rel = _relative(engine_dir, r.get("artifact"))
        sha = _artifact_sha(spec, rel)
        if sha is None:
            continue
        variants[label] = {"p50_ms": round(float(t["p50_ms"]), 3), "artifact": rel, "sha256": sha}
    if not variants:
        return None
    env = report.get("environment", {})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for v in variants.values():
        v["measured_at"] = now
    record = {"machine": machine_key(), "threads": int(env.get("threads") or 1), "batch": 1,
              "img_size": spec.img_size, "tool": "stlm-bench", "variants": variants}
    path = engine_dir / TIMINGS_FILE
    old: list[dict[str, Any]] = []
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            old = [x for x in data["records"] if isinstance(x, dict)]
    except (OSError, ValueError):
        pass  # missing or unreadable: start a fresh file (a damaged record is not worth keeping)
    same = [x for x in old if (x.get("machine"), x.get("threads")) == (record["machine"], record["threads"])]
    if same and isinstance(same[0].get("variants"), dict):  # a partial rerun (--backend X) keeps the others
        record["variants"] = {**same[0]["variants"], **variants}
    kept = [x for x in old if x not in same]
    return atomic_write_json(path, {"format_version": FORMAT_VERSION, "records": [*kept, record]})


@dataclass(frozen=True)
class Pick:
    """The variant auto runs first, and the sentence that says why (None: keep the static order)."""

    backend: str | None
    precision: str | None
    note: str


def variant_artifact(spec: EngineSpec, label: str) -> str:
    """The artifact ``label`` runs: the one stlm.json ``variants`` names, else the conventional file."""
    v = spec.variants.get(label)
    return v.artifact if v is not None else _ARTIFACT[label]


def gated(spec: EngineSpec, label: str, artifact: str) -> bool:
    """Whether ``label`` on ``artifact`` passed its export gate (module docstring); unlisted artifacts never do."""
    entry = spec.artifacts.get(artifact)
    if entry is None:
        return False
    if spec.variants:  # the export's own verdicts
        v = spec.variants.get(label)
        return v is not None and v.gated and v.artifact == artifact
    backend, precision = label.split("/")
    if backend == "openvino" and precision in ("bf16", "fp16"):
        return artifact.endswith(".xml") and entry.extra.get("inference_precision") == precision
    if backend == "openvino" and precision == "fp32":  # an IR's own precision is its weight storage (fp16)
        return entry.precision != "int8"
    if precision in ("int8", "fp16"):
        return entry.precision == precision
    return precision == "fp32" and entry.precision in (None, "fp32")


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def measured_pick(engine_dir: str | Path, spec: EngineSpec, threads: int, backends: Iterable[str]) -> Pick:
    """The fastest gated variant this machine measured, among ``backends`` (those importable here)."""
    path = Path(engine_dir) / TIMINGS_FILE
    where = display_path(path)
    if not path.is_file():
        return Pick(None, None, f"no {TIMINGS_FILE}: static order (run stlm-bench --engine on this machine to "
                                "let auto pick the fastest variant)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return Pick(None, None, f"{where}: not readable JSON ({str(e).splitlines()[0]}); ignored, static order")
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        return Pick(None, None, f"{where}: field 'records' must be a list; ignored, static order")
    key = machine_key()
    record = next((r for r in data["records"] if isinstance(r, dict) and r.get("machine") == key
                   and type(r.get("threads")) is int and r["threads"] == threads), None)  # 2.0/true: no (as C++)
    if record is None:
        return Pick(None, None, f"{where}: no timing for this machine ({key}, {threads} threads): static order")
    variants = record.get("variants")
    if not isinstance(variants, dict):
        return Pick(None, None, f"{where}: field 'variants' must be an object; ignored, static order")
    allowed = set(backends)
    timed: list[tuple[float, int, str]] = []
    ungated: list[tuple[float, str]] = []
    for label, v in variants.items():
        if label not in VARIANTS or label.split("/")[0] not in allowed or not isinstance(v, dict):
            continue
        if not _positive(v.get("p50_ms")) or not isinstance(v.get("artifact"), str):
            return Pick(None, None, f"{where}: field 'variants.{label}' must have a positive p50_ms and an "
                                    "artifact; ignored, static order")
        if _artifact_sha(spec, v["artifact"]) != v.get("sha256"):
            continue  # the artifact was re-exported (or removed) since it was timed
        if not gated(spec, label, v["artifact"]):
            ungated.append((float(v["p50_ms"]), label))
            continue
        timed.append((float(v["p50_ms"]), VARIANTS.index(label), label))
    if not timed:
        return Pick(None, None, f"{where}: no gated, current variant timed on this machine: static order")
    timed.sort()
    best = timed[0][2]
    others = ", ".join(f"{lbl} {ms:.1f}" for ms, _, lbl in timed[1:])
    faster = ", ".join(f"{lbl} {ms:.1f}" for ms, lbl in sorted(ungated) if ms < timed[0][0])
    backend, precision = best.split("/")
    return Pick(backend, precision, f"{best} is the fastest gated variant timed here ({timed[0][0]:.1f} ms p50"
                                    f"{'; ' + others if others else ''}"
                                    f"{'; faster but not gated: ' + faster if faster else ''}; {TIMINGS_FILE})")


def _weak(spec: EngineSpec, label: str) -> str:
    """'; gated on weak evidence (...)' when the export said its gate images were too few, else ''."""
    v = spec.variants.get(label)
    ev = v.extra.get("evidence") if v is not None else None
    if isinstance(ev, dict) and ev.get("sufficient") is False:
        return f"; gated on weak evidence ({ev.get('n_images')} images, see stlm.json variants)"
    return ""


def static_pick(spec: EngineSpec, backends: Iterable[str], flags: Iterable[str] | None = None) -> Pick:
    """The first gated variant of :data:`STATIC_PREFERENCE` for this CPU (``flags``: /proc/cpuinfo's)."""
    have = set(cpu_model_and_flags()[1] if flags is None else flags)
    kind = cpu_class(have)
    order = STATIC_PREFERENCE[kind]
    allowed = set(backends)
    for label in order:
        backend, precision = label.split("/")
        if backend not in allowed or (precision in _NEEDS and not have & set(_NEEDS[precision])):
            continue
        if gated(spec, label, variant_artifact(spec, label)):
            return Pick(backend, precision, f"{label} is the first gated variant of the static preference for this "
                                            f"CPU ({kind}: {' > '.join(order)}){_weak(spec, label)}")
    return Pick(None, None, f"no gated variant of the static preference for this CPU ({kind}: {' > '.join(order)}) "
                            "can run here: static order")
