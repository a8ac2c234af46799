"""``stlm.json``: the single source of truth for an engine directory (read by the runtime, written by export).

An engine directory ``engines/<name>/`` holds ``stlm.json`` plus the artifacts it lists (ONNX, OpenVINO
IR, TensorRT plan, JSON sidecars), each with its sha256. This module parses and validates that file
into an :class:`EngineSpec`, writes it atomically, resolves ``--engine`` arguments (the directory or
any file inside it) and verifies artifact checksums. Validation errors are one-line
:class:`SpecError` messages naming the file, the field and what was expected. Keys this version does
not know are kept (``extra``) and written back unchanged, so older runtimes can round-trip newer
files of the same ``format_version``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from .errors import DeployError, SpecError
from .files import atomic_write_json, sha256_file
from .preprocess import DEFAULT_RESIZE, RESIZE_POLICIES
from .tiling import Tiling, check_tiling

__all__ = [
    "FORMAT", "FORMAT_VERSION", "UNTILED_VERSION", "TILED_VERSION", "TILING_KEYS", "SPEC_FILENAME", "DEFAULT_MEAN",
    "DEFAULT_STD", "ARTIFACT_KINDS",
    "PRECISIONS", "IMG_SIZE_MULTIPLE", "TensorSpec", "InputSpec", "Preprocessing", "Thresholds",
    "Source", "Artifact", "VariantGate", "VARIANT_BACKENDS", "EngineSpec", "load_spec", "write_spec", "verify_artifacts",
    "resolve_engine", "artifact_entry", "display_path", "normalize_precision", "is_img_size",
]

FORMAT = "stlm-engine"
FORMAT_VERSION = 2  # newest stlm.json version this runtime understands
#: the version untiled engines are written with (what runtimes before tiling read); tiled engines need TILED_VERSION
UNTILED_VERSION = 1
TILED_VERSION = 2
#: preprocessing keys of a tiled engine (docs/engine_format.md, "Tiling"; stlm_deploy/tiling.py)
TILING_KEYS = ("work_size", "tile_overlap", "tile_blend")
SPEC_FILENAME = "stlm.json"
DEFAULT_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean on RGB 0..255 (SAM/TinyViT preprocessing)
DEFAULT_STD = (58.395, 57.12, 57.375)
ARTIFACT_KINDS = ("onnx", "openvino", "tensorrt", "json")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
IMG_SIZE_MULTIPLE = 64  # TinyViT patch 16 x the 4x stride of the last stage
LAYOUTS = ("NHWC", "NCHW")
INPUT_DTYPES = ("uint8", "float32", "float16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PARAM = "stlm.thresholds."  # prefix of the threshold parameters of a Triton model config

_PRECISION_ALIASES = {"fp32": "fp32", "f32": "fp32", "float32": "fp32", "fp16": "fp16", "f16": "fp16",
                      "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
                      "int8": "int8", "i8": "int8", "u8": "int8"}


def normalize_precision(value: str | None) -> str | None:
    """Map the spellings users and tools use (``f32``, ``float16``, ``bfloat16``...) to PRECISIONS."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key in ("", "none", "auto", "default"):
        return None
    if key not in _PRECISION_ALIASES:
        raise DeployError(f"precision: expected one of {', '.join(PRECISIONS)} (or f32/f16), got {value!r}")
    return _PRECISION_ALIASES[key]


