"""``Detector``: the user-facing runtime (engine directory in, scores and full-size maps out).

``Detector.load`` reads ``stlm.json``, picks the artifact for the requested backend/precision,
verifies its sha256 (an engine edited after export is refused), activates the backend and checks
that the graph it loaded matches the spec. ``predict`` accepts one image, an (N, H, W, 3) batch or
a list of images of different sizes, resizes to ``img_size``, runs the graph in chunks the engine
accepts (padding fixed-batch engines) and maps every result back to its original size.

``backend="auto"`` tries, in order: TensorRT (plan present, tensorrt importable, a GPU the plan was
built for) > ONNX Runtime with CUDA (onnxruntime-gpu that really starts on a GPU) > OpenVINO (IR or
ONNX, CPU) > ONNX Runtime on CPU. Candidates that cannot run here are skipped with a note; the pick
is logged (logger ``stlm_deploy``) and kept in ``selected_by`` / ``selection_notes`` / ``info()``.
Integrity errors (bad checksum, invalid spec, graph/spec mismatch) are never skipped.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from .backends import Backend, backend_class, module_importable
from .errors import BackendUnavailable, DeployError, SpecError
from .preprocess import make_input, prepare_batch, resize_map, split_images
from .spec import EngineSpec, display_path, load_spec, normalize_precision, resolve_engine, verify_artifacts

__all__ = ["Detector", "Prediction"]

log = logging.getLogger("stlm_deploy")

BACKEND_CHOICES = ("auto", "ort", "openvino", "tensorrt")
_CONVENTIONAL_ONNX = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
                      "bf16": "model.bf16.onnx"}
_SUFFIX_BACKEND = {".onnx": "ort", ".xml": "openvino", ".plan": "tensorrt", ".engine": "tensorrt"}


@dataclass
class Prediction:
    """Result for one image; maps are at the ORIGINAL image size.

    ``is_anomalous`` is ``score > thresholds.image`` and ``mask`` is ``anomaly_map > thresholds.pixel``;
    both are None when the engine has no such threshold. ``extra_maps`` holds further per-pixel
    outputs of the graph (e.g. ``tlm_map``), also at the original size.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool | None = None
    mask: np.ndarray | None = None
    extra_maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tlm_map(self) -> np.ndarray | None:
        return self.extra_maps.get("tlm_map")


@dataclass
class _Candidate:
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


def _onnx_shas(spec: EngineSpec) -> list[str]:
    return [a.sha256 for a in spec.artifacts.values() if a.kind == "onnx"]


class _Planner:
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

    def onnx(self, hint: str | None = None) -> str:
        prec = self.precision or "fp32"
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
        saved, self.precision = self.precision, None  # the IR hint is a compile option: read fp32 ONNX
        try:
            return self.onnx()
        finally:
            self.precision = saved

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

    def candidate(self, backend: str, hint: str | None = None, providers: Sequence[str] = ("cpu",)) -> _Candidate:
        art = {"ort": self.onnx, "openvino": self.openvino, "tensorrt": self.tensorrt}[backend](hint)
        entry = self.spec.artifacts.get(art)
        art_prec = entry.precision if entry else None
        opts: dict[str, Any] = {}
        label = backend
        if backend == "ort":
            opts = {"providers": list(providers), "precision": art_prec or self.precision or "fp32"}
            label = "ort[" + ",".join(providers) + "]"
        elif backend == "openvino":
            opts = {"precision": self.precision, "artifact_precision": art_prec}
        elif backend == "tensorrt":
            opts = {"precision": self.precision, "artifact_precision": art_prec,
                    "onnx_sha256s": _onnx_shas(self.spec)}
        return _Candidate(backend, art, self._with_sidecars(art), opts, label)


