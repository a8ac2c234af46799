"""Score images through a running ``stlm-serve`` (or any Triton serving the stlm contract) with tritonclient.

    from stlm_deploy.client import RemoteDetector
    with RemoteDetector("http://127.0.0.1:8000") as det:        # or "grpc://127.0.0.1:8001"
        pred = det.predict(rgb)                                  # Prediction, as Detector.predict
        preds = det.predict_bytes([png_bytes, jpeg_bytes])       # encoded files, decoded by the server

``RemoteDetector`` has the parts of :class:`~stlm_deploy.detector.Detector` that
:func:`stlm_deploy.batch.score_files` uses (``predict``, ``spec.thresholds``, ``max_pixels``, ``info``),
so ``stlm-infer --url`` writes exactly what local inference writes. Each image is one request (Triton's
dynamic batcher forms the batches on the server); images of one ``predict`` call are sent concurrently
with tritonclient's async API. The model is the only one on the server unless ``model`` names it.

Models of a repository written by ``stlm-export --target triton`` serve the raw graph (``image`` UINT8
``[S, S, 3]`` per item -> ``anomaly_map`` ``[S, S]``, ``score``): the client then does the documented
client step itself (``raw`` mode, detected from the model config): resize to ``S`` with
:func:`~stlm_deploy.preprocess.prepare_batch` (the engine's resize policy), resize the map back with
:func:`~stlm_deploy.preprocess.resize_map` and decide with the thresholds and score range the config
carries as ``stlm.*`` parameters, exactly as :class:`~stlm_deploy.detector.Detector` does locally. A tiled
engine's model (``stlm.preprocessing.work_size``) is fed the image's tiles and the client blends and scores
them as the Detector does (:func:`stlm_deploy.tiling.run_tiled`); a model whose ``stlm.format_version`` is
newer than this client knows is refused (one line), never run untiled.

tritonclient clients are not thread-safe: use one RemoteDetector per thread. Server-side errors come
back as one-line :class:`~stlm_deploy.errors.DeployError` messages (the Python traceback Triton relays
for errors raised inside the model is reduced to its last ``...Error: message`` line).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np

from ..detector import DEFAULT_CHUNK, Prediction
from ..errors import DeployError
from ..images import DEFAULT_MAX_PIXELS
from ..decision import decide
from ..preprocess import DEFAULT_RESIZE, prepare_batch, resize_map, split_images, to_rgb, work_image
from .server import INPUT_BYTES, INPUT_IMAGE
from ..spec import FORMAT_VERSION, Thresholds
from ..tiling import Tiling, run_tiled

__all__ = ["RemoteDetector", "parse_url", "server_error"]

_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[^:]*: (.+)$")


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``http://h:p`` / ``grpc://h:p`` / ``h:p`` (+ ``protocol``) -> (protocol, "h:p")."""
    parsed = urlparse(url if "://" in url else f"{protocol or 'http'}://{url}")
    proto = parsed.scheme.lower()
    if proto not in ("http", "grpc") or not parsed.hostname or parsed.port is None:
        raise DeployError(f"--url: expected http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    if protocol is not None and protocol != proto:
        raise DeployError(f"--url {url!r} says {proto} but protocol {protocol!r} was asked for")
    return proto, f"{parsed.hostname}:{parsed.port}"


def server_error(e: BaseException) -> str:
    """One line from a tritonclient exception (its message may carry a whole server-side traceback)."""
    text = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    text = str(text or e or type(e).__name__)
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _ERROR_LINE.match(ln)
        if m:
            return m.group(2)
    return lines[0] if lines else type(e).__name__


def _tiling_from(params: dict[str, str], img_size: int, where: str) -> Tiling | None:
    """The tiling of a repository model config (None: untiled); a newer format or bad values: one line."""
    try:
        version = int(params.get("stlm.format_version", "1"))
    except ValueError:
        raise DeployError(f"{where}: parameter 'stlm.format_version' must be an integer, got "
                          f"{params['stlm.format_version']!r}") from None
    if version > FORMAT_VERSION:
        raise DeployError(f"{where}: parameter 'stlm.format_version' is {version}, newer than this client supports "
                          f"({FORMAT_VERSION}): upgrade stlm-deploy")
    work = params.get("stlm.preprocessing.work_size")
    if work is None:
        return None
    try:
        return Tiling(img_size, int(work), float(params.get("stlm.preprocessing.tile_overlap", "nan")),
                      params.get("stlm.preprocessing.tile_blend", ""))
    except ValueError as e:
        raise DeployError(f"{where}: parameters 'stlm.preprocessing.*': {e}") from None


@dataclass
class _RemoteSpec:
    """The part of EngineSpec that result writers read (name + thresholds)."""

    name: str
    thresholds: Thresholds = field(default_factory=Thresholds)


class RemoteDetector:
    """A Detector-like front to a Triton model that follows the stlm serving contract."""

    def __init__(self, url: str, model: str | None = None, *, protocol: str | None = None,
                 thresholds: Thresholds | None = None, timeout_s: float = 60.0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, tiling: Tiling | None = None) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        self.url = f"{self.protocol}://{self.address}"
        self.timeout_s = float(timeout_s)
        self.max_pixels = max_pixels
        if self.protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(self.address, connection_timeout=self.timeout_s,
                                                    network_timeout=self.timeout_s, concurrency=8)
        else:
            import tritonclient.grpc as tc  # type: ignore[no-redef]

            self._client = tc.InferenceServerClient(self.address)
        self._tc = tc
        try:
            self.model = model or self._only_model()
            if not self._client.is_model_ready(self.model):
                raise DeployError(f"{self.url}: model '{self.model}' is not ready")
            config = self._config()
        except DeployError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - connection refused, unknown model: one line
            self.close()
            raise DeployError(f"{self.url}: {server_error(e)}") from None
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        dims = next((list(map(int, i.get("dims", []))) for i in config.get("input", []) if i.get("name") == INPUT_IMAGE),
                    [])
        #: raw mode: a repository model of ``stlm-export --target triton`` (fixed [S, S, 3] input)
        self.raw = len(dims) == 3 and dims[-1] == 3 and min(dims) > 0
        self.img_size = int(params.get("stlm.img_size", dims[0] if self.raw else 0) or 0)
        self.resize = params.get("stlm.resize", DEFAULT_RESIZE)
        self.top_k = int(params.get("stlm.top_k", "100") or 100)
        if self.raw and params.get("stlm.input.fused_preprocessing", "true") != "true":
            self.close()
            raise DeployError(f"{self.url} model '{self.model}': unfused engines (float NCHW input) are not supported "
                              "by the client step; export with fused preprocessing (the default)")
        try:  #: raw models of tiled engines: the client step cuts the tiles (stlm-serve models tile on the server)
            found = _tiling_from(params, self.img_size, f"{self.url} model '{self.model}'") if self.raw else None
            self.tiling = tiling if tiling is not None and self.raw else found
        except DeployError:
            self.close()
            raise
        self.spec = _RemoteSpec(self.model, thresholds or Thresholds.from_parameters(params) or Thresholds())
        self.engine_dir = self.url

    def _config(self) -> dict[str, Any]:
        if self.protocol == "http":
            return dict(self._client.get_model_config(self.model))
        return dict(self._client.get_model_config(self.model, as_json=True).get("config", {}))

    def _only_model(self) -> str:
        try:
            index = self._client.get_model_repository_index()
        except Exception as e:  # noqa: BLE001 - stlm-serve keeps the repository API behind a token
            raise DeployError(f"{self.url}: cannot list the served models ({server_error(e)}); name the model "
                              "(model=... / --model NAME, the name stlm-serve printed)") from None
        if self.protocol == "grpc":
            names = [m.name for m in index.models]
        else:
            names = [m["name"] for m in index]
        if len(names) != 1:
            raise DeployError(f"{self.url}: serves {len(names)} models ({', '.join(names) or 'none'}): name one "
                              "with model=... / --model")
        return names[0]

    # ------------------------------------------------------------------ requests
    def _outputs(self, with_map: bool) -> list[Any]:
        names = ["score", "normalized_score", "is_anomalous"] + (["anomaly_map"] if with_map else [])
        return [self._tc.InferRequestedOutput(n) for n in names]

    def _input(self, name: str, array: np.ndarray, dtype: str) -> Any:
        inp = self._tc.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        return inp

    def _send(self, inputs: list[list[Any]], with_map: bool) -> list[Any]:
        """Send one request per input list concurrently; return the results in order."""
        outputs = self._outputs(with_map)
        try:
            if self.protocol == "http":
                pending = [self._client.async_infer(self.model, inp, outputs=outputs) for inp in inputs]
                return [p.get_result() for p in pending]
            return [self._client.infer(self.model, inp, outputs=outputs, client_timeout=self.timeout_s)
                    for inp in inputs]
        except Exception as e:  # noqa: BLE001 - InferenceServerException and transport errors
            raise DeployError(f"{self.url} model '{self.model}': {server_error(e)}") from None

    def _predictions(self, results: list[Any], with_map: bool) -> list[Prediction]:
        preds = []
        for res in results:
            scores = res.as_numpy("score").reshape(-1)
            norm = res.as_numpy("normalized_score").reshape(-1)
            flags = res.as_numpy("is_anomalous").reshape(-1)
            maps = res.as_numpy("anomaly_map") if with_map else None
            t = self.spec.thresholds
            for j, s in enumerate(scores):
                m = maps[j].astype(np.float32) if maps is not None else None
                d = decide(float(s), m, t)
                n = float(norm[j])  # the server decided (NaN: it has no image threshold)
                preds.append(Prediction(
                    score=float(s), anomaly_map=m if m is not None else np.zeros((0, 0), np.float32),
                    is_anomalous=bool(flags[j]) if np.isfinite(n) else None, mask=d.mask,
                    normalized_score=n if np.isfinite(n) else d.normalized_score, backend="triton"))
        return preds

    def _run_raw(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The raw graph on a uint8 (n, S, S, 3) batch: one request per item, sent concurrently."""
        outputs = [self._tc.InferRequestedOutput(n) for n in ("anomaly_map", "score")]
        inputs = [[self._input(INPUT_IMAGE, batch[i:i + 1], "UINT8")] for i in range(len(batch))]
        try:
            if self.protocol == "http":
                pending = [self._client.async_infer(self.model, inp, outputs=outputs) for inp in inputs]
                results = [p.get_result() for p in pending]
            else:
                results = [self._client.infer(self.model, inp, outputs=outputs, client_timeout=self.timeout_s)
                           for inp in inputs]
        except Exception as e:  # noqa: BLE001 - InferenceServerException and transport errors
            raise DeployError(f"{self.url} model '{self.model}': {server_error(e)}") from None
        s = self.img_size
        out = {"anomaly_map": np.stack([np.asarray(r.as_numpy("anomaly_map"), np.float32).reshape(s, s)
                                        for r in results]),
               "score": np.asarray([np.asarray(r.as_numpy("score"), np.float32).reshape(-1)[0] for r in results])}
        if not (np.isfinite(out["score"]).all() and np.isfinite(out["anomaly_map"]).all()):
            raise DeployError(f"{self.url} model '{self.model}': non-finite output; the result is refused")
        return out

    def _raw_prediction(self, score: float, small_map: np.ndarray, size: tuple[int, int], n_tiles: int) -> Prediction:
        m = resize_map(small_map, size)
        return Prediction(score=score, anomaly_map=m, **decide(score, m, self.spec.thresholds)._asdict(),
                          backend="triton", n_tiles=n_tiles)

    def _predict_raw(self, imgs: list[np.ndarray], bgr: bool) -> list[Prediction]:
        """The client step for raw repository models: resize (or tile), run, resize back, decide."""
        if self.tiling is not None:
            preds = []
            for im in imgs:
                rgb = to_rgb(np.ascontiguousarray(im), bgr)
                res = run_tiled(work_image(rgb, self.tiling, self.resize), self.tiling, self._run_raw, DEFAULT_CHUNK,
                                self.top_k)
                preds.append(self._raw_prediction(float(res.score), res.maps["anomaly_map"], rgb.shape[:2],
                                                  res.n_tiles))
            return preds
        batch, sizes = prepare_batch(imgs, self.img_size, bgr=bgr, policy=self.resize)
        outs = self._run_raw(batch)
        return [self._raw_prediction(float(outs["score"][i]), outs["anomaly_map"][i], size, 1)
                for i, size in enumerate(sizes)]

    def predict(self, images: np.ndarray | Sequence[np.ndarray], bgr: bool = False,
                anomaly_map: bool = True) -> Prediction | list[Prediction]:
        """Score RGB uint8 images on the server (one request each); ``anomaly_map=False`` skips the maps."""
        imgs, single = split_images(images)
        if self.raw:
            preds = self._predict_raw(imgs, bgr) if imgs else []
            return preds[0] if single else preds
        if bgr:
            imgs = [np.ascontiguousarray(im[..., ::-1]) for im in imgs]
        inputs = [[self._input(INPUT_IMAGE, np.ascontiguousarray(im)[None], "UINT8")] for im in imgs]
        preds = self._predictions(self._send(inputs, anomaly_map), anomaly_map) if inputs else []
        return preds[0] if single else preds

    def predict_bytes(self, blobs: Sequence[bytes], anomaly_map: bool = True) -> list[Prediction]:
        """Score encoded PNG/JPEG files; the server decodes them (one request each; raw mode: decoded here)."""
        if self.raw:
            from ..images import decode_image_rgb

            return self._predict_raw([decode_image_rgb(b, f"image {i}", self.max_pixels) for i, b in enumerate(blobs)],
                                     False)
        inputs = [[self._input(INPUT_BYTES, np.array([[bytes(b)]], dtype=object), "BYTES")] for b in blobs]
        return self._predictions(self._send(inputs, anomaly_map), anomaly_map) if inputs else []

    __call__ = predict

    # ------------------------------------------------------------------ reporting / lifecycle
    def statistics(self) -> dict[str, Any]:
        """Triton's inference statistics of the model (batch_stats shows the batches dynamic batching formed)."""
        if self.protocol == "http":
            return self._client.get_inference_statistics(self.model)
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(self._client.get_inference_statistics(self.model), preserving_proto_field_name=True)

    def info(self) -> dict[str, Any]:
        return {"backend": "triton", "url": self.url, "protocol": self.protocol, "model": self.model, "raw": self.raw,
                "tiling": None if self.tiling is None else self.tiling.to_preprocessing(),
                "precision": None, "device": "server", "selected_by": "url",
                "thresholds": self.spec.thresholds.to_dict()}

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            self._client = None
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def __enter__(self) -> "RemoteDetector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