def display_path(path: str | os.PathLike) -> str:
    """A path as the user would recognise it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        rel = os.path.relpath(p)
        return p.as_posix() if rel.startswith("..") else Path(rel).as_posix()
    except ValueError:  # different drive (Windows)
        return p.as_posix()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Fields:
    """Typed access to one JSON object with errors that name the file and the dotted field."""

    def __init__(self, data: Any, where: str, prefix: str = "") -> None:
        self.where, self.prefix = where, prefix
        if not isinstance(data, Mapping):
            label = f"field '{prefix}'" if prefix else "the top level"
            raise SpecError(f"{where}: {label} must be a JSON object, got {_short(data)}")
        self.data = dict(data)
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, expected: str, got: Any = ..., *, missing: bool = False) -> SpecError:
        if missing:
            return SpecError(f"{self.where}: field '{self.path(key)}' is missing ({expected})")
        return SpecError(f"{self.where}: field '{self.path(key)}' must be {expected}, got {_short(got)}")

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "required", missing=True)
            return default() if callable(default) else default
        return self.data[key]

    def str_(self, key: str, default: Any = ..., *, choices: Iterable[str] | None = None,
             nonempty: bool = False, nullable: bool = False) -> Any:
        v = self.get(key, default)
        if v is None and nullable:
            return None
        choices = tuple(choices) if choices is not None else None
        if not isinstance(v, str) or (choices is not None and v not in choices) or (nonempty and not v):
            expected = ("one of " + ", ".join(repr(c) for c in choices)) if choices else \
                ("a non-empty string" if nonempty else "a string")
            raise self.fail(key, expected + (" or null" if nullable else ""), v)
        return v

    def int_(self, key: str, default: Any = ..., *, minimum: int | None = None) -> int:
        v = self.get(key, default)
        if not _is_int(v) or (minimum is not None and v < minimum):
            expected = "an integer" if minimum is None else f"an integer >= {minimum}"
            raise self.fail(key, expected, v)
        return int(v)

    def float_(self, key: str, default: Any = ..., *, nullable: bool = False) -> float | None:
        v = self.get(key, default)
        if v is None and nullable:
            return None
        if not _is_number(v):
            raise self.fail(key, "a number" + (" or null" if nullable else ""), v)
        return float(v)

    def bool_(self, key: str, default: Any = ...) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def dict_(self, key: str, default: Any = ...) -> dict:
        v = self.get(key, default)
        if not isinstance(v, Mapping):
            raise self.fail(key, "a JSON object", v)
        return dict(v)

    def sub(self, key: str, default: Any = ...) -> "_Fields":
        v = self.get(key, default)
        return _Fields(v, self.where, self.path(key))

    def extra(self) -> dict:
        return {k: v for k, v in self.data.items() if k not in self.used}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_img_size(value: Any) -> bool:
    """The one size rule of every model, graph and engine: a positive int multiple of IMG_SIZE_MULTIPLE."""
    return _is_int(value) and value > 0 and value % IMG_SIZE_MULTIPLE == 0


def _is_number(v: Any) -> bool:
    """A finite JSON number (NaN and +-Infinity are not JSON, and a NaN threshold never fires)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonfinite(value: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted field, value) of the first NaN/+-Infinity anywhere in a parsed JSON document, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = _nonfinite(sub, sub_path)
        if found is not None:
            return found
    return None


def _check_finite(data: Any, where: str) -> None:
    """stlm.json holds finite numbers only: name the first field that is NaN/Infinity (Python's json and
    a 1e999 literal both produce them)."""
    try:
        found = _nonfinite(data)
    except RecursionError:
        raise SpecError(f"{where}: JSON nested too deeply to be an engine description") from None
    if found is not None:
        path, value = found
        raise SpecError(f"{where}: field '{path or '(top level)'}' must be a finite number, got {json.dumps(value)}")


def _shape(f: _Fields, key: str) -> list[int]:
    v = f.get(key)
    if not isinstance(v, list) or not all(_is_int(d) and (d == -1 or d > 0) for d in v):
        raise f.fail(key, "a list of positive integers (-1 = dynamic)", v)
    return [int(d) for d in v]