def _accepted(cls: type, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(options), []
    ok = {k: v for k, v in options.items() if k in params}
    return ok, [k for k in options if k not in params]


class Detector:
    """An activated backend plus the spec that says how to feed it and read it."""

    def __init__(self, spec: EngineSpec, engine_dir: str | os.PathLike, backend: Backend, artifact: str | os.PathLike,
                 *, selected_by: str = "user", selection_notes: Sequence[str] = (),
                 batch_size: int | None = None) -> None:
        self.spec = spec
        self.engine_dir = Path(engine_dir)
        self.backend = backend
        self.artifact = Path(artifact)
        self.selected_by = selected_by
        self.selection_notes = list(selection_notes)
        self.batch_size = int(batch_size) if batch_size else None
        if not backend.is_active:
            backend.activate()
        self._check_graph()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, engine: str | os.PathLike, backend: str = "auto", precision: str | None = None,
             threads: int | None = None, verify: bool = True, *, batch_size: int | None = None,
             **backend_options: Any) -> "Detector":
        """Open an engine directory (or an artifact file inside it) on ``backend``.

        Args:
          engine: ``engines/<name>`` or a file in it (``model.fp16.onnx`` selects that artifact).
          backend: "auto", "ort", "openvino" or "tensorrt".
          precision: "fp32", "fp16", "bf16", "int8" (or f32/f16); None = the backend's default
            (ort: model.onnx, openvino: device default, tensorrt: the plan's).
          threads: CPU threads for ort/openvino (default: all CPUs this process may use).
          verify: check the sha256 of the artifact(s) used against stlm.json.
          batch_size: largest chunk sent to the backend at once (default: what the engine allows).
          backend_options: passed to the backend constructor (e.g. ``providers=["cuda"]`` for ort,
            ``cuda_graph=True`` for tensorrt, ``cache_dir`` for openvino).
        """
        if backend not in BACKEND_CHOICES:
            raise DeployError(f"backend: expected one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
        precision = normalize_precision(precision)
        engine_dir, hint_path = resolve_engine(engine)
        spec = load_spec(engine_dir)
        planner = _Planner(engine_dir, spec, precision)
        hint = cls._hint(engine_dir, spec, hint_path, backend, precision)
        if threads is not None:
            backend_options["threads"] = threads
        if backend == "auto" and "providers" in backend_options:
            raise DeployError("providers: only valid with backend='ort' (auto chooses CUDA or CPU itself)")
        notes: list[str] = []
        if backend != "auto":
            cands = cls._explicit(planner, backend, hint, backend_options)
        else:
            cands = cls._auto(planner, hint, notes)
        last_error: DeployError | None = None
        for cand in cands:
            klass = backend_class(cand.backend)
            options = {**cand.options, **backend_options} if backend != "auto" else \
                {**cand.options, **_accepted(klass, backend_options)[0]}
            if backend != "auto":
                if "threads" in options and "threads" not in inspect.signature(klass.__init__).parameters:
                    options.pop("threads")  # generic CPU option; meaningless for GPU backends
                _, unknown = _accepted(klass, options)
                if unknown:
                    raise DeployError(f"{cand.backend} backend: unknown option(s) {', '.join(sorted(unknown))}")
            if verify:
                verify_artifacts(engine_dir, spec, cand.verify)
            runner = klass(engine_dir / cand.artifact, **options)
            try:
                runner.activate()
            except BackendUnavailable as e:
                if backend != "auto":
                    raise
                notes.append(f"{cand.label}: {e}")
                last_error = e
                continue
            try:
                det = cls(spec, engine_dir, runner, engine_dir / cand.artifact,
                          selected_by=backend if backend != "auto" else "auto", selection_notes=notes,
                          batch_size=batch_size)
            except BaseException:
                runner.deactivate()  # e.g. the graph does not match stlm.json: free the session
                raise
            if backend == "auto":
                log.info("stlm_deploy: auto backend picked %s (%s, precision %s, %s)%s", runner.name, cand.artifact,
                         runner.precision, ", ".join(runner.providers_used),
                         ("; skipped: " + " | ".join(notes)) if notes else "")
            return det
        if len(cands) == 1 and last_error is not None:
            raise last_error
        detail = " | ".join(notes) if notes else (str(last_error) if last_error else "no candidates")
        raise DeployError(f"{display_path(engine_dir)}: no backend can run this engine here ({detail})")

    @staticmethod
    def _hint(engine_dir: Path, spec: EngineSpec, hint_path: Path | None, backend: str,
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

    @staticmethod
    def _explicit(planner: _Planner, backend: str, hint: str | None, options: dict[str, Any]) -> list[_Candidate]:
        providers = options.pop("providers", ("cpu",))
        if backend == "ort":
            return [planner.candidate("ort", hint, providers)]
        return [planner.candidate(backend, hint)]

    @staticmethod
    def _auto(planner: _Planner, hint: str | None, notes: list[str]) -> list[_Candidate]:
        hint_backend = _SUFFIX_BACKEND[PurePosixPath(hint).suffix] if hint else None
        if hint_backend in ("tensorrt", "openvino"):  # the file names its backend: let it say why it can't run
            return [planner.candidate(hint_backend, hint)]
        cands: list[_Candidate] = []

        def add(backend: str, why_not: str | None, **kw: Any) -> None:
            if hint_backend and hint_backend != backend:
                return
            if why_not:
                notes.append(f"{kw.get('label', backend)}: {why_not}")
                return
            try:
                cands.append(planner.candidate(backend, hint, **{k: v for k, v in kw.items() if k != "label"}))
            except BackendUnavailable as e:
                notes.append(f"{kw.get('label', backend)}: {e}")

        add("tensorrt", None if module_importable("tensorrt") else "tensorrt not installed")
        ort_ok = module_importable("onnxruntime")
        cuda_ok = False
        if ort_ok:
            from .backends.ort import ort_available_providers

            cuda_ok = "CUDAExecutionProvider" in ort_available_providers()
        add("ort", None if cuda_ok else ("onnxruntime has no CUDAExecutionProvider" if ort_ok else
                                         "onnxruntime not installed"), providers=("cuda",), label="ort[cuda]")
        add("openvino", None if module_importable("openvino") else "openvino not installed")
        add("ort", None if ort_ok else "onnxruntime not installed", providers=("cpu",), label="ort[cpu]")
        if not cands:
            raise DeployError(f"{planner.where}: no backend can run this engine here ({' | '.join(notes)}); "
                              "install one: pip install 'stlm-deploy[cpu]' (onnxruntime) or '[openvino]'")
        return cands

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

    def _chunk(self, n: int) -> int:
        if self.fixed_batch:
            return self.fixed_batch
        limits = [x for x in (self.backend.max_batch, self.batch_size) if x]
        return max(1, min(limits + [n]))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        fixed = self.fixed_batch
        if fixed and n < fixed:  # fixed-batch graph: pad with black images, drop their results
            batch = np.concatenate([batch, np.zeros((fixed - n,) + batch.shape[1:], batch.dtype)])
        x = make_input(batch, self.spec)
        if x.dtype != self.backend.input_dtype and not self.spec.input.fused_preprocessing:
            x = x.astype(self.backend.input_dtype)
        outs = self.backend.infer({self.backend.input_name: x})
        return {k: np.asarray(v)[:n] for k, v in outs.items()}

    def _postprocess(self, outs: dict[str, np.ndarray], sizes: list[tuple[int, int]]) -> list[Prediction]:
        amap = np.asarray(outs["anomaly_map"], dtype=np.float32)
        scores = np.asarray(outs["score"], dtype=np.float32).reshape(-1)
        s = self.spec.img_size
        extra_names = [k for k, v in outs.items() if k not in ("anomaly_map", "score")
                       and np.ndim(v) == 3 and np.shape(v)[1:] == (s, s)]
        t_img, t_pix = self.spec.thresholds.image, self.spec.thresholds.pixel
        preds = []
        for j, size in enumerate(sizes):
            m = resize_map(amap[j], size)
            score = float(scores[j])
            preds.append(Prediction(
                score=score, anomaly_map=m,
                is_anomalous=None if t_img is None else bool(score > t_img),
                mask=None if t_pix is None else m > t_pix,
                extra_maps={k: resize_map(np.asarray(outs[k][j], np.float32), size) for k in extra_names}))
        return preds

    def predict(self, images: np.ndarray | Sequence[np.ndarray], bgr: bool = False) -> Prediction | list[Prediction]:
        """Score one RGB uint8 image (H, W, 3) -> Prediction, or a batch/list -> list[Prediction].

        ``bgr=True`` for OpenCV frames. Thread-safe: may be called from several threads at once.
        """
        imgs, single = split_images(images)
        if not imgs:
            return []
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
        return {"engine": str(self.engine_dir), "name": self.spec.name, "model_family": self.spec.model_family,
                "img_size": self.spec.img_size, "backend": b.name, "precision": b.precision,
                "providers": list(b.providers_used), "device": b.device, "artifact": str(self.artifact),
                "selected_by": self.selected_by, "selection_notes": list(self.selection_notes),
                "thresholds": self.spec.thresholds.to_dict(), "backend_info": b.info()}

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Detector {self.spec.name!r} backend={self.backend.name} precision={self.backend.precision} "
                f"artifact={display_path(self.artifact)}>")
