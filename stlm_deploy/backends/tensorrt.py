"""Native TensorRT backend (TensorRT 10/11 tensor-name API + cuda-python), fastest on NVIDIA GPUs.

Runs ``model.plan`` as exported (no header: ``trtexec --loadEngine`` and Triton read the same file).
A plan only deserialises on the TensorRT version and GPU architecture that built it, and the
failure TensorRT reports is cryptic, so before deserialising we compare the ``model.plan.json``
sidecar with the installed TensorRT and the current GPU (:func:`check_plan_compatibility`, pure and
unit-tested) and raise one clear line on mismatch.

Execution: ``deserialize_cuda_engine`` -> one execution context + one CUDA stream; device buffers
(``cudaMalloc``) and page-locked host buffers (``cudaMallocHost``) grow on demand; per call:
``set_input_shape`` (dynamic batch), ``set_tensor_address``, H2D copy, ``execute_async_v3``, D2H
copies, stream sync. With ``cuda_graph=True`` the whole sequence is captured into a CUDA graph
after one warm-up run at a given shape and replayed while the shape stays the same.

Thread-safety: one context/stream/buffer set, so ``infer`` holds a lock (calls are serialised; for
parallel GPU work create one backend per thread); each call first makes the backend's device current
in the calling thread (``cudaSetDevice``), since CUDA's current device is per thread. ``tensorrt``
and ``cuda`` are imported only inside ``activate``.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import BackendUnavailable, DeployError
from ..spec import display_path, normalize_precision
from .base import Backend, first_line, import_or_unavailable

__all__ = ["TensorRTBackend", "check_plan_compatibility", "check_plan_source", "PlanMismatch",
           "TRT_EXTRA_MESSAGE", "import_tensorrt", "import_cudart", "parse_version"]

log = logging.getLogger(__name__)

TRT_EXTRA_MESSAGE = ("TensorRT backend needs the 'trt' extra: pip install 'stlm-deploy[trt]' "
                     "(tensorrt, cuda-python) and an NVIDIA GPU")
_REBUILD = "rebuild the plan on this machine (stlm-export --target tensorrt) or use backend 'ort'"


class PlanMismatch(BackendUnavailable):
    """The plan was built for another TensorRT version or GPU architecture."""


# ------------------------------------------------------------------------------------ pure checks
def parse_version(v: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric suffixes ('10.8.0.post1') are ignored."""
    parts = []
    for p in str(v).strip().split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {v!r}")
    return tuple(parts)


def _parse_cc(cc: Any) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(cc))
    if not m:
        raise ValueError(f"compute capability must look like '8.9', got {cc!r}")
    return int(m.group(1)), int(m.group(2))


