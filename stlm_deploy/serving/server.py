"""Serve a :class:`~stlm_deploy.detector.Detector` through a real Triton Inference Server (PyTriton).

PyTriton starts the ``tritonserver`` binary bundled in its wheel and a Python-backend model whose
requests come back to this process, where one Detector (the engine's own ``backend="auto"`` rule or
the backend asked for) scores them. Triton gives the KServe V2 protocol over HTTP and gRPC, dynamic
batching, health and statistics endpoints and Prometheus metrics.

Serving contract (docs/DESIGN.md): model ``name`` (default: the engine's), inputs

* ``image``       UINT8 ``[N, H, W, 3]`` RGB (per-request dims ``[-1, -1, 3]``), or
* ``image_bytes`` BYTES ``[N, 1]``, one encoded PNG/JPEG per item (decoded like every image file of
  the toolkit: :func:`stlm_deploy.images.decode_image_rgb`);

outputs ``score`` and ``normalized_score`` FP32 ``[N, 1]``, ``is_anomalous`` BOOL ``[N, 1]`` and, only
when the client asks for it, ``anomaly_map`` FP32 ``[N, H, W]`` at the image size. Engines without an
image threshold answer ``normalized_score`` NaN and ``is_anomalous`` false.

Triton itself rejects a wrong dtype or rank before the model sees the request (one clear line, the
server stays up). Errors raised here (no input, undecodable bytes) fail the dynamic batch the request
was in: PyTriton reports errors per batch, not per request.

The Python-backend stub links ``libpython3.X.so`` and finds the system copy first; with another
interpreter build (pyenv, a venv of another Python) the model fails to load (``'_thread.RLock' object
has no attribute '_recursion_count'``). :func:`python_library_env` puts the running interpreter's
LIBDIR first in ``LD_LIBRARY_PATH``, which PyTriton passes on to the server process.
"""
from __future__ import annotations

import os
import socket
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DeployError
from ..images import DEFAULT_MAX_PIXELS, decode_image_rgb

__all__ = ["ServeOptions", "StlmServer", "DetectorModel", "python_library_env", "wait_model_ready",
           "INPUT_IMAGE", "INPUT_BYTES", "OUTPUTS"]

INPUT_IMAGE, INPUT_BYTES = "image", "image_bytes"
OUTPUTS = ("score", "normalized_score", "is_anomalous", "anomaly_map")
#: endpoints that need PyTriton's access token; statistics stay readable (the load test reads batch_stats)
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]


