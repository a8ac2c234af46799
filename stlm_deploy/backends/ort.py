"""ONNX Runtime backend (CPU, CUDA and TensorRT execution providers).

Two ORT pitfalls are turned into clear errors instead of silent slowness:
  * a requested GPU provider that cannot start makes ORT fall back to CPU with only a warning: after
    creating the session we compare ``session.get_providers()`` with what was asked for;
  * ``onnxruntime`` and ``onnxruntime-gpu`` (or another flavour) installed together both provide the
    ``onnxruntime`` module, and whichever was installed last wins file by file: we refuse to run.
Thread-safety: ``InferenceSession.run`` is documented thread-safe, so one session serves all threads
(concurrent calls share the intra-op thread pool); no lock is taken.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import BackendUnavailable, DeployError
from ..files import atomic_output, atomic_write_json, sha256_file
from .base import Backend, default_threads, dim_or_dynamic, first_line, import_or_unavailable

__all__ = ["OrtBackend", "PROVIDERS", "ORT_DISTRIBUTIONS", "find_ort_conflict", "check_ort_installation",
           "resolve_providers", "ort_available_providers"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
             "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider",
             "dml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider",
             "coreml": "CoreMLExecutionProvider"}
CPU = "CPUExecutionProvider"
# Every PyPI distribution that installs the top-level ``onnxruntime`` package.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-qnn", "onnxruntime-silicon",
                     "onnxruntime-training", "ort-nightly", "ort-nightly-gpu", "ort-nightly-directml")
_ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
              "tensor(double)": np.float64}


def _canonical(dist_name: str) -> str:
    return dist_name.strip().lower().replace("_", "-").replace(".", "-")


def find_ort_conflict(dist_names: Iterable[str]) -> str | None:
    """One-line explanation if several onnxruntime flavours are installed at once, else None (pure)."""
    found = sorted({_canonical(n) for n in dist_names if n} & set(ORT_DISTRIBUTIONS))
    if len(found) < 2:
        return None
    listed = ", ".join(found[:-1]) + " and " + found[-1]
    return (f"{listed} are installed together: they ship the same 'onnxruntime' module and silently "
            f"shadow each other (GPU providers may vanish or crash); run 'pip uninstall -y {' '.join(found)}' "
            "then install exactly one (stlm-deploy[cpu] or stlm-deploy[gpu])")


def _installed_distribution_names() -> list[str]:
    from importlib import metadata

    names = []
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:  # a broken .dist-info must not stop inference
            continue
        if name:
            names.append(name)
    return names


def check_ort_installation(dist_names: Iterable[str] | None = None) -> None:
    """Raise DeployError when the onnxruntime install is ambiguous (see :func:`find_ort_conflict`)."""
    msg = find_ort_conflict(_installed_distribution_names() if dist_names is None else dist_names)
    if msg:
        raise DeployError(f"onnxruntime: {msg}")


def resolve_providers(providers: Sequence[str] | str) -> list[str]:
    """Short names (cpu, cuda, tensorrt) or full ORT names -> ORT provider names, CPU kept last."""
    if isinstance(providers, str):
        providers = [p for p in providers.replace(",", " ").split() if p]
    out: list[str] = []
    for p in providers:
        full = PROVIDERS.get(p.lower(), p)
        if not full.endswith("ExecutionProvider"):
            raise DeployError(f"onnxruntime: unknown execution provider {p!r} (use one of "
                              f"{', '.join(sorted(set(PROVIDERS)))} or a full ORT provider name)")
        if full not in out:
            out.append(full)
    if CPU in out:
        out.remove(CPU)
    return out + [CPU]


def _import_ort() -> Any:
    return import_or_unavailable("onnxruntime", "ort backend needs onnxruntime: pip install 'stlm-deploy[cpu]' "
                                                "(or [gpu] for CUDA)")


def ort_available_providers() -> list[str]:
    """Providers this onnxruntime build offers (empty when onnxruntime is not installed)."""
    try:
        return list(_import_ort().get_available_providers())
    except BackendUnavailable:
        return []


class OrtBackend(Backend):
    """ONNX Runtime session on ``providers`` (default CPU).

    Args:
      path: the ONNX file (``model.onnx`` or ``model.fp16.onnx``).
      providers: ``["cuda"]``, ``["tensorrt", "cuda"]``, ... (CPU is always appended as ORT's fallback
        for unsupported nodes; a requested GPU provider that does not start is an error).
      threads: intra-op threads (default: the CPUs this process may use).
      precision: the artifact's precision, reported by ``info()``; with the TensorRT EP "fp16" also
        enables its fp16 kernels.
      optimized_model_path: cache of the ORT-optimised graph: loaded when it matches this model,
        ORT version and providers, (re)written otherwise. Skips graph optimisation at start-up.
      provider_options: extra per-provider options, e.g. ``{"cuda": {"arena_extend_strategy": ...}}``.
      device_id: GPU index for CUDA/TensorRT providers.
    """

    name = "ort"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | str = ("cpu",),
                 threads: int | None = None, precision: str | None = None,
                 optimized_model_path: str | os.PathLike | None = None,
                 provider_options: dict[str, dict[str, Any]] | None = None, device_id: int = 0) -> None:
        super().__init__(path)
        self.requested_providers = resolve_providers(providers)
        self.threads = int(threads) if threads else default_threads()
        self.requested_precision = precision
        self.optimized_model_path = Path(optimized_model_path) if optimized_model_path else None
        self.provider_options = {PROVIDERS.get(k.lower(), k): dict(v) for k, v in (provider_options or {}).items()}
        self.device_id = int(device_id)
        self.loaded_from_cache = False
        self._session: Any = None

    # ------------------------------------------------------------------ lifecycle
    def _provider_list(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for p in self.requested_providers:
            opts: dict[str, Any] = {}
            if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                     "MIGraphXExecutionProvider"):
                opts["device_id"] = self.device_id
            if p == "TensorrtExecutionProvider" and self.requested_precision == "fp16":
                opts["trt_fp16_enable"] = True
            opts.update(self.provider_options.get(p, {}))
            out.append((p, opts))
        return out

    def _activate(self) -> None:
        ort = _import_ort()
        check_ort_installation()
        if not self.path.is_file():
            raise DeployError(f"{self.path}: ONNX model not found")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3  # errors only: fallbacks are reported by us, as one line
        providers = self._provider_list()
        model_path, cache_write, cache_key = str(self.path), None, None
        if self.optimized_model_path is not None:
            cache_key = {"source_sha256": sha256_file(self.path), "onnxruntime": ort.__version__,
                         "providers": [p for p, _ in providers], "level": "ORT_ENABLE_ALL"}
            if self._cache_matches(cache_key):
                model_path = str(self.optimized_model_path)
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self.loaded_from_cache = True
            else:
                cache_write = self.optimized_model_path
        if cache_write is not None:
            with atomic_output(cache_write) as tmp:
                so.optimized_model_filepath = str(tmp)
                session = self._create(ort, model_path, so, providers)
            atomic_write_json(cache_write.with_name(cache_write.name + ".json"), cache_key)
        else:
            session = self._create(ort, model_path, so, providers)
        self._check_fallback(ort, session)
        self._session = session
        self.providers_used = list(session.get_providers())
        first = self.providers_used[0]
        self.device = "cpu" if first == CPU else (
            f"cuda:{self.device_id}" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
            else first.replace("ExecutionProvider", "").lower())
        inp = session.get_inputs()
        if len(inp) != 1:
            raise DeployError(f"{self.path}: expected exactly one graph input, found {[i.name for i in inp]}")
        self.input_name = inp[0].name
        self.input_dtype = np.dtype(_ORT_TYPES.get(inp[0].type, np.float32))
        self.input_shape = [dim_or_dynamic(d) for d in inp[0].shape]
        self.output_names = [o.name for o in session.get_outputs()]
        self.max_batch = self.fixed_batch
        self.precision = self.requested_precision or "fp32"

    def _create(self, ort: Any, model_path: str, so: Any, providers: list) -> Any:
        try:
            with warnings.catch_warnings():
                # "Specified provider 'X' is not in available provider names": we raise our own error.
                warnings.simplefilter("ignore", UserWarning)
                return ort.InferenceSession(model_path, sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            text = first_line(e)
            gpu = [p for p, _ in providers if p != CPU]
            if gpu and any(k in text for k in ("CUDA", "cuda", "TensorRT", "libcu", "provider")):
                raise BackendUnavailable(f"onnxruntime: {', '.join(gpu)} failed to start ({text}); check the "
                                         "CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs") from e
            raise DeployError(f"{model_path}: onnxruntime cannot load the model ({text})") from e

    def _check_fallback(self, ort: Any, session: Any) -> None:
        got = set(session.get_providers())
        missing = [p for p in self.requested_providers if p != CPU and p not in got]
        if missing:
            offered = ", ".join(ort.get_available_providers())
            raise BackendUnavailable(
                f"onnxruntime: requested {', '.join(missing)} but the session fell back to CPU "
                f"(session providers: {', '.join(session.get_providers())}; this onnxruntime "
                f"{ort.__version__} offers: {offered}); install onnxruntime-gpu matching your CUDA/cuDNN "
                "(and only it), or use backend 'ort' on CPU / 'openvino'")

    def _cache_matches(self, key: dict[str, Any]) -> bool:
        cache = self.optimized_model_path
        assert cache is not None
        meta = cache.with_name(cache.name + ".json")
        if not (cache.is_file() and meta.is_file()):
            return False
        try:
            return json.loads(meta.read_text(encoding="utf-8")) == key
        except (OSError, ValueError):
            return False

    def _deactivate(self) -> None:
        self._session = None

    # ------------------------------------------------------------------ inference
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.in_flight():  # deactivate() waits for it
            x = self._input_array(feed)
            try:
                outs = self._session.run(self.output_names, {self.input_name: x})
            except Exception as e:
                raise DeployError(f"{self.path}: onnxruntime inference failed on input {x.dtype} "
                                  f"{tuple(x.shape)} ({first_line(e)})") from e
            return dict(zip(self.output_names, outs))

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(threads=self.threads, requested_providers=list(self.requested_providers),
                 optimized_model_cache=str(self.optimized_model_path) if self.optimized_model_path else None,
                 loaded_from_cache=self.loaded_from_cache)
        return d