def _flags(sidecar: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for key in ("flags", "builder_flags", "precision_flags"):
        v = sidecar.get(key)
        if isinstance(v, (list, tuple)):
            out |= {str(x).upper() for x in v}
        elif isinstance(v, dict):
            out |= {str(k).upper() for k, on in v.items() if on}
    return out


def check_plan_compatibility(sidecar: dict[str, Any], trt_version: str, gpu_name: str,
                             compute_capability: str, *, where: str = "model.plan") -> None:
    """Raise :class:`PlanMismatch` (one line) if the plan described by ``sidecar`` cannot run here.

    Rules (TensorRT's own): without version compatibility a plan needs the exact TensorRT
    major.minor.patch that built it; with ``version_compatible`` (or flag VERSION_COMPATIBLE) any
    later version of the same major. The GPU needs the same compute capability, or >= 8.0 for
    ``hardware_compatibility_level: AMPERE_PLUS``. A different GPU model with the same compute
    capability only logs a warning (it runs, possibly with sub-optimal tactics).
    """
    side = f"{where}.json" if not where.endswith(".json") else where
    if not isinstance(sidecar, dict):
        raise PlanMismatch(f"{side}: must be a JSON object describing the plan; re-export the TensorRT plan")
    for key in ("tensorrt_version", "compute_capability"):
        if not isinstance(sidecar.get(key), str) or not sidecar.get(key):
            raise PlanMismatch(f"{side}: field '{key}' is missing or not a string, so the plan's compatibility "
                               "cannot be checked; re-export the TensorRT plan")
    try:
        built_v, here_v = parse_version(sidecar["tensorrt_version"]), parse_version(trt_version)
        built_cc, here_cc = _parse_cc(sidecar["compute_capability"]), _parse_cc(compute_capability)
    except ValueError as e:
        raise PlanMismatch(f"{side}: {e}") from e
    built_name = str(sidecar.get("gpu_name") or "an unknown GPU")
    version_compatible = bool(sidecar.get("version_compatible")) or "VERSION_COMPATIBLE" in _flags(sidecar)
    v_built, v_here = ".".join(map(str, built_v[:3])), ".".join(map(str, here_v[:3]))
    if version_compatible:
        if built_v[0] != here_v[0] or here_v[:3] < built_v[:3]:
            raise PlanMismatch(f"{where}: built version-compatible with TensorRT {v_built}, which needs TensorRT "
                               f"{built_v[0]}.x >= {v_built}, but {v_here} is installed; {_REBUILD}")
    elif built_v[:3] != here_v[:3]:
        raise PlanMismatch(f"{where}: built with TensorRT {v_built} but TensorRT {v_here} is installed; plans "
                           f"load only on the TensorRT version that built them: {_REBUILD} or install "
                           f"tensorrt=={v_built}")
    level = str(sidecar.get("hardware_compatibility_level") or "NONE").upper()
    cc_b, cc_h = "%d.%d" % built_cc, "%d.%d" % here_cc
    if level == "AMPERE_PLUS":
        if here_cc < (8, 0):
            raise PlanMismatch(f"{where}: built for Ampere or newer GPUs (compute capability >= 8.0) but this GPU "
                               f"is {gpu_name} ({cc_h}); {_REBUILD}")
    elif built_cc != here_cc:
        raise PlanMismatch(f"{where}: built for {built_name} (compute capability {cc_b}) but this GPU is "
                           f"{gpu_name} ({cc_h}); a plan runs only on the compute capability it was built for: "
                           f"{_REBUILD}")
    elif sidecar.get("gpu_name") and str(sidecar["gpu_name"]).strip() != str(gpu_name).strip() \
            and level == "NONE":
        log.warning("%s: built on %s, running on %s (same compute capability %s): it works, but tactics were "
                    "tuned for the other GPU; rebuild for best latency", where, built_name, gpu_name, cc_h)


def check_plan_source(sidecar: dict[str, Any], onnx_sha256s: Iterable[str], *, where: str = "model.plan") -> None:
    """Raise DeployError if the plan was built from an ONNX file that is not in this engine (stale plan)."""
    built_from = sidecar.get("onnx_sha256") if isinstance(sidecar, dict) else None
    known = {s for s in onnx_sha256s if s}
    if built_from and known and built_from not in known:
        raise DeployError(f"{where}: built from an ONNX model (sha256 {str(built_from)[:12]}...) that is not "
                          "one of this engine's ONNX artifacts: the plan is stale; re-export the engine")


# ---------------------------------------------------------------------------------- lazy imports
def import_tensorrt() -> Any:
    """``import tensorrt`` or BackendUnavailable with the install hint."""
    return import_or_unavailable("tensorrt", TRT_EXTRA_MESSAGE, with_reason=False)


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6), else legacy ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise BackendUnavailable(TRT_EXTRA_MESSAGE) from e
    return cudart


class _Cuda:
    """cuda-python calls return ``(err, *values)``: unwrap them and turn errors into DeployError."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.success = cudart.cudaError_t.cudaSuccess

    def __call__(self, result: Any, what: str, exc: type[DeployError] = DeployError) -> Any:
        if not isinstance(result, tuple):
            result = (result,)
        err, values = result[0], result[1:]
        if err != self.success:
            name = getattr(err, "name", str(err))
            raise exc(f"CUDA {what} failed: {name}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values


def _sidecar_precision(sidecar: dict[str, Any]) -> str | None:
    """The plan precision from the sidecar when stlm.json does not list one ("fp16" or ["fp16", ...])."""
    v = sidecar.get("precision")
    if isinstance(v, (list, tuple)):
        v = v[0] if len(v) == 1 else None
    try:
        return normalize_precision(v) if isinstance(v, str) else None
    except DeployError:
        return None


def _decode_name(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return str(raw).split("\0", 1)[0].strip()


class _Buffer:
    """A device buffer plus a page-locked host mirror of the same size (grown on demand)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.device = 0
        self.host = 0

    def host_view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_uint8 * n).from_address(self.host)
        return np.frombuffer(raw, dtype=np.uint8, count=n).view(dtype).reshape(shape)