# --------------------------------------------------------------------------------------- dataclasses
@dataclass
class TensorSpec:
    """One graph output: ONNX name, numpy dtype name and shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "TensorSpec":
        obj = cls(name=f.str_("name", nonempty=True), dtype=f.str_("dtype", nonempty=True),
                  shape=_shape(f, "shape"))
        obj.extra = f.extra()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), **self.extra}


@dataclass
class InputSpec:
    """The graph's single image input; ``fused_preprocessing`` says who normalises (graph or runtime)."""

    name: str = "image"
    dtype: str = "uint8"
    shape: list[int] = field(default_factory=lambda: [-1, 1024, 1024, 3])
    layout: str = "NHWC"
    channel_order: str = "RGB"
    fused_preprocessing: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "InputSpec":
        obj = cls(name=f.str_("name", nonempty=True), dtype=f.str_("dtype", choices=INPUT_DTYPES),
                  shape=_shape(f, "shape"), layout=f.str_("layout", choices=LAYOUTS),
                  channel_order=f.str_("channel_order", choices=("RGB",)),
                  fused_preprocessing=f.bool_("fused_preprocessing"))
        obj.extra = f.extra()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "layout": self.layout,
                "channel_order": self.channel_order, "fused_preprocessing": self.fused_preprocessing,
                **self.extra}


@dataclass
class Preprocessing:
    """What happens before the graph: resize to img_size, and (unfused engines) ``(x - mean) / std``.

    Tiled engines (format_version 2) add ``work_size``, ``tile_overlap`` and ``tile_blend``: the image is
    resized to a long side of ``work_size`` and cut into overlapping img_size tiles (:mod:`stlm_deploy.tiling`).
    """

    resize: str = DEFAULT_RESIZE
    mean: list[float] = field(default_factory=lambda: list(DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(DEFAULT_STD))
    extra: dict[str, Any] = field(default_factory=dict)
    work_size: int | None = None  # None: untiled
    tile_overlap: float | None = None
    tile_blend: str | None = None

    @classmethod
    def _parse(cls, f: _Fields) -> "Preprocessing":
        def triple(key: str, positive: bool) -> list[float]:
            v = f.get(key)
            ok = isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)
            if not ok or (positive and min(v) <= 0):
                raise f.fail(key, "a list of 3 " + ("positive numbers" if positive else "numbers"), v)
            return [float(x) for x in v]

        obj = cls(resize=f.str_("resize", choices=RESIZE_POLICIES), mean=triple("mean", False),
                  std=triple("std", True))
        if "work_size" in f.data:
            obj.work_size = f.int_("work_size", minimum=1)
            obj.tile_overlap = f.float_("tile_overlap")
            obj.tile_blend = f.str_("tile_blend")
        else:
            stray = [k for k in TILING_KEYS if k in f.data]
            if stray:
                raise f.fail("work_size", "given with " + ", ".join(stray) + " (a tiled engine names its work size)",
                             None)
        obj.extra = f.extra()
        return obj

    @property
    def tiled(self) -> bool:
        return self.work_size is not None

    def tiling(self, img_size: int) -> Tiling | None:
        """The engine's :class:`~stlm_deploy.tiling.Tiling` (tile = img_size), None when untiled."""
        if self.work_size is None:
            return None
        return Tiling(img_size, self.work_size, self.tile_overlap, self.tile_blend)

    def to_dict(self) -> dict[str, Any]:
        out = {"resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if self.work_size is not None:
            out.update(work_size=self.work_size, tile_overlap=self.tile_overlap, tile_blend=self.tile_blend)
        return {**out, **self.extra}


@dataclass
class Thresholds:
    """Decision thresholds chosen at export (``None`` = not calibrated) and how they were chosen."""

    image: float | None = None
    pixel: float | None = None
    method: str = "none"
    #: lowest/highest image score seen at calibration: the span of the normalized score (absent in older files)
    score_min: float | None = None
    score_max: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "Thresholds":
        obj = cls(image=f.float_("image", nullable=True), pixel=f.float_("pixel", nullable=True),
                  method=f.str_("method", "none"), score_min=f.float_("score_min", None, nullable=True),
                  score_max=f.float_("score_max", None, nullable=True))
        if (obj.score_min is None) != (obj.score_max is None):
            raise f.fail("score_max" if obj.score_max is None else "score_min",
                         "given together with its partner (score_min/score_max) or both null",
                         obj.score_max if obj.score_min is None else obj.score_min)
        if obj.score_min is not None and obj.score_max is not None and not obj.score_max > obj.score_min:
            raise f.fail("score_max", f"greater than score_min ({obj.score_min})", obj.score_max)
        obj.extra = f.extra()
        return obj

    def to_dict(self) -> dict[str, Any]:
        out = {"image": self.image, "pixel": self.pixel, "method": self.method}
        if self.score_min is not None or self.score_max is not None:
            out.update(score_min=self.score_min, score_max=self.score_max)
        return {**out, **self.extra}

    def to_parameters(self) -> dict[str, str]:
        """The ``stlm.thresholds.*`` string parameters of a Triton model config (:meth:`from_parameters`)."""
        return {f"{_PARAM}image": json.dumps(self.image), f"{_PARAM}pixel": json.dumps(self.pixel),
                f"{_PARAM}score_min": json.dumps(self.score_min), f"{_PARAM}score_max": json.dumps(self.score_max),
                f"{_PARAM}method": self.method}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "Thresholds | None":
        """Thresholds from Triton model-config parameters (None: not there); an unreadable number is None."""
        if f"{_PARAM}image" not in params:
            return None

        def num(key: str) -> float | None:
            try:
                v = json.loads(params.get(f"{_PARAM}{key}", "null") or "null")
            except ValueError:
                return None
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(image=num("image"), pixel=num("pixel"), method=params.get(f"{_PARAM}method", "none"),
                   score_min=num("score_min"), score_max=num("score_max"))


@dataclass
class Source:
    """The checkpoint the engine was exported from (provenance, not needed to run)."""

    checkpoint: str = ""
    sha256: str = ""
    kind: str = "project"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "Source":
        obj = cls(checkpoint=f.str_("checkpoint", ""), sha256=f.str_("sha256", ""),
                  kind=f.str_("kind", "project", choices=("project", "official")))
        obj.extra = f.extra()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256, "kind": self.kind, **self.extra}


