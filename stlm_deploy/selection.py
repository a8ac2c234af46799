"""Which artifact of an engine directory runs, on which backend: the planner behind ``Detector.load``.

The decisions are pure, over ``stlm.json`` and the files present, so they can be read and tested on
their own; :func:`open_backend` is the one place that then tries the candidates in order and activates the
first that runs. ``backend="auto"`` tries, in order: TensorRT (plan present,
tensorrt + cuda-python importable) > ONNX Runtime with CUDA > OpenVINO (IR, else ONNX) > ONNX Runtime
on CPU; a candidate that cannot run here is skipped with a note saying why. Before the CPU ones goes,
when no precision or file was asked for, the fastest gated variant that ``stlm-bench`` timed on this
machine (``timings.json``), else the first gated variant of the static preference for this CPU
(:mod:`stlm_deploy.timings`): so right after ``stlm-export`` auto already runs e.g. OpenVINO bf16 when
the export's task gate passed it.

With no precision requested, :func:`default_precision` is the one rule shared with the C++ runtime
(docs/engine_format.md, "Default backend and precision"): never the device's silent default.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from .backends import Backend, backend_class, module_importable, tensorrt_available
from .errors import BackendUnavailable, DeployError
from .spec import Artifact, EngineSpec, display_path, verify_artifacts

__all__ = ["BACKEND_CHOICES", "Candidate", "Planner", "accepted_options", "artifact_hint", "explicit_candidates",
           "auto_candidates", "default_precision", "open_backend"]

BACKEND_CHOICES = ("auto", "ort", "openvino", "tensorrt")
_CONVENTIONAL_ONNX = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
                      "bf16": "model.bf16.onnx"}
_SUFFIX_BACKEND = {".onnx": "ort", ".xml": "openvino", ".plan": "tensorrt", ".engine": "tensorrt"}


@dataclass
class Candidate:
    backend: str
    artifact: str  # relative to the engine directory
    verify: list[str]
    options: dict[str, Any]
    label: str


def _listed(spec: EngineSpec, kind: str, precision: str | None, default: str | None = "fp32") -> list[str]:
    """Listed artifacts of ``kind`` whose precision (None read as ``default``) matches ``precision``."""
    return [k for k, a in spec.artifacts.items()
            if a.kind == kind and (precision is None or (a.precision or default) == precision)]


def _pick(names: list[str], preferred: str | None) -> str:
    return preferred if preferred in names else names[0]


def default_precision(backend: str, entry: Artifact | None) -> str | None:
    """The precision to run at when none was requested: the same rule in Python and C++ (detector.cpp).

    OpenVINO: the inference precision the export's parity gate passed for this IR (stlm.json
    ``artifacts.<xml>.inference_precision``), else fp32 (an ONNX file or an engine that does not record
    it); the backend downgrades bf16 to f32, with a note, on a CPU without BF16, as it does for an
    explicit request. Never the device default, which silently differs between CPUs (bf16 on AMX).
    ONNX Runtime and TensorRT: None, i.e. the artifact's own precision (model.onnx, the plan's).
    """
    if backend != "openvino":
        return None
    recorded = entry.extra.get("inference_precision") if entry is not None else None
    return recorded if isinstance(recorded, str) and recorded else "fp32"


def _onnx_shas(spec: EngineSpec) -> list[str]:
    return [a.sha256 for a in spec.artifacts.values() if a.kind == "onnx"]


class Planner:
    """Maps (backend, precision, artifact hint) to concrete candidates for one engine directory."""

    def __init__(self, engine_dir: Path, spec: EngineSpec, precision: str | None) -> None:
        self.dir, self.spec, self.precision = engine_dir, spec, precision
        self.where = display_path(engine_dir)

    def exists(self, rel: str) -> bool:
        return (self.dir / rel).is_file()

    def _with_sidecars(self, rel: str) -> list[str]:
        """The artifact plus the files it cannot run without (IR weights, plan sidecar)."""
        p = PurePosixPath(rel)
        extra: list[str] = []
        if p.suffix == ".xml":
            extra = [p.with_suffix(".bin").as_posix()]
        elif p.suffix in (".plan", ".engine"):
            extra = [rel + ".json"]
        return [rel] + [e for e in extra if e in self.spec.artifacts or (not self.spec.artifacts and self.exists(e))]

    def onnx(self, hint: str | None = None, precision: str | None = None) -> str:
        """The ONNX file at ``precision`` (default: the planner's, else fp32)."""
        prec = precision or self.precision or "fp32"
        if hint:
            return hint
        names = _listed(self.spec, "onnx", prec)
        if names:
            return _pick(names, _CONVENTIONAL_ONNX.get(prec))
        conventional = _CONVENTIONAL_ONNX.get(prec)
        if conventional and conventional not in self.spec.artifacts and self.exists(conventional):
            return conventional  # unlisted: verification (if on) reports it clearly
        have = ", ".join(f"{k} {a.precision or 'fp32'}" for k, a in self.spec.artifacts.items() if a.kind == "onnx")
        raise BackendUnavailable(f"{self.where}: no ONNX artifact with precision {prec} (have: {have or 'none'}); "
                                 f"re-export with that precision or choose another")

    def openvino(self, hint: str | None = None) -> str:
        if hint:
            return hint
        if self.precision == "int8":
            names = [n for n in _listed(self.spec, "openvino", "int8", None) if n.endswith(".xml")]
            if names:
                return names[0]
            raise BackendUnavailable(f"{self.where}: no int8 OpenVINO IR in this engine")
        names = [n for n in _listed(self.spec, "openvino", None) if n.endswith(".xml")
                 and self.spec.artifacts[n].precision != "int8"]
        if names:
            return _pick(names, "openvino/model.xml")
        if not self.spec.artifacts and self.exists("openvino/model.xml"):
            return "openvino/model.xml"
        return self.onnx(precision="fp32")  # the precision is a compile option of the IR: read fp32 ONNX

    def tensorrt(self, hint: str | None = None) -> str:
        if hint:
            return hint
        names = [n for n in _listed(self.spec, "tensorrt", self.precision, None)]
        if names:
            return _pick(names, "model.plan")
        if not self.spec.artifacts and self.exists("model.plan"):
            return "model.plan"
        what = f" {self.precision}" if self.precision else ""
        have = ", ".join(f"{k} {a.precision}" for k, a in self.spec.artifacts.items() if a.kind == "tensorrt")
        raise BackendUnavailable(f"{self.where}: no{what} TensorRT plan in this engine (have: {have or 'none'}); "
                                 "export one with --target tensorrt")

    def candidate(self, backend: str, hint: str | None = None, providers: Sequence[str] = ("cpu",)) -> Candidate:
        art = {"ort": self.onnx, "openvino": self.openvino, "tensorrt": self.tensorrt}[backend](hint)
        entry = self.spec.artifacts.get(art)
        art_prec = entry.precision if entry else None
        opts: dict[str, Any] = {}
        label = backend
        if backend == "ort":
            opts = {"providers": list(providers), "precision": art_prec or self.precision or "fp32"}
            label = "ort[" + ",".join(providers) + "]"
        elif backend == "openvino":
            # an INT8 IR's float remainder runs at the precision its gate passed at (the default rule)
            prec = None if (art_prec == "int8" and self.precision == "int8") else self.precision
            opts = {"precision": prec or default_precision(backend, entry), "artifact_precision": art_prec}
        elif backend == "tensorrt":
            opts = {"precision": self.precision, "artifact_precision": art_prec,
                    "onnx_sha256s": _onnx_shas(self.spec)}
        return Candidate(backend, art, self._with_sidecars(art), opts, label)


def accepted_options(cls: type, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the options ``cls.__init__`` takes, the names it does not): auto passes only what a backend knows."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(options), []
    ok = {k: v for k, v in options.items() if k in params}
    return ok, [k for k in options if k not in params]


def artifact_hint(engine_dir: Path, spec: EngineSpec, hint_path: Path | None, backend: str,
          precision: str | None) -> str | None:
    """The artifact the user pointed at (as a relative path), checked against backend/precision."""
    if hint_path is None:
        return None
    rel = hint_path.resolve().relative_to(engine_dir.resolve()).as_posix()
    suffix = PurePosixPath(rel).suffix
    fits = {"ort": (".onnx",), "openvino": (".xml", ".onnx"), "tensorrt": (".plan", ".engine")}
    if suffix not in _SUFFIX_BACKEND:
        raise DeployError(f"{display_path(hint_path)}: not a runnable artifact (expected .onnx, .xml or .plan, "
                          "or the engine directory)")
    if backend != "auto" and suffix not in fits[backend]:
        raise DeployError(f"{display_path(hint_path)}: backend '{backend}' cannot run this file; use backend "
                          f"'{_SUFFIX_BACKEND[suffix]}' or pass the engine directory")
    entry = spec.artifacts.get(rel)
    if precision and entry and entry.precision and entry.precision != precision and suffix != ".xml":
        raise DeployError(f"{display_path(hint_path)}: is {entry.precision}, but precision {precision} was "
                          "requested")
    return rel

def explicit_candidates(planner: Planner, backend: str, hint: str | None, options: dict[str, Any]) -> list[Candidate]:
    providers = options.pop("providers", ("cpu",))
    if backend == "ort":
        return [planner.candidate("ort", hint, providers)]
    return [planner.candidate(backend, hint)]

def auto_candidates(planner: Planner, hint: str | None, notes: list[str], threads: int | None = None) -> list[Candidate]:
    """Static order (module docstring); with no precision and no file requested, the fastest gated CPU
    variant this machine timed (``timings.json``), else the static preference's first gated variant for this
    CPU (:mod:`stlm_deploy.timings`), goes before the CPU ones."""
    hint_backend = _SUFFIX_BACKEND[PurePosixPath(hint).suffix] if hint else None
    if hint_backend in ("tensorrt", "openvino"):  # the file names its backend: let it say why it can't run
        return [planner.candidate(hint_backend, hint)]
    cands: list[Candidate] = []

    def add(backend: str, why_not: str | None, source: Planner = planner, **kw: Any) -> None:
        if hint_backend and hint_backend != backend:
            return
        if why_not:
            notes.append(f"{kw.get('label', backend)}: {why_not}")
            return
        try:
            cand = source.candidate(backend, hint, **{k: v for k, v in kw.items() if k != "label"})
        except BackendUnavailable as e:
            notes.append(f"{kw.get('label', backend)}: {e}")
            return
        if not any((c.backend, c.artifact, c.options) == (cand.backend, cand.artifact, cand.options) for c in cands):
            cands.append(cand)

    add("tensorrt", None if tensorrt_available() else "tensorrt (with cuda-python) not installed")
    ort_ok = module_importable("onnxruntime")
    cuda_ok = False
    if ort_ok:
        from .backends.ort import ort_available_providers

        cuda_ok = "CUDAExecutionProvider" in ort_available_providers()
    add("ort", None if cuda_ok else ("onnxruntime has no CUDAExecutionProvider" if ort_ok else
                                     "onnxruntime not installed"), providers=("cuda",), label="ort[cuda]")
    if hint is None and planner.precision is None:
        from .backends.base import default_threads
        from .timings import measured_pick, static_pick

        cpu = [b for b, ok in (("openvino", module_importable("openvino")), ("ort", ort_ok)) if ok]
        pick = measured_pick(planner.dir, planner.spec, threads or default_threads(), cpu)
        notes.append(f"timings: {pick.note}")
        if not pick.backend:  # right after stlm-export: the measured static preference for this CPU
            pick = static_pick(planner.spec, cpu)
            notes.append(f"static: {pick.note}")
        if pick.backend:
            extra: dict[str, Any] = {"providers": ("cpu",)} if pick.backend == "ort" else {}
            add(pick.backend, None, Planner(planner.dir, planner.spec, pick.precision),
                label=f"{pick.backend}/{pick.precision}", **extra)
    add("openvino", None if module_importable("openvino") else "openvino not installed")
    add("ort", None if ort_ok else "onnxruntime not installed", providers=("cpu",), label="ort[cpu]")
    if not cands:
        raise DeployError(f"{planner.where}: no backend can run this engine here ({' | '.join(notes)}); "
                          "install one: pip install 'stlm-deploy[cpu]' (onnxruntime) or '[openvino]'")
    return cands


def _backend_options(klass: type, cand: Candidate, options: dict[str, Any], auto: bool) -> dict[str, Any]:
    """The constructor options of one candidate: auto passes what the backend knows; an explicit backend
    gets everything and an unknown option is an error (``threads`` is dropped where meaningless)."""
    if auto:
        return {**cand.options, **accepted_options(klass, options)[0]}
    merged = {**cand.options, **options}
    if "threads" in merged and "threads" not in inspect.signature(klass.__init__).parameters:
        merged.pop("threads")  # generic CPU option; meaningless for GPU backends
    unknown = accepted_options(klass, merged)[1]
    if unknown:
        raise DeployError(f"{cand.backend} backend: unknown option(s) {', '.join(sorted(unknown))}")
    return merged


def open_backend(engine_dir: Path, spec: EngineSpec, backend: str, precision: str | None, hint_path: Path | None,
                 threads: int | None, verify: bool, options: dict[str, Any]) -> tuple[Backend, Candidate, list[str]]:
    """Try each candidate in order; -> (the first activated backend, its candidate, notes on the ones skipped).

    An explicit backend has one candidate and its failure is raised as it is; ``auto`` notes why each one
    could not run here and goes on. Checksums (``verify``) are checked before a candidate's files are opened.
    """
    planner = Planner(engine_dir, spec, precision)
    hint = artifact_hint(engine_dir, spec, hint_path, backend, precision)
    if threads is not None:
        options["threads"] = threads
    auto = backend == "auto"
    if auto and "providers" in options:
        raise DeployError("providers: only valid with backend='ort' (auto chooses CUDA or CPU itself)")
    notes: list[str] = []
    cands = auto_candidates(planner, hint, notes, threads) if auto else \
        explicit_candidates(planner, backend, hint, options)
    last_error: DeployError | None = None
    for cand in cands:
        klass = backend_class(cand.backend)
        kwargs = _backend_options(klass, cand, options, auto)
        if verify:
            verify_artifacts(engine_dir, spec, cand.verify)
        runner = klass(engine_dir / cand.artifact, **kwargs)
        try:
            runner.activate()
        except BackendUnavailable as e:
            if not auto:
                raise
            notes.append(f"{cand.label}: {e}")
            last_error = e
            continue
        return runner, cand, notes
    if len(cands) == 1 and last_error is not None:
        raise last_error
    detail = " | ".join(notes) if notes else (str(last_error) if last_error else "no candidates")
    raise DeployError(f"{display_path(engine_dir)}: no backend can run this engine here ({detail})")
