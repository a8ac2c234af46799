"""The one interface every runtime backend implements (Polygraphy-style runner).

``activate()`` loads the model (the expensive part), ``infer(feed)`` maps ``{input_name: array}`` to
``{output_name: array}`` with the graph contract's names, ``deactivate()`` frees everything. Backends
are created cheaply (no heavy import, no file access) so selection and error reporting stay fast;
heavy packages (onnxruntime, openvino, tensorrt, cuda) are imported inside ``activate``.
"""
from __future__ import annotations

import abc
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from ..errors import BackendUnavailable, DeployError

__all__ = ["Backend", "dim_or_dynamic", "default_threads", "first_line", "import_or_unavailable"]


def default_threads() -> int:
    """CPUs this process may use (affinity-aware ``os.cpu_count()``): the default thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """First non-empty line of a library error (ORT/OpenVINO/TensorRT errors span many lines)."""
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__ if
                isinstance(e, BaseException) else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def dim_or_dynamic(d: Any) -> int:
    """Static dims stay ints; symbolic/unknown dims (``'N'``, ``None``, ``-1``, ``?``) become -1."""
    try:
        v = int(d)
    except (TypeError, ValueError):
        return -1
    return v if v >= 0 else -1


class Backend(abc.ABC):
    """Base runner. Subclasses fill the attributes below in ``_activate`` and implement ``infer``.

    Attributes (valid once active):
      name            backend id used by ``Detector.load(backend=...)``
      path            the artifact it runs
      precision       precision actually used ("fp32", "fp16", "bf16", "int8") or None if unknown
      device          where it runs ("cpu", "cuda:0", ...)
      providers_used  what the library really uses (ORT providers, OpenVINO device, TensorRT version)
      input_name / input_dtype / input_shape  the graph input (-1 = dynamic dim)
      output_names    graph outputs in order
      max_batch       largest batch one ``infer`` accepts (None = unbounded, dynamic)
    ``infer`` is safe to call from several threads at once (each backend documents how); each call runs
    inside :meth:`in_flight`, so ``deactivate()`` waits for the calls in flight and a backend activated in
    another process (a ``fork`` child) refuses to run with one line instead of corrupting the heap.
    """

    name: ClassVar[str] = "base"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.precision: str | None = None
        self.device: str = "cpu"
        self.providers_used: list[str] = []
        self.input_name: str = ""
        self.input_dtype: np.dtype = np.dtype(np.uint8)
        self.input_shape: list[int] = []
        self.output_names: list[str] = []
        self.max_batch: int | None = None
        self._active = False
        self._state_lock = threading.Lock()
        self._calls = 0  # infer calls in flight
        self._closing = False
        self._flight = threading.Condition()
        self._pid: int | None = None  # process that activated it
        self._depth = threading.local()  # in_flight() nesting of the current thread (predict -> infer)

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> "Backend":
        """Load the model; idempotent and thread-safe (the first caller does the work)."""
        with self._state_lock:
            if not self._active:
                try:
                    self._activate()
                except BaseException:
                    try:  # free whatever the failed activation already acquired (sessions, GPU memory)
                        self._deactivate()
                    except Exception:  # noqa: BLE001 - the original error matters more
                        pass
                    raise
                self._pid = os.getpid()
                self._active = True
        return self

    def deactivate(self) -> None:
        """Release sessions, requests and device memory once the calls in flight have returned (new calls
        are refused meanwhile); the backend can be activated again.

        In a forked child the handles belong to the parent's runtime (its thread pools and GPU context
        do not exist here): they are dropped from this object without being released.
        """
        with self._flight:
            self._closing = True
            while self._calls:
                self._flight.wait()
        try:
            with self._state_lock:
                if self._active:
                    try:
                        if self._pid == os.getpid():
                            self._deactivate()
                    finally:
                        self._active = False
        finally:
            with self._flight:
                self._closing = False

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feed`` and return every output by name (host numpy arrays)."""

    # ------------------------------------------------------------------ helpers
    @property
    def fixed_batch(self) -> int | None:
        """Batch size the graph was built for when it is static, else None."""
        b = self.input_shape[0] if self.input_shape else -1
        return b if b > 0 else None

    def _require_active(self) -> None:
        if not self._active:
            raise DeployError(f"{self.name} backend: call activate() (or use it as a context manager) "
                              "before infer()")

    def check_process(self) -> None:
        """One-line error when this backend was activated in another process (used after ``fork``)."""
        if self._pid is not None and self._pid != os.getpid():
            raise DeployError(f"{self.name} backend for {self.path.name}: activated in process {self._pid} and "
                              f"used in forked child {os.getpid()}; ONNX Runtime/OpenVINO/CUDA state does not "
                              "survive fork: create the Detector in the child (or use the 'spawn' start method)")

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count one call in flight (``deactivate`` waits for it); refuse a closed backend or a forked child.

        Re-entrant per thread: a ``Detector.predict`` that was admitted may call ``infer`` as often as it
        needs, even once ``close()`` has started waiting for it.
        """
        self.check_process()
        depth = getattr(self._depth, "n", 0)
        if not depth:
            with self._flight:
                if self._closing:
                    raise DeployError(f"{self.name} backend: closed (close() was called while this call was "
                                      "starting); load the Detector again")
                self._require_active()
                self._calls += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if not depth:
                with self._flight:
                    self._calls -= 1
                    if not self._calls:
                        self._flight.notify_all()


    def _input_array(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The feed's input as a C-contiguous array of the graph's dtype (one-line error otherwise)."""
        if self.input_name not in feed:
            raise DeployError(f"{self.name} backend: feed must contain input {self.input_name!r}, "
                              f"got {sorted(feed)}")
        x = feed[self.input_name]
        if x.dtype != self.input_dtype:
            raise DeployError(f"{self.name} backend: input {self.input_name!r} must be {self.input_dtype}, "
                              f"got {x.dtype}")
        return np.ascontiguousarray(x)

    def info(self) -> dict[str, Any]:
        """What is really running: for logs, ``Detector.info()`` and benchmark tables."""
        return {"backend": self.name, "artifact": str(self.path), "precision": self.precision,
                "device": self.device, "providers": list(self.providers_used),
                "input": {"name": self.input_name, "dtype": str(self.input_dtype),
                          "shape": list(self.input_shape)},
                "outputs": list(self.output_names), "max_batch": self.max_batch}

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<{type(self).__name__} {self.path} {state} precision={self.precision} device={self.device}>"


def import_or_unavailable(module: str, hint: str, with_reason: bool = True) -> Any:
    """Import a backend's heavy dependency lazily; if it is missing, say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"{hint} ({first_line(e)})" if with_reason else hint) from e