class TensorRTBackend(Backend):
    """TensorRT engine from ``model.plan`` (checked against ``model.plan.json`` first).

    Args:
      path: the plan file.
      sidecar: its JSON sidecar (default ``<plan>.json``).
      device_id: CUDA device index.
      cuda_graph: capture H2D + enqueue + D2H into a CUDA graph after a warm-up at each new shape.
      precision: precision the caller asks for; an error if the plan was built for another one.
      artifact_precision: the plan's precision as recorded in stlm.json.
      onnx_sha256s: this engine's ONNX checksums, to detect a plan built from another model.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, sidecar: str | os.PathLike | None = None, device_id: int = 0,
                 cuda_graph: bool = False, precision: str | None = None, artifact_precision: str | None = None,
                 onnx_sha256s: Iterable[str] = ()) -> None:
        super().__init__(path)
        self.sidecar_path = Path(sidecar) if sidecar else self.path.with_name(self.path.name + ".json")
        self.device_id = int(device_id)
        self.cuda_graph = bool(cuda_graph)
        self.requested_precision = normalize_precision(precision)
        self.artifact_precision = normalize_precision(artifact_precision)
        self.onnx_sha256s = list(onnx_sha256s)
        self.gpu_name: str | None = None
        self.compute_capability: str | None = None
        self.trt_version: str | None = None
        self._lock = threading.Lock()
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._trt = self._cuda = self._runtime = self._engine = self._context = self._stream = None
        self._logger = None
        self._stream_handle: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._graph: Any = None
        self._graph_exec: Any = None
        self._graph_shape: tuple[int, ...] | None = None
        self._warm_shape: tuple[int, ...] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.graph_launches = 0

    # ------------------------------------------------------------------ activation
    def _read_sidecar(self) -> dict[str, Any]:
        where = display_path(self.sidecar_path)
        if not self.sidecar_path.is_file():
            raise DeployError(f"{where}: missing; the runtime needs the plan's sidecar to check TensorRT/GPU "
                              "compatibility; re-export the TensorRT plan")
        try:
            data = json.loads(self.sidecar_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DeployError(f"{where}: unreadable ({first_line(e)}); re-export the TensorRT plan") from e
        if not isinstance(data, dict):
            raise DeployError(f"{where}: must be a JSON object; re-export the TensorRT plan")
        return data

    def _activate(self) -> None:
        trt = import_tensorrt()
        cuda = _Cuda(import_cudart())
        rt = cuda.rt
        where = display_path(self.path)
        if not self.path.is_file():
            raise DeployError(f"{where}: TensorRT plan not found")
        sidecar = self._read_sidecar()
        try:
            count = cuda(rt.cudaGetDeviceCount(), "cudaGetDeviceCount", BackendUnavailable)
        except BackendUnavailable as e:
            raise BackendUnavailable(f"tensorrt: no usable NVIDIA GPU/driver ({e})") from e
        if not count or self.device_id >= count:
            raise BackendUnavailable(f"tensorrt: CUDA device {self.device_id} not found ({count or 0} visible)")
        cuda(rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        prop = cuda(rt.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        self.gpu_name = _decode_name(prop.name)
        self.compute_capability = f"{int(prop.major)}.{int(prop.minor)}"
        self.trt_version = str(trt.__version__)
        check_plan_compatibility(sidecar, self.trt_version, self.gpu_name, self.compute_capability, where=where)
        check_plan_source(sidecar, self.onnx_sha256s, where=where)
        plan_precision = self.artifact_precision or _sidecar_precision(sidecar)
        if self.requested_precision and plan_precision and self.requested_precision != plan_precision:
            raise BackendUnavailable(f"{where}: the plan was built for {plan_precision}, {self.requested_precision} "
                                     "was requested; export a plan with that precision or drop the precision "
                                     "option")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise DeployError(f"{where}: TensorRT {self.trt_version} could not deserialise the plan (see the "
                              "TensorRT log above); re-export it on this machine")
        context = engine.create_execution_context()
        if context is None:
            raise DeployError(f"{where}: could not create a TensorRT execution context (GPU out of memory?)")
        self._trt, self._cuda, self._engine, self._context = trt, cuda, engine, context
        self._stream = cuda(rt.cudaStreamCreate(), "cudaStreamCreate")
        try:  # cuda-python handles convert to the raw cudaStream_t value with int()
            self._stream_handle = int(self._stream)
        except TypeError:
            self._stream_handle = self._stream
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            try:
                self._dtypes[tname] = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
            except (TypeError, KeyError) as e:
                raise DeployError(f"{where}: tensor {tname!r} has a dtype numpy cannot hold "
                                  f"({engine.get_tensor_dtype(tname)})") from e
            (self._inputs if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else self._outputs).append(tname)
            self._buffers[tname] = _Buffer()
        if len(self._inputs) != 1:
            raise DeployError(f"{where}: expected exactly one input tensor, found {self._inputs}")
        self.input_name = self._inputs[0]
        self.input_dtype = self._dtypes[self.input_name]
        self.input_shape = [int(d) for d in engine.get_tensor_shape(self.input_name)]
        self.output_names = list(self._outputs)
        if self.input_shape and self.input_shape[0] == -1:
            profile_max = engine.get_tensor_profile_shape(self.input_name, 0)[2]
            self.max_batch = int(profile_max[0])
        else:
            self.max_batch = self.fixed_batch
        self.precision = plan_precision
        self.device = f"cuda:{self.device_id}"
        self.providers_used = [f"TensorRT {self.trt_version}", f"{self.gpu_name} (sm {self.compute_capability})"]

    def _deactivate(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            rt = cuda.rt
            rt.cudaSetDevice(self.device_id)  # frees happen on the plan's device, whichever thread closes
            self._drop_graph()
            for buf in self._buffers.values():
                if buf.device:
                    rt.cudaFree(buf.device)
                if buf.host:
                    rt.cudaFreeHost(buf.host)
            if self._stream is not None:
                rt.cudaStreamDestroy(self._stream)
        # Release in dependency order: context -> engine -> runtime.
        self._context = None
        self._engine = None
        self._runtime = None
        self._reset_handles()

    # ------------------------------------------------------------------ memory and graphs
    def _drop_graph(self) -> None:
        rt = self._cuda.rt if self._cuda is not None else None
        if rt is not None and self._graph_exec is not None:
            rt.cudaGraphExecDestroy(self._graph_exec)
        if rt is not None and self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = self._graph_shape = None

    def _ensure(self, name: str, nbytes: int) -> bool:
        """Grow ``name``'s device/host buffers to ``nbytes``; True if they moved (graphs invalid)."""
        buf = self._buffers[name]
        if buf.nbytes >= nbytes:
            return False
        cuda, rt = self._cuda, self._cuda.rt
        if buf.device:
            cuda(rt.cudaFree(buf.device), "cudaFree")
        if buf.host:
            cuda(rt.cudaFreeHost(buf.host), "cudaFreeHost")
        buf.device = buf.host = buf.nbytes = 0
        size = max(int(nbytes), 1)
        buf.device = int(cuda(rt.cudaMalloc(size), f"cudaMalloc({size}) for {name!r}"))
        buf.host = int(cuda(rt.cudaMallocHost(size), f"cudaMallocHost({size}) for {name!r}"))
        buf.nbytes = size
        return True

    def _enqueue(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """H2D input, execute_async_v3, D2H outputs: all asynchronous on the stream (graph-capturable)."""
        cuda, rt = self._cuda, self._cuda.rt
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        inp = self._buffers[self.input_name]
        n_in = int(np.prod(shapes[self.input_name])) * self._dtypes[self.input_name].itemsize
        cuda(rt.cudaMemcpyAsync(inp.device, inp.host, n_in, h2d, self._stream), "cudaMemcpyAsync (input)")
        if not self._context.execute_async_v3(self._stream_handle):
            raise DeployError(f"{display_path(self.path)}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name in self._outputs:
            buf = self._buffers[name]
            n = int(np.prod(shapes[name])) * self._dtypes[name].itemsize
            cuda(rt.cudaMemcpyAsync(buf.host, buf.device, n, d2h, self._stream), f"cudaMemcpyAsync ({name})")

    def _capture(self) -> bool:
        """Record H2D + enqueue + D2H for the current shape; on any failure fall back to plain runs."""
        cuda, rt = self._cuda, self._cuda.rt
        cuda(rt.cudaStreamBeginCapture(self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
             "cudaStreamBeginCapture")
        problem: str | None = None
        try:
            self._enqueue(self._shapes)
        except DeployError as e:
            problem = str(e)
        result = rt.cudaStreamEndCapture(self._stream)  # always end the capture, even after an error
        graph = result[1] if len(result) > 1 else None
        if problem is None and result[0] != cuda.success:
            problem = f"cudaStreamEndCapture: {getattr(result[0], 'name', result[0])}"
        graph_exec = None
        if problem is None:
            inst = rt.cudaGraphInstantiate(graph, 0)
            if inst[0] != cuda.success:
                problem = f"cudaGraphInstantiate: {getattr(inst[0], 'name', inst[0])}"
            else:
                graph_exec = inst[1]
        if problem is not None:
            if graph is not None:
                try:
                    rt.cudaGraphDestroy(graph)
                except Exception:  # noqa: BLE001 - best effort cleanup of a failed capture
                    pass
            log.warning("tensorrt: CUDA graph capture failed, running without CUDA graphs (%s)", problem)
            self.cuda_graph = False
            return False
        self._graph, self._graph_exec = graph, graph_exec
        return True

    # ------------------------------------------------------------------ inference
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.in_flight():  # deactivate() waits for it
            x = self._input_array(feed)
            with self._lock:
                return self._infer_locked(x)

    def _make_current(self) -> None:
        """Make this backend's GPU the calling thread's current CUDA device.

        The CUDA runtime keeps the current device per thread and every new thread starts on device 0:
        without this, a call from a worker thread on a multi-GPU machine would run the plan's buffers and
        stream against another GPU's context. Cheap (no context switch when already current).
        """
        self._cuda(self._cuda.rt.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")

    def _infer_locked(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self._make_current()  # on every call, from whichever thread makes it
        cuda, rt, ctx = self._cuda, self._cuda.rt, self._context
        shape = tuple(int(d) for d in x.shape)
        if self.max_batch is not None and shape[0] > self.max_batch:
            raise DeployError(f"{display_path(self.path)}: batch {shape[0]} exceeds the plan's maximum "
                              f"{self.max_batch} (optimisation profile); split the batch")
        if -1 in self.input_shape and not ctx.set_input_shape(self.input_name, shape):
            raise DeployError(f"{display_path(self.path)}: input shape {shape} is outside the plan's "
                              "optimisation profile")
        shapes = {self.input_name: shape}
        for name in self._outputs:
            shapes[name] = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise DeployError(f"{display_path(self.path)}: output {name!r} has unresolved shape {shapes[name]}")
        moved = False
        for name, shp in shapes.items():
            moved |= self._ensure(name, int(np.prod(shp)) * self._dtypes[name].itemsize)
        if moved:
            self._drop_graph()
            self._warm_shape = None
        for name, buf in self._buffers.items():
            ctx.set_tensor_address(name, buf.device)
        self._shapes = shapes
        np.copyto(self._buffers[self.input_name].host_view(self.input_dtype, shape), x)
        if self.cuda_graph and self._graph_shape != shape:
            self._drop_graph()
            if self._warm_shape == shape and self._capture():
                self._graph_shape = shape
        if self.cuda_graph and self._graph_shape == shape:
            cuda(rt.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
            self.graph_launches += 1
        else:
            self._enqueue(shapes)
            self._warm_shape = shape
        cuda(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: self._buffers[name].host_view(self._dtypes[name], shapes[name]).copy()
                for name in self._outputs}

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(tensorrt_version=self.trt_version, gpu_name=self.gpu_name,
                 compute_capability=self.compute_capability, cuda_graph=self.cuda_graph,
                 thread_safety="one context + stream, calls serialised by a lock")
        return d
