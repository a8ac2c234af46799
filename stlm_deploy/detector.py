"""``Detector``: the user-facing runtime (engine directory in, scores and full-size maps out).

``Detector.load`` reads ``stlm.json``, picks the artifact for the requested backend/precision,
verifies its sha256 (an engine edited after export is refused), activates the backend and checks
that the graph it loaded matches the spec. ``predict`` accepts one image, an (N, H, W, 3) batch or
a list of images of different sizes, resizes to ``img_size``, runs the graph in chunks (a fixed-batch
engine's batch, padded; otherwise ``batch_size``, default :data:`DEFAULT_CHUNK`, never one giant batch)
and maps every result back to its original size. A tiled engine (stlm.json ``preprocessing.work_size``)
resizes each image to its work shape instead, runs its overlapping tiles ``chunk_size`` at a time, blends
the tile maps and scores the stitched map (:mod:`stlm_deploy.tiling`). Outputs holding NaN or +-Infinity (an fp16 overflow,
a broken plan) raise :class:`~stlm_deploy.errors.NonFiniteOutput`: a NaN score would otherwise compare
False with the threshold and read as "normal".

``backend="auto"`` tries, in order: TensorRT (plan present, tensorrt importable, a GPU the plan was
built for) > ONNX Runtime with CUDA (onnxruntime-gpu that really starts on a GPU) > OpenVINO (IR or
ONNX, CPU) > ONNX Runtime on CPU, with the fastest gated CPU variant ``stlm-bench`` timed on this
machine (``timings.json``) tried before the CPU ones. Candidates that cannot run here are skipped with a note; the pick
is logged (logger ``stlm_deploy``) and kept in ``selected_by`` / ``selection_notes`` / ``info()``; the
planner that makes these choices is :mod:`stlm_deploy.selection`.
Integrity errors (bad checksum, invalid spec, graph/spec mismatch) are never skipped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import Backend
from .errors import DeployError, NonFiniteOutput, SpecError
from .images import DEFAULT_MAX_PIXELS
from .decision import decide
from .preprocess import make_input, prepare_batch, resize_map, split_images, to_rgb, work_image
from .selection import BACKEND_CHOICES, open_backend
from .spec import EngineSpec, display_path, load_spec, normalize_precision, resolve_engine
from .tiling import run_tiled

__all__ = ["Detector", "Prediction", "DEFAULT_CHUNK"]

log = logging.getLogger("stlm_deploy")

#: Images per backend call on a dynamic-batch engine unless ``batch_size`` says otherwise: bounded memory
#: (input, outputs and full-size maps of one chunk) however long the list given to ``predict``.
DEFAULT_CHUNK = 8


@dataclass
class Prediction:
    """Result for one image; maps are at the ORIGINAL image size.

    ``is_anomalous`` is ``score > thresholds.image`` and ``mask`` is ``anomaly_map > thresholds.pixel``;
    both are None when the engine has no such threshold. ``extra_maps`` holds further per-pixel
    outputs of the graph (e.g. ``tlm_map``), also at the original size. ``normalized_score`` is the
    score mapped to [0, 1] with the threshold at 0.5 (:mod:`stlm_deploy.decision`); the raw
    ``score`` is kept.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool | None = None
    mask: np.ndarray | None = None
    extra_maps: dict[str, np.ndarray] = field(default_factory=dict)
    #: what ran: the backend ("openvino", "ort", "tensorrt") and the precision it really used
    backend: str = ""
    precision: str | None = None
    normalized_score: float | None = None
    #: tiles the image was cut into (tiled engines; 1 otherwise)
    n_tiles: int = 1

    @property
    def tlm_map(self) -> np.ndarray | None:
        return self.extra_maps.get("tlm_map")