@dataclass
class Artifact:
    """One file of the engine directory with the checksum the runtime verifies before using it."""

    sha256: str
    kind: str
    precision: str | None = None
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "Artifact":
        sha = f.str_("sha256")
        if not _SHA256.match(sha):
            raise f.fail("sha256", "64 lowercase hex digits", sha)
        obj = cls(sha256=sha, kind=f.str_("kind", choices=ARTIFACT_KINDS),
                  precision=f.str_("precision", None, choices=PRECISIONS, nullable=True),
                  bytes=f.int_("bytes", minimum=0))
        obj.extra = f.extra()
        inference = obj.extra.get("inference_precision")  # OpenVINO IR: the precision the parity gate passed
        if inference is not None and inference not in PRECISIONS:
            raise f.fail("inference_precision", "one of " + ", ".join(map(repr, PRECISIONS)) + " or null", inference)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "kind": self.kind, "precision": self.precision, "bytes": self.bytes,
                **self.extra}


#: Backends a ``variants`` label may name (``<backend>/<precision>``, e.g. ``openvino/bf16``).
VARIANT_BACKENDS = ("ort", "openvino", "tensorrt")


@dataclass
class VariantGate:
    """One entry of stlm.json ``variants``: whether the export gated this variant, and why.

    ``backend="auto"`` runs only gated variants (docs/engine_format.md); engines written before this
    field existed have no ``variants`` and the runtimes apply the older per-artifact rule.
    """

    artifact: str
    gated: bool
    why: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, f: _Fields) -> "VariantGate":
        art = f.str_("artifact", nonempty=True)
        p = PurePosixPath(art)
        if "\\" in art or p.is_absolute() or ".." in p.parts:
            raise f.fail("artifact", "a relative path inside the engine directory (forward slashes, no '..')", art)
        gated = f.get("gated")
        if not isinstance(gated, bool):
            raise f.fail("gated", "true or false", gated)
        obj = cls(artifact=art, gated=gated, why=f.str_("why", ""))
        obj.extra = f.extra()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "gated": self.gated, "why": self.why, **self.extra}