def python_library_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ``os.environ``, changed in place) with this interpreter's LIBDIR first in
    LD_LIBRARY_PATH, so Triton's Python-backend stub loads the libpython of the Python running us."""
    target = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        parts = [p for p in target.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        target["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return target  # type: ignore[return-value]


def check_port_free(host: str, port: int, flag: str) -> None:
    """One line naming the flag when ``host:port`` is taken (Triton would otherwise fail late and obscurely)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise DeployError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e}); pick a free port")


def wait_model_ready(url: str, name: str, timeout_s: float, alive: Any = None) -> None:
    """Poll ``/v2/models/NAME/ready`` (``/v2/health/ready`` answers before models load) until 200.

    ``alive``: a callable returning False when the server died (stop waiting at once)."""
    deadline = time.monotonic() + timeout_s
    endpoint = f"{url.rstrip('/')}/v2/models/{name}/ready"
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise DeployError(f"stlm-serve: the Triton server exited before model '{name}' was ready")
        try:
            with urllib.request.urlopen(endpoint, timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.2)
    raise DeployError(f"stlm-serve: model '{name}' not ready at {endpoint} after {timeout_s:.0f} s ({last})")


def _items(array: np.ndarray, where: str) -> list[bytes]:
    """The encoded images of one ``image_bytes`` tensor ([N] or [N, 1] of bytes)."""
    flat = np.asarray(array, dtype=object).reshape(-1)
    out = []
    for i, item in enumerate(flat):
        if isinstance(item, str):
            item = item.encode("latin-1")
        if not isinstance(item, (bytes, bytearray)) or not item:
            raise DeployError(f"{where}[{i}]: expected the bytes of one encoded PNG/JPEG image, got "
                              f"{type(item).__name__} of length {len(item) if hasattr(item, '__len__') else '?'}")
        out.append(bytes(item))
    return out


class DetectorModel:
    """The inference callable Triton calls with a list of requests (one dynamic batch).

    All images of the batch go to :meth:`Detector.predict` in one call (in chunks of the Detector's
    batch size), then the results are split back per request.
    """

    def __init__(self, detector: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.det = detector
        self.max_pixels = max_pixels

    def _images(self, req: Any, r: int) -> list[np.ndarray]:
        data = req.data if hasattr(req, "data") else req
        if data.get(INPUT_IMAGE) is not None and data.get(INPUT_BYTES) is not None:
            raise DeployError(f"request {r}: send either '{INPUT_IMAGE}' or '{INPUT_BYTES}', not both")
        if data.get(INPUT_IMAGE) is not None:
            arr = np.asarray(data[INPUT_IMAGE])
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise DeployError(f"request {r}: input '{INPUT_IMAGE}' must be UINT8 [N,H,W,3] RGB, got "
                                  f"{arr.dtype} {list(arr.shape)}")
            return list(arr)
        if data.get(INPUT_BYTES) is not None:
            where = f"request {r}: input '{INPUT_BYTES}'"
            images = []
            for i, blob in enumerate(_items(data[INPUT_BYTES], where)):
                images.append(decode_image_rgb(blob, f"{where}[{i}]", self.max_pixels))
            return images
        raise DeployError(f"request {r}: no input: send '{INPUT_IMAGE}' (UINT8 [N,H,W,3]) or '{INPUT_BYTES}' "
                          "(BYTES [N,1], PNG/JPEG)")

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        per_request = [self._images(req, r) for r, req in enumerate(requests)]
        flat = [im for ims in per_request for im in ims]
        preds = self.det.predict(flat) if flat else []
        responses, k = [], 0
        for r, (req, ims) in enumerate(zip(requests, per_request)):
            mine = preds[k:k + len(ims)]
            k += len(ims)
            out = {"score": np.asarray([p.score for p in mine], dtype=np.float32).reshape(-1, 1),
                   "normalized_score": np.asarray([np.nan if p.normalized_score is None else p.normalized_score
                                                   for p in mine], dtype=np.float32).reshape(-1, 1),
                   "is_anomalous": np.asarray([bool(p.is_anomalous) for p in mine], dtype=bool).reshape(-1, 1)}
            wanted = getattr(req, "requested_output_names", None)
            if wanted is None or "anomaly_map" in wanted:
                shapes = {p.anomaly_map.shape for p in mine}
                if len(shapes) > 1:
                    raise DeployError(f"request {r}: anomaly_map asked for images of different sizes "
                                      f"{sorted(shapes)}: send them in separate requests")
                out["anomaly_map"] = np.stack([p.anomaly_map for p in mine]).astype(np.float32)
            responses.append(out)
        return responses


@dataclass
class ServeOptions:
    """What ``stlm-serve`` can be asked (CLI flags map 1:1 onto these fields)."""

    name: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None  # default: the engine's fixed batch, else the Detector's chunk (8)
    max_queue_delay_us: int = 2000
    instances: int = 1
    dynamic_batching: bool = True
    ready_timeout_s: float = 120.0
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    log_verbose: int = 0


class StlmServer:
    """One Triton server serving one Detector; ``start()`` returns once the model answers ready."""

    def __init__(self, detector: Any, options: ServeOptions | None = None) -> None:
        self.det = detector
        self.opts = options or ServeOptions()
        self.name = self.opts.name or detector.spec.name
        fixed = detector.fixed_batch
        self.max_batch = int(self.opts.max_batch or fixed or detector.chunk_size)
        if fixed and self.max_batch != fixed:
            raise DeployError(f"--max-batch {self.max_batch}: engine '{detector.spec.name}' has a fixed batch of "
                              f"{fixed}; leave --max-batch out or pass {fixed}")
        if self.opts.instances < 1:
            raise DeployError(f"--instances: expected a positive integer, got {self.opts.instances}")
        self._triton: Any = None

    @property
    def http_url(self) -> str:
        return f"http://{self.opts.host}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.opts.host}:{self.opts.grpc_port}"

    def _bind(self, triton: Any) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        inputs = [Tensor(name=INPUT_IMAGE, dtype=np.uint8, shape=(-1, -1, 3), optional=True),
                  Tensor(name=INPUT_BYTES, dtype=bytes, shape=(1,), optional=True)]
        outputs = [Tensor(name="score", dtype=np.float32, shape=(1,)),
                   Tensor(name="normalized_score", dtype=np.float32, shape=(1,)),
                   Tensor(name="is_anomalous", dtype=np.bool_, shape=(1,)),
                   Tensor(name="anomaly_map", dtype=np.float32, shape=(-1, -1))]
        batcher = DynamicBatcher(max_queue_delay_microseconds=int(self.opts.max_queue_delay_us))
        config = ModelConfig(batching=True, max_batch_size=self.max_batch, batcher=batcher) \
            if self.opts.dynamic_batching else ModelConfig(batching=True, max_batch_size=self.max_batch,
                                                           batcher=None)  # type: ignore[arg-type]
        model = DetectorModel(self.det, self.opts.max_pixels)
        triton.bind(model_name=self.name, infer_func=[model] * self.opts.instances, inputs=inputs,
                    outputs=outputs, config=config, strict=False)

    def start(self) -> "StlmServer":
        """Start tritonserver (with the libpython fix), bind the model, wait until it is ready."""
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        python_library_env()
        o = self.opts
        for flag, port in (("--http-port", o.http_port), ("--grpc-port", o.grpc_port), ("--metrics-port", o.metrics_port)):
            check_port_free(o.host, port, flag)
        config = TritonConfig(http_address=o.host, grpc_address=o.host, metrics_address=o.host,
                              http_port=o.http_port, grpc_port=o.grpc_port, metrics_port=o.metrics_port,
                              log_verbose=o.log_verbose, allow_gpu_metrics=False, exit_on_error=True)
        triton = Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS))
        self._triton = triton
        try:
            self._bind(triton)
            triton.run()
            wait_model_ready(self.http_url, self.name, o.ready_timeout_s, alive=triton.is_alive)
        except BaseException:
            self.stop()
            raise
        return self

    def serve_forever(self, poll_s: float = 1.0) -> None:
        """Block until the server dies or the process is interrupted."""
        while self._triton is not None and self._triton.is_alive():
            time.sleep(poll_s)

    def stop(self) -> None:
        if self._triton is not None:
            triton, self._triton = self._triton, None
            triton.stop()

    def __enter__(self) -> "StlmServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