class Detector:
    """An activated backend plus the spec that says how to feed it and read it."""

    def __init__(self, spec: EngineSpec, engine_dir: str | os.PathLike, backend: Backend, artifact: str | os.PathLike,
                 *, selected_by: str = "user", selection_notes: Sequence[str] = (),
                 batch_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        self.engine_dir = Path(engine_dir)
        self.backend = backend
        self.artifact = Path(artifact)
        self.selected_by = selected_by
        self.selection_notes = list(selection_notes)
        #: how images are cut into tiles (None: untiled, each image resized to img_size)
        self.tiling = spec.tiling
        if batch_size is not None and int(batch_size) < 0:
            raise DeployError(f"batch_size: expected a positive integer (or None/0 for the default), got "
                              f"{batch_size!r}")
        self.batch_size = int(batch_size) if batch_size else None
        if max_pixels is not None and int(max_pixels) < 0:
            raise DeployError(f"max_pixels: expected a pixel count (or None/0 for no cap), got {max_pixels!r}")
        #: pixel cap for images this detector reads from files/bytes (score_files, stlm-infer); 0/None = none
        self.max_pixels = int(max_pixels) if max_pixels else None
        if not backend.is_active:
            backend.activate()
        self._check_graph()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, engine: str | os.PathLike, backend: str = "auto", precision: str | None = None,
             threads: int | None = None, verify: bool = True, *, batch_size: int | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, **backend_options: Any) -> "Detector":
        """Open an engine directory (or an artifact file inside it) on ``backend``.

        Args:
          engine: ``engines/<name>`` or a file in it (``model.fp16.onnx`` selects that artifact).
          backend: "auto", "ort", "openvino" or "tensorrt". "auto" runs, on CPU, the fastest gated variant
            ``stlm-bench`` recorded for this machine in ``timings.json`` when no precision is requested
            (:mod:`stlm_deploy.timings`), else the static order of :mod:`stlm_deploy.selection`.
          precision: "fp32", "fp16", "bf16", "int8" (or f32/f16); None = the engine's default, the same
            rule as the C++ runtime (ort: model.onnx, openvino: the IR's recorded inference_precision,
            else fp32; tensorrt: the plan's; see :func:`stlm_deploy.selection.default_precision`).
          threads: CPU threads for ort/openvino (default: all CPUs this process may use).
          verify: check the sha256 of the artifact(s) used against stlm.json.
          batch_size: images per backend call on a dynamic-batch engine (default DEFAULT_CHUNK = 8,
            capped by the backend's limit); a fixed-batch engine always runs its exported batch.
          max_pixels: images larger than this (width x height, read from the file header) are refused
            before decoding when this detector reads files or bytes (``score_files``, stlm-infer);
            default 64 megapixels, None/0 = no cap. Arrays given to ``predict`` are already decoded.
          backend_options: passed to the backend constructor (e.g. ``providers=["cuda"]`` for ort,
            ``cuda_graph=True`` for tensorrt, ``cache_dir`` for openvino).
        """
        if backend not in BACKEND_CHOICES:
            raise DeployError(f"backend: expected one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
        precision = normalize_precision(precision)
        engine_dir, hint_path = resolve_engine(engine)
        spec = load_spec(engine_dir)
        runner, cand, notes = open_backend(engine_dir, spec, backend, precision, hint_path, threads, verify,
                                           backend_options)
        try:
            det = cls(spec, engine_dir, runner, engine_dir / cand.artifact,
                      selected_by=backend if backend != "auto" else "auto", selection_notes=notes,
                      batch_size=batch_size, max_pixels=max_pixels)
        except BaseException:
            runner.deactivate()  # e.g. the graph does not match stlm.json: free the session
            raise
        if backend == "auto":
            log.info("stlm_deploy: auto backend picked %s (%s, precision %s, %s)%s", runner.name, cand.artifact,
                     runner.precision, ", ".join(runner.providers_used),
                     ("; notes: " + " | ".join(notes)) if notes else "")
        return det

    def _check_graph(self) -> None:
        """The loaded graph must be the one stlm.json describes (names, batch, outputs)."""
        b, spec, where = self.backend, self.spec, display_path(self.artifact)
        if b.input_name != spec.input.name:
            raise SpecError(f"{where}: graph input is {b.input_name!r} but stlm.json field 'input.name' says "
                            f"{spec.input.name!r}")
        missing = [n for n in ("anomaly_map", "score") if n not in b.output_names]
        if missing:
            raise SpecError(f"{where}: graph outputs {b.output_names} lack {missing} required by stlm.json")
        if spec.input.fused_preprocessing and b.input_dtype != np.uint8:
            raise SpecError(f"{where}: graph input is {b.input_dtype} but stlm.json says fused uint8 input")
        if b.input_shape and len(b.input_shape) != len(spec.input.shape):
            raise SpecError(f"{where}: graph input rank {len(b.input_shape)} differs from stlm.json "
                            f"field 'input.shape' {spec.input.shape}")

    # ------------------------------------------------------------------ inference
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def fixed_batch(self) -> int | None:
        return self.backend.fixed_batch or self.spec.fixed_batch

    @property
    def chunk_size(self) -> int:
        """Images per backend call: the fixed batch, else ``batch_size`` (default 8) within the backend's limit."""
        if self.fixed_batch:
            return self.fixed_batch
        limits = [x for x in (self.backend.max_batch, self.batch_size or DEFAULT_CHUNK) if x]
        return max(1, min(limits))

    def _chunk(self, n: int) -> int:
        return self.chunk_size if self.fixed_batch else max(1, min(self.chunk_size, n))

    def _check_finite(self, outs: dict[str, np.ndarray], n: int) -> None:
        """Refuse NaN/Inf in any output of the first ``n`` images (the padding of a fixed batch excluded)."""
        for name, value in outs.items():
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():
                continue
            bad = ~np.isfinite(arr.reshape(arr.shape[0], -1) if arr.ndim else arr.reshape(1, 1))
            images = [i for i in range(min(n, bad.shape[0])) if bad[i].any()]
            kinds = "NaN" if np.isnan(arr).any() else "Infinity"
            if np.isnan(arr).any() and np.isinf(arr).any():
                kinds = "NaN and Infinity"
            b = self.backend
            raise NonFiniteOutput(
                f"{display_path(self.artifact)}: engine '{self.spec.name}' on backend {b.name} (precision "
                f"{b.precision or 'default'}) returned {kinds} in output '{name}' for image(s) "
                f"{images[:8]} of a batch of {n}; the result is refused (an fp16/bf16 overflow? try "
                "precision fp32)")

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        fixed = self.fixed_batch
        if fixed and n < fixed:  # fixed-batch graph: pad with black images, drop their results
            batch = np.concatenate([batch, np.zeros((fixed - n,) + batch.shape[1:], batch.dtype)])
        x = make_input(batch, self.spec)
        if x.dtype != self.backend.input_dtype and not self.spec.input.fused_preprocessing:
            x = x.astype(self.backend.input_dtype)
        outs = self.backend.infer({self.backend.input_name: x})
        outs = {k: np.asarray(v)[:n] for k, v in outs.items()}
        self._check_finite(outs, n)
        return outs

    def _prediction(self, score: float, small_map: np.ndarray, extras: dict[str, np.ndarray],
                    size: tuple[int, int], n_tiles: int = 1) -> Prediction:
        """One result from the graph-side map (img_size, or a tiled engine's stitched work map) and its score."""
        m = resize_map(small_map, size)
        return Prediction(
            score=score, anomaly_map=m, **decide(score, m, self.spec.thresholds)._asdict(),
            extra_maps={k: resize_map(np.asarray(v, np.float32), size) for k, v in extras.items()},
            backend=self.backend.name, precision=self.backend.precision, n_tiles=n_tiles)

    def _postprocess(self, outs: dict[str, np.ndarray], sizes: list[tuple[int, int]]) -> list[Prediction]:
        amap = np.asarray(outs["anomaly_map"], dtype=np.float32)
        scores = np.asarray(outs["score"], dtype=np.float32).reshape(-1)
        s = self.spec.img_size
        extra_names = [k for k, v in outs.items() if k not in ("anomaly_map", "score")
                       and np.ndim(v) == 3 and np.shape(v)[1:] == (s, s)]
        return [self._prediction(float(scores[j]), amap[j], {k: outs[k][j] for k in extra_names}, size)
                for j, size in enumerate(sizes)]

    def _predict_tiled(self, image: np.ndarray, bgr: bool) -> Prediction:
        """One image of a tiled engine: work image, tiles in chunks, blended maps, score on the stitched map."""
        tiling = self.tiling
        assert tiling is not None
        rgb = to_rgb(np.ascontiguousarray(image), bgr)
        work = work_image(rgb, tiling, self.spec.preprocessing.resize)
        res = run_tiled(work, tiling, self._run, self.chunk_size, self.spec.top_k)
        extras = {k: v for k, v in res.maps.items() if k != "anomaly_map"}
        return self._prediction(float(res.score), res.maps["anomaly_map"], extras, rgb.shape[:2], res.n_tiles)

    def predict(self, images: np.ndarray | Sequence[np.ndarray], bgr: bool = False) -> Prediction | list[Prediction]:
        """Score one RGB uint8 image (H, W, 3) -> Prediction, or a batch/list -> list[Prediction].

        ``bgr=True`` for OpenCV frames. Thread-safe: may be called from several threads at once;
        ``close()`` waits for those calls. A Detector created before ``fork`` refuses to run in the child.
        """
        if not self.backend.is_active:
            raise DeployError(f"Detector for {display_path(self.engine_dir)}: closed; load it again")
        with self.backend.in_flight():
            return self._predict(images, bgr)

    def _predict(self, images: np.ndarray | Sequence[np.ndarray], bgr: bool) -> Prediction | list[Prediction]:
        imgs, single = split_images(images)
        if not imgs:
            return []
        if self.tiling is not None:  # image by image; each image's tiles run chunk_size at a time
            tiled = [self._predict_tiled(im, bgr) for im in imgs]
            return tiled[0] if single else tiled
        preds: list[Prediction] = []
        step = self._chunk(len(imgs))
        for i in range(0, len(imgs), step):
            batch, sizes = prepare_batch(imgs[i:i + step], self.spec.img_size, bgr=bgr,
                                         policy=self.spec.preprocessing.resize)
            preds.extend(self._postprocess(self._run(batch), sizes))
        return preds[0] if single else preds

    __call__ = predict

    # ------------------------------------------------------------------ reporting / lifecycle
    def info(self) -> dict[str, Any]:
        """What is running: backend, precision actually used, providers/devices, artifact, why chosen."""
        b = self.backend
        tiling = self.tiling
        return {"engine": str(self.engine_dir), "name": self.spec.name, "model_family": self.spec.model_family,
                "img_size": self.spec.img_size, "tiling": None if tiling is None else tiling.to_preprocessing(), "backend": b.name, "precision": b.precision,
                "providers": list(b.providers_used), "device": b.device, "artifact": str(self.artifact),
                "selected_by": self.selected_by, "selection_notes": list(self.selection_notes),
                "chunk_size": self.chunk_size, "max_pixels": self.max_pixels,
                "thresholds": self.spec.thresholds.to_dict(), "backend_info": b.info()}

    def close(self) -> None:
        """Free the backend once the predictions in flight (other threads) have returned."""
        self.backend.deactivate()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Detector {self.spec.name!r} backend={self.backend.name} precision={self.backend.precision} "
                f"artifact={display_path(self.artifact)}>")