def _parse_variants(f: _Fields) -> dict[str, VariantGate]:
    raw = f.dict_("variants", dict)
    out: dict[str, VariantGate] = {}
    for label, val in raw.items():
        backend, _, precision = str(label).partition("/")
        if backend not in VARIANT_BACKENDS or precision not in PRECISIONS:
            raise SpecError(f"{f.where}: field 'variants' key {label!r} must be <backend>/<precision> with backend "
                            f"one of {', '.join(VARIANT_BACKENDS)} and precision one of {', '.join(PRECISIONS)}")
        out[label] = VariantGate._parse(_Fields(val, f.where, f"variants.{label}"))
    return out


def _check_relpath(f: _Fields, key: str) -> None:
    p = PurePosixPath(key)
    if not key or "\\" in key or p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", key):
        raise SpecError(f"{f.where}: field 'artifacts' key {key!r} must be a relative path inside the "
                        "engine directory (forward slashes, no '..')")


@dataclass
class EngineSpec:
    """Everything the runtime needs to know about an exported engine (mirrors ``stlm.json``)."""

    name: str
    img_size: int
    input: InputSpec
    outputs: list[TensorSpec]
    opset: int
    model_family: str = "stlm"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    top_k: int = 100
    thresholds: Thresholds = field(default_factory=Thresholds)
    source: Source = field(default_factory=Source)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    batch: int | str = "dynamic"
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    trtexec: str | None = None
    created: str = field(default_factory=_now_iso)
    format: str = FORMAT
    format_version: int = UNTILED_VERSION  # TILED_VERSION once tiled (set_tiling, create)
    extra: dict[str, Any] = field(default_factory=dict)
    #: why each selectable variant is or is not gated (empty for engines written before the field existed)
    variants: dict[str, VariantGate] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction for the exporter
    @classmethod
    def create(cls, name: str, img_size: int, *, opset: int, fused_preprocessing: bool = True,
               batch: int | str = "dynamic", with_tlm: bool = False, **fields: Any) -> "EngineSpec":
        """A spec whose input/outputs follow the fused-graph contract for ``img_size`` and ``batch``."""
        n = -1 if batch == "dynamic" else int(batch)
        s = int(img_size)
        if fused_preprocessing:
            inp = InputSpec("image", "uint8", [n, s, s, 3], "NHWC", "RGB", True)
        else:
            inp = InputSpec("image", "float32", [n, 3, s, s], "NCHW", "RGB", False)
        outputs = [TensorSpec("anomaly_map", "float32", [n, s, s]), TensorSpec("score", "float32", [n])]
        if with_tlm:
            outputs.append(TensorSpec("tlm_map", "float32", [n, s, s]))
        spec = cls(name=name, img_size=s, input=inp, outputs=outputs, opset=int(opset), batch=batch,
                   **fields)
        if spec.preprocessing.tiled:
            spec.format_version = max(spec.format_version, TILED_VERSION)
        spec.validate()
        return spec

    def set_tiling(self, tiling: Tiling | None) -> None:
        """Make the engine tiled (format_version 2: older runtimes refuse it instead of running it untiled)
        or untiled (``None``; the version untiled engines are written with)."""
        pre = self.preprocessing
        if tiling is None:
            pre.work_size = pre.tile_overlap = pre.tile_blend = None
            self.format_version = UNTILED_VERSION
        else:
            pre.work_size, pre.tile_overlap, pre.tile_blend = tiling.work_size, tiling.overlap, tiling.blend
            self.format_version = max(self.format_version, TILED_VERSION)
        self.validate()

    @property
    def tiling(self) -> Tiling | None:
        """How the runtime tiles images for this engine (None: untiled, the whole image goes to img_size)."""
        return self.preprocessing.tiling(self.img_size)

    def add_artifact(self, engine_dir: str | os.PathLike, relpath: str, kind: str,
                     precision: str | None = None, **extra: Any) -> Artifact:
        """Checksum ``engine_dir/relpath`` (a finished file) and list it under ``artifacts``.

        ``extra`` keys are recorded next to the checksum (e.g. OpenVINO's ``inference_precision``).
        """
        art = artifact_entry(engine_dir, relpath, kind, precision)
        art.extra.update(extra)
        self.artifacts[PurePosixPath(relpath).as_posix()] = art
        return art

    # ------------------------------------------------------------------------------- (de)serialising
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = SPEC_FILENAME) -> "EngineSpec":
        """Parse and validate a ``stlm.json`` object; ``where`` names the file in error messages."""
        f = _Fields(data, where)
        _check_finite(data, where)
        fmt = f.get("format")
        if fmt != FORMAT:
            raise f.fail("format", repr(FORMAT) + " (this is not an STLM engine description)", fmt)
        ver = f.get("format_version")
        if not _is_int(ver) or ver < 1:
            raise f.fail("format_version", "a positive integer", ver)
        if ver > FORMAT_VERSION:
            raise SpecError(f"{where}: field 'format_version' is {ver}, newer than this runtime supports "
                            f"({FORMAT_VERSION}): upgrade stlm-deploy or re-export with a matching version")
        img = f.get("img_size")
        if not is_img_size(img):
            raise f.fail("img_size", f"a positive multiple of {IMG_SIZE_MULTIPLE}", img)
        outs = f.get("outputs")
        if not isinstance(outs, list) or not outs:
            raise f.fail("outputs", "a non-empty list of {name, dtype, shape}", outs)
        outputs = [TensorSpec._parse(_Fields(o, where, f"outputs[{i}]")) for i, o in enumerate(outs)]
        batch = f.get("batch")
        if not (batch == "dynamic" or (_is_int(batch) and batch > 0)):
            raise f.fail("batch", "\"dynamic\" or a positive integer", batch)
        arts = f.dict_("artifacts")
        artifacts: dict[str, Artifact] = {}
        for key, val in arts.items():
            _check_relpath(f, key)
            artifacts[key] = Artifact._parse(_Fields(val, where, f"artifacts.{key}"))
        tools = f.dict_("tools", dict)
        bad = [k for k, v in tools.items() if not isinstance(v, str)]
        if bad:
            raise f.fail(f"tools.{bad[0]}", "a version string", tools[bad[0]])
        spec = cls(
            format=fmt, format_version=int(ver),
            model_family=f.str_("model_family", nonempty=True),
            name=f.str_("name", nonempty=True),
            img_size=int(img),
            input=InputSpec._parse(f.sub("input")),
            outputs=outputs,
            preprocessing=Preprocessing._parse(f.sub("preprocessing")),
            top_k=f.int_("top_k", minimum=1),
            thresholds=Thresholds._parse(f.sub("thresholds")),
            source=Source._parse(f.sub("source", dict)),
            artifacts=artifacts,
            opset=f.int_("opset", minimum=1),
            batch=batch,
            tools=tools,
            parity=f.dict_("parity", dict),
            trtexec=f.str_("trtexec", None, nullable=True),
            created=f.str_("created", ""),
        )
        spec.variants = _parse_variants(f) if "variants" in f.data else {}
        spec.extra = f.extra()
        spec.validate(where)
        return spec

    def set_variants(self, variants: Mapping[str, Mapping[str, Any]]) -> None:
        """Record the export's ``variants`` (label -> {artifact, gated, why, ...}), validated as a reader would."""
        self.variants = _parse_variants(_Fields({"variants": dict(variants)}, SPEC_FILENAME))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for ``stlm.json``: known fields in a fixed order, then preserved extras."""
        return {
            "format": self.format, "format_version": self.format_version, "model_family": self.model_family,
            "name": self.name, "img_size": self.img_size, "input": self.input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs], "preprocessing": self.preprocessing.to_dict(),
            "top_k": self.top_k, "thresholds": self.thresholds.to_dict(), "source": self.source.to_dict(),
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()}, "opset": self.opset,
            "batch": self.batch, "tools": dict(self.tools), "parity": dict(self.parity),
            "trtexec": self.trtexec, "created": self.created,
            **({"variants": {k: v.to_dict() for k, v in self.variants.items()}} if self.variants else {}),
            **self.extra,
        }

    def validate(self, where: str = SPEC_FILENAME) -> None:
        """Cross-field checks of the graph contract (input/outputs agree with img_size and batch; tiling)."""
        s, inp = self.img_size, self.input
        if not is_img_size(s):
            raise SpecError(f"{where}: field 'img_size' must be a positive multiple of {IMG_SIZE_MULTIPLE}, "
                            f"got {_short(s)}")
        pre = self.preprocessing
        if pre.tiled:
            for problem in check_tiling(s, pre.work_size, pre.tile_overlap, pre.tile_blend):
                key, _, what = problem.partition(": ")
                raise SpecError(f"{where}: field 'preprocessing.{key}' {what}")
            if self.format_version < TILED_VERSION:
                raise SpecError(f"{where}: field 'format_version' must be {TILED_VERSION} or more for a tiled engine "
                                f"(preprocessing.work_size), got {self.format_version}: a runtime older than tiling "
                                "would read version 1 and run it untiled")
        n = -1 if self.batch == "dynamic" else self.batch
        if inp.fused_preprocessing:
            want = {"dtype": "uint8", "layout": "NHWC", "shape": [n, s, s, 3]}
            what = "fused_preprocessing true"
        else:
            want = {"dtype": inp.dtype if inp.dtype in ("float32", "float16") else "float32",
                    "layout": "NCHW", "shape": [n, 3, s, s]}
            what = "fused_preprocessing false"
        for key, expected in want.items():
            got = getattr(inp, key)
            if got != expected:
                raise SpecError(f"{where}: field 'input.{key}' must be {_short(expected)} for {what}, "
                                f"img_size {s} and batch {_short(self.batch)}, got {_short(got)}")
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise SpecError(f"{where}: field 'outputs' has duplicate names {names}")
        for req, shape in (("anomaly_map", [n, s, s]), ("score", [n])):
            out = self.output(req)
            if out is None:
                raise SpecError(f"{where}: field 'outputs' must contain {req!r}, got {names}")
            if out.dtype != "float32" or out.shape != shape:
                raise SpecError(f"{where}: field 'outputs' entry {req!r} must be float32 {shape}, "
                                f"got {out.dtype} {out.shape}")

    # ------------------------------------------------------------------------------------- helpers
    @property
    def fixed_batch(self) -> int | None:
        """The exported batch size when the graph has a fixed batch, else ``None`` (dynamic)."""
        return None if self.batch == "dynamic" else int(self.batch)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)

    def find_artifacts(self, kind: str | None = None, precision: str | None = None) -> list[str]:
        """Relative paths of listed artifacts of ``kind`` (and ``precision``), in listing order."""
        return [k for k, a in self.artifacts.items()
                if (kind is None or a.kind == kind) and (precision is None or a.precision == precision)]


# -------------------------------------------------------------------------------------- file helpers
def artifact_entry(engine_dir: str | os.PathLike, relpath: str, kind: str,
                   precision: str | None = None) -> Artifact:
    """Describe ``engine_dir/relpath`` for ``artifacts`` (sha256 + size), validating kind/precision."""
    if kind not in ARTIFACT_KINDS:
        raise SpecError(f"artifact {relpath}: kind must be one of {', '.join(ARTIFACT_KINDS)}, got {kind!r}")
    precision = normalize_precision(precision)
    path = Path(engine_dir) / relpath
    if not path.is_file():
        raise DeployError(f"{display_path(path)}: artifact file not found")
    return Artifact(sha256=sha256_file(path), kind=kind, precision=precision, bytes=path.stat().st_size)


def resolve_engine(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``--engine`` accepts the directory or any file in it: return (engine_dir, preferred artifact).

    ``engines/x`` -> (engines/x, None); ``engines/x/model.fp16.onnx`` -> (engines/x, that file);
    ``engines/x/openvino/model.{xml,bin}`` or ``engines/x/openvino`` -> (engines/x, openvino/model.xml);
    ``model.plan.json`` -> the plan; ``stlm.json``/``parity.json`` -> no preference.
    """
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{display_path(p)}: no such engine directory or file")
    if p.is_dir():
        if (p / SPEC_FILENAME).is_file():
            return p, None
        if p.name == "openvino" and (p.parent / SPEC_FILENAME).is_file():
            xml = sorted(p.glob("*.xml"), key=lambda x: (x.name != "model.xml", x.name))  # not model.int8.xml
            return p.parent, (xml[0] if xml else None)
        raise SpecError(f"{display_path(p)}: not an engine directory (no {SPEC_FILENAME}); "
                        "pass the folder written by stlm-export")
    parent = p.parent
    if (parent / SPEC_FILENAME).is_file():
        engine_dir = parent
    elif parent.name == "openvino" and (parent.parent / SPEC_FILENAME).is_file():
        engine_dir = parent.parent
    else:
        raise SpecError(f"{display_path(p)}: not inside an engine directory (no {SPEC_FILENAME} next to it "
                        "or one level up)")
    name = p.name
    if name == SPEC_FILENAME or (name.endswith(".json") and not name.endswith(".plan.json")):
        return engine_dir, None
    if name.endswith(".plan.json"):
        plan = p.with_name(name[: -len(".json")])
        return engine_dir, (plan if plan.exists() else None)
    if p.suffix == ".bin" and p.with_suffix(".xml").exists():
        return engine_dir, p.with_suffix(".xml")
    return engine_dir, p


