"""OpenVINO backend (CPU edge engine; reads ``openvino/model.xml`` or the ONNX file directly).

Compiled with ``PERFORMANCE_HINT=LATENCY`` (one stream, all threads on one request: what a camera
loop wants), ``INFERENCE_NUM_THREADS`` configurable and ``INFERENCE_PRECISION_HINT`` from
``precision``. The CPU plugin silently runs in bf16 on CPUs with BF16 support and silently ignores
hints it cannot honour, so: bf16/f16 are only requested when ``OPTIMIZATION_CAPABILITIES`` lists
them (otherwise f32 is requested and a warning logged), and the precision actually used is read
back from the compiled model and reported.

Static batch 1 (issue 24): with a dynamic batch axis, OpenVINO's CPU plugin runs every layer with
dynamic shapes (shape inference per call, reference transposes): the same IR compiled for a fixed batch
of 1 ran 7-12 % faster at 256 px and 5-9 % at 1024 (f32/bf16, same run). So a dynamic-batch IR is
compiled reshaped to ``[1, H, W, 3]`` for single-image calls (a camera loop, stlm-serve's one-image
requests) and, on the first call with another batch size, once more as it is (dynamic); both are the
same IR at the same precision (``static_batch1=False`` compiles only the dynamic one). The reported
``input_shape`` stays the IR's own, so callers still batch freely. Not for an IR whose stlm.json precision
is ``fp16`` (fp16-stored weights, engines exported before issue 24): OpenVINO's static compilation of
compressed weights is less exact (map 6.5e-5 instead of 1.5e-5 from fp32, a TLM map 4e-2), and those
engines were gated on the dynamic one. The export's gates run one image per call, i.e. on the batch-1
compilation.

Thread-safety: ``InferRequest`` objects come from a bounded pool (at most ``max_requests``, default
``max(2, OPTIMAL_NUMBER_OF_INFER_REQUESTS)``), created on demand from the shared ``CompiledModel``
(whose ``create_infer_request`` is thread-safe) and handed back after each call. A request is used
by one thread at a time, so no lock is held during inference; a caller that finds every request busy
waits for one. Memory stays bounded however many threads call ``infer`` over the backend's life (a
request per thread, kept forever, grew with every new thread). With the LATENCY hint OpenVINO runs
one stream, so more requests would only queue inside OpenVINO anyway.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterable

import numpy as np

from ..errors import BackendUnavailable, DeployError
from ..spec import normalize_precision
from .base import Backend, default_threads, first_line, import_or_unavailable

__all__ = ["OpenVinoBackend", "choose_inference_precision"]

log = logging.getLogger(__name__)

_HINT_NAMES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
_FROM_OV = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16",
            "float16": "fp16", "i8": "int8", "u8": "int8"}


def choose_inference_precision(requested: str | None, capabilities: Iterable[str],
                               device: str = "CPU") -> tuple[str | None, str | None]:
    """OpenVINO hint to request for ``requested`` on a device with ``capabilities`` (pure).

    Returns (hint or None for the device default, note explaining a downgrade or None).
    """
    req = normalize_precision(requested)
    if req is None or req == "int8":  # int8 is a property of the (quantised) IR, not of the hint
        return None, None
    if req == "fp32":
        return "f32", None
    caps = {str(c).upper() for c in capabilities}
    need = _CAPABILITY[req]
    if need in caps:
        return _HINT_NAMES[req], None
    return "f32", (f"{req} requested but OpenVINO {device} reports no {need} support "
                   f"(OPTIMIZATION_CAPABILITIES: {', '.join(sorted(caps)) or 'none'}); using f32")


def _import_openvino() -> Any:
    return import_or_unavailable("openvino", "openvino backend needs OpenVINO: pip install 'stlm-deploy[openvino]'")


class OpenVinoBackend(Backend):
    """OpenVINO ``CompiledModel`` for ``path`` (IR ``.xml`` with its ``.bin``, or ``.onnx``).

    Args:
      path: ``openvino/model.xml`` or ``model.onnx``.
      precision: "f32"/"fp32", "bf16", "f16"/"fp16" or None (device default, e.g. bf16 on AMX CPUs).
      threads: ``INFERENCE_NUM_THREADS`` (default: the CPUs this process may use; CPU device only).
      device: OpenVINO device name ("CPU"; "GPU"/"NPU"/"AUTO" are passed through untested).
      cache_dir: OpenVINO model cache (``CACHE_DIR``) to skip recompilation on the next start.
      artifact_precision: precision recorded in stlm.json for the file (an int8 IR reports "int8").
      max_requests: size of the InferRequest pool of each compiled shape (default: max(2, the compiled
        model's optimal number of infer requests)); concurrent callers beyond it wait for a free request.
      static_batch1: compile a dynamic-batch model for batch 1 as well (module docstring; default True).
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str | None = None, threads: int | None = None,
                 device: str = "CPU", cache_dir: str | os.PathLike | None = None,
                 artifact_precision: str | None = None, max_requests: int | None = None,
                 static_batch1: bool = True) -> None:
        super().__init__(path)
        self.requested_precision = normalize_precision(precision)
        self.threads = int(threads) if threads else default_threads()
        self.ov_device = device
        self.device = device.lower()
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.artifact_precision = normalize_precision(artifact_precision)
        self.inference_precision: str | None = None
        self.notes: list[str] = []
        if max_requests is not None and int(max_requests) < 1:
            raise DeployError(f"openvino backend: max_requests must be >= 1, got {max_requests!r}")
        self.requested_max_requests = int(max_requests) if max_requests else None
        self.max_requests = 0
        self.static_batch1 = bool(static_batch1)
        self._batch1: _RequestPool | None = None  # the model compiled for batch 1 (a dynamic IR, specialised)
        self._general: _RequestPool | None = None  # the model as it is (dynamic IRs: compiled on first use)
        self._dynamic_model: Any = None  # kept to compile ``_general`` lazily
        self._compile: Any = None  # (core, device, config) for that compilation
        self._lazy = threading.Lock()

    def _activate(self) -> None:
        ov = _import_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        if not self.path.is_file():
            raise DeployError(f"{self.path}: OpenVINO model not found")
        core = ov.Core()
        if self.cache_dir:
            core.set_property({props.cache_dir: self.cache_dir})
        try:
            caps = core.get_property(self.ov_device, props.device.capabilities)
        except Exception as e:
            raise BackendUnavailable(f"openvino: device {self.ov_device!r} is not available "
                                     f"(devices: {', '.join(core.available_devices)}; {first_line(e)})") from e
        hint, note = choose_inference_precision(self.requested_precision, caps, self.ov_device)
        if note:
            self.notes.append(note)
            log.warning("openvino: %s", note)
        config: dict[Any, Any] = {hints.performance_mode: hints.PerformanceMode.LATENCY}
        if self.ov_device.upper().startswith("CPU"):
            config[props.inference_num_threads] = self.threads
        if hint is not None:
            config[hints.inference_precision] = getattr(ov.Type, hint)
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            raise DeployError(f"{self.path}: OpenVINO cannot read the model ({first_line(e)})") from e
        if len(model.inputs) != 1:
            raise DeployError(f"{self.path}: expected exactly one graph input, found "
                              f"{[i.get_any_name() for i in model.inputs]}")
        shape = model.inputs[0].get_partial_shape()
        dims = list(shape) if shape.rank.is_static else []
        # fp16-stored weights (engines exported before issue 24) stay on the dynamic compilation they were gated
        # on: OpenVINO compiles them less exactly for a static shape (module docstring)
        single = (self.static_batch1 and self.artifact_precision != "fp16" and len(dims) > 1 and dims[0].is_dynamic
                  and all(d.is_static for d in dims[1:]))
        target = model
        if single:
            target = model.clone()
            target.reshape({target.inputs[0].get_any_name(): ov.PartialShape([1, *(d.get_length() for d in dims[1:])])})
        self._compile = (core, self.ov_device, config)
        compiled = self._compile_model(target)
        try:
            used = compiled.get_property(hints.inference_precision)
            name = used.get_type_name() if hasattr(used, "get_type_name") else str(used)
        except Exception:  # some devices do not expose the property
            name = hint or ""
        self.inference_precision = _FROM_OV.get(name.lower(), name.lower() or None)
        self.precision = "int8" if self.artifact_precision == "int8" else self.inference_precision
        self.providers_used = [f"OpenVINO {ov.get_version().split('-')[0]} {self.ov_device}"]
        port = model.inputs[0]
        self.input_name = port.get_any_name()
        self.input_dtype = np.dtype(port.get_element_type().to_dtype())
        self.input_shape = [d.get_length() if d.is_static else -1 for d in dims]  # the IR's own, not batch 1
        self.output_names = [p.get_any_name() for p in compiled.outputs]
        self.max_batch = self.fixed_batch
        optimal = 1
        try:
            optimal = int(compiled.get_property(props.optimal_number_of_infer_requests))
        except Exception:  # noqa: BLE001 - not every device reports it
            pass
        self.max_requests = self.requested_max_requests or max(2, optimal)
        pool = _RequestPool(compiled, self.max_requests)
        self._batch1, self._general = (pool, None) if single else (None, pool)
        self._dynamic_model = model if single else None

    def _compile_model(self, model: Any) -> Any:
        core, device, config = self._compile
        try:
            return core.compile_model(model, device, config)
        except Exception as e:
            raise DeployError(f"{self.path}: OpenVINO cannot compile the model for {device} ({first_line(e)})") from e

    def _pool_for(self, batch: int) -> "_RequestPool":
        """The batch-1 model for one image, else the model as it is (compiled on its first use)."""
        if self._batch1 is not None and batch == 1:
            return self._batch1
        with self._lazy:
            if self._general is None:
                self._general = _RequestPool(self._compile_model(self._dynamic_model), self.max_requests)
            return self._general

    @property
    def compiled_shapes(self) -> list[str]:
        """Which compilations exist: "batch 1" (a dynamic IR specialised) and/or "as exported"."""
        return [n for n, p in (("batch 1", self._batch1), ("as exported", self._general)) if p is not None]

    @property
    def requests_created(self) -> int:
        """InferRequests alive (never more than ``max_requests`` per compiled shape)."""
        return sum(p.created for p in (self._batch1, self._general) if p is not None)

    def _deactivate(self) -> None:
        for p in (self._batch1, self._general):
            if p is not None:
                p.clear()
        self._batch1 = self._general = self._dynamic_model = self._compile = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.in_flight():  # deactivate() waits for it
            x = self._input_array(feed)
            pool = self._pool_for(int(x.shape[0]) if x.ndim else 1)
            req = pool.acquire()
            try:
                try:
                    res = req.infer({self.input_name: x})
                except Exception as e:
                    raise DeployError(f"{self.path}: OpenVINO inference failed on input {x.dtype} {tuple(x.shape)} "
                                      f"({first_line(e)})") from e
                # Copy: the request reuses its output buffers on its next call (from any thread).
                return {name: np.array(res[port], copy=True) for name, port in zip(self.output_names, pool.outputs)}
            finally:
                pool.release(req)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(threads=self.threads, requested_precision=self.requested_precision,
                 inference_precision=self.inference_precision, notes=list(self.notes),
                 max_requests=self.max_requests, requests_created=self.requests_created,
                 compiled_shapes=self.compiled_shapes,
                 thread_safety=f"a pool of at most {self.max_requests} InferRequests per compiled shape, shared by "
                               "all threads")
        return d


class _RequestPool:
    """The InferRequests of one CompiledModel: at most ``limit``, created on demand, handed back after each call."""

    def __init__(self, compiled: Any, limit: int) -> None:
        self.compiled, self.limit = compiled, limit
        self.outputs = list(compiled.outputs)
        self.idle: list[Any] = []
        self.created = 0
        self.cond = threading.Condition()

    def acquire(self) -> Any:
        """An idle request, a new one while fewer than ``limit`` exist, else wait for one."""
        with self.cond:
            while True:
                if self.idle:
                    return self.idle.pop()
                if self.created < self.limit:
                    self.created += 1
                    break
                self.cond.wait()
        try:
            return self.compiled.create_infer_request()
        except BaseException:
            with self.cond:
                self.created -= 1
                self.cond.notify()
            raise

    def release(self, req: Any) -> None:
        with self.cond:
            self.idle.append(req)
            self.cond.notify()

    def clear(self) -> None:
        with self.cond:
            self.idle.clear()
            self.created = 0
            self.cond.notify_all()
