"""OpenVINO backend (CPU edge engine; reads ``openvino/model.xml`` or the ONNX file directly).

Compiled with ``PERFORMANCE_HINT=LATENCY`` (one stream, all threads on one request: what a camera
loop wants), ``INFERENCE_NUM_THREADS`` configurable and ``INFERENCE_PRECISION_HINT`` from
``precision``. The CPU plugin silently runs in bf16 on CPUs with BF16 support and silently ignores
hints it cannot honour, so: bf16/f16 are only requested when ``OPTIMIZATION_CAPABILITIES`` lists
them (otherwise f32 is requested and a warning logged), and the precision actually used is read
back from the compiled model and reported.

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
      max_requests: size of the InferRequest pool (default: max(2, the compiled model's optimal number
        of infer requests)); concurrent callers beyond it wait for a free request.
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str | None = None, threads: int | None = None,
                 device: str = "CPU", cache_dir: str | os.PathLike | None = None,
                 artifact_precision: str | None = None, max_requests: int | None = None) -> None:
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
        self._compiled: Any = None
        self._idle: list[Any] = []
        self._created = 0
        self._pool = threading.Condition()

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
            compiled = core.compile_model(model, self.ov_device, config)
        except Exception as e:
            raise DeployError(f"{self.path}: OpenVINO cannot compile the model for {self.ov_device} "
                              f"({first_line(e)})") from e
        self._compiled = compiled
        try:
            used = compiled.get_property(hints.inference_precision)
            name = used.get_type_name() if hasattr(used, "get_type_name") else str(used)
        except Exception:  # some devices do not expose the property
            name = hint or ""
        self.inference_precision = _FROM_OV.get(name.lower(), name.lower() or None)
        self.precision = "int8" if self.artifact_precision == "int8" else self.inference_precision
        self.providers_used = [f"OpenVINO {ov.get_version().split('-')[0]} {self.ov_device}"]
        if len(compiled.inputs) != 1:
            raise DeployError(f"{self.path}: expected exactly one graph input, found "
                              f"{[i.get_any_name() for i in compiled.inputs]}")
        port = compiled.inputs[0]
        self.input_name = port.get_any_name()
        self.input_dtype = np.dtype(port.get_element_type().to_dtype())
        self.input_shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
        self._out_ports = list(compiled.outputs)
        self.output_names = [p.get_any_name() for p in self._out_ports]
        self.max_batch = self.fixed_batch
        optimal = 1
        try:
            optimal = int(compiled.get_property(props.optimal_number_of_infer_requests))
        except Exception:  # noqa: BLE001 - not every device reports it
            pass
        self.max_requests = self.requested_max_requests or max(2, optimal)
        with self._pool:
            self._idle, self._created = [], 0

    def _acquire(self) -> Any:
        """An idle request, a new one while fewer than ``max_requests`` exist, else wait for one."""
        with self._pool:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._created < self.max_requests:
                    self._created += 1
                    break
                self._pool.wait()
        try:
            return self._compiled.create_infer_request()
        except BaseException:
            with self._pool:
                self._created -= 1
                self._pool.notify()
            raise

    def _release(self, req: Any) -> None:
        with self._pool:
            self._idle.append(req)
            self._pool.notify()

    @property
    def requests_created(self) -> int:
        """InferRequests alive in the pool (never more than ``max_requests``)."""
        with self._pool:
            return self._created

    def _deactivate(self) -> None:
        with self._pool:
            self._idle.clear()
            self._created = 0
            self._pool.notify_all()
        self._out_ports = []
        self._compiled = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.in_flight():  # deactivate() waits for it
            x = self._input_array(feed)
            req = self._acquire()
            try:
                try:
                    res = req.infer({self.input_name: x})
                except Exception as e:
                    raise DeployError(f"{self.path}: OpenVINO inference failed on input {x.dtype} {tuple(x.shape)} "
                                      f"({first_line(e)})") from e
                # Copy: the request reuses its output buffers on its next call (from any thread).
                return {name: np.array(res[port], copy=True) for name, port in zip(self.output_names, self._out_ports)}
            finally:
                self._release(req)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(threads=self.threads, requested_precision=self.requested_precision,
                 inference_precision=self.inference_precision, notes=list(self.notes),
                 max_requests=self.max_requests, requests_created=self.requests_created,
                 thread_safety=f"a pool of at most {self.max_requests} InferRequests shared by all threads")
        return d