def load_spec(path: str | os.PathLike) -> EngineSpec:
    """Read and validate ``stlm.json`` of the engine at ``path`` (directory or a file inside it)."""
    engine_dir, _ = resolve_engine(path)
    spec_path = engine_dir / SPEC_FILENAME
    where = display_path(spec_path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{where}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise SpecError(f"{where}: not UTF-8 text (invalid byte at offset {e.start}); stlm.json is the JSON file "
                        "stlm-export writes") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting deeper than Python's stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]
        raise SpecError(f"{where}: not valid JSON ({reason})") from None
    return EngineSpec.from_dict(data, where=where)


def write_spec(engine_dir: str | os.PathLike, spec: EngineSpec) -> Path:
    """Validate ``spec`` (by a full parse of what will be written) and write ``stlm.json`` atomically."""
    dest = Path(engine_dir) / SPEC_FILENAME
    data = spec.to_dict()
    json.dumps(data)  # fail here (TypeError) rather than leave a half-serialised temp file
    EngineSpec.from_dict(data, where=display_path(dest))
    return atomic_write_json(dest, data)


def verify_artifacts(engine_dir: str | os.PathLike, spec: EngineSpec,
                     names: Iterable[str] | None = None) -> list[str]:
    """Check the sha256 of ``names`` (default: every listed artifact); return the names verified.

    Catches engines edited or half-copied after export: the runtime must never run a plan/model
    that is not the one the parity gate validated.
    """
    engine_dir = Path(engine_dir)
    wanted = list(spec.artifacts) if names is None else [PurePosixPath(n).as_posix() for n in names]
    for name in wanted:
        path = engine_dir / name
        art = spec.artifacts.get(name)
        if art is None:
            raise SpecError(f"{display_path(engine_dir / SPEC_FILENAME)}: artifact '{name}' is not listed in "
                            "field 'artifacts', so its checksum cannot be verified (re-export, or skip "
                            "verification with verify=False / --no-verify)")
        if not path.is_file():
            raise DeployError(f"{display_path(path)}: listed in {SPEC_FILENAME} but missing: the engine "
                              "directory is incomplete; re-export or copy it again")
        found = sha256_file(path)
        if found != art.sha256:
            raise DeployError(f"{display_path(path)}: sha256 mismatch (expected {art.sha256[:12]}..., found "
                              f"{found[:12]}...): the file was modified after export; re-export")
    return wanted
