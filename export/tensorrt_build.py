"""TensorRT plan (``model.plan`` + ``model.plan.json``) from the verified ONNX files.

:func:`builder_settings` is pure (no TensorRT needed; tested on any machine) and decides everything
a build depends on; :func:`build_engine` imports TensorRT lazily and carries the settings out.

Mixed precision differs by TensorRT generation:

* TensorRT 10 (weakly typed networks): parse the fp32 ``model.onnx``, set ``BuilderFlag.FP16`` and
  pin the layers the precision policy keeps fp32 (normalisation, softmax, reduce, top-k layers and
  every layer built from a node in :func:`stlm_export.precision.fp32_nodes`) with
  ``layer.precision`` / ``set_output_type`` under ``OBEY_PRECISION_CONSTRAINTS``.
* TensorRT >= 11 removed the FP16 flag: networks are strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), the ONNX file's types are the precision, so the
  fp16 build parses ``model.fp16.onnx`` (already converted with that same policy).

INT8 is explicit quantisation only: the build parses the Q/DQ ``model.int8.onnx`` written for ONNX
Runtime (its scales are the calibration; no ``IInt8Calibrator``, the implicit calibrators are
deprecated) into ``model.int8.plan``. TensorRT 10 needs ``BuilderFlag.INT8`` for a weakly typed
network to pick int8 kernels at the Q/DQ boundaries (plus FP16 with ``--fp16`` for the float
remainder); TensorRT >= 11 builds it strongly typed (the Q/DQ types are the precision).

The plan is the raw ``build_serialized_network`` bytes: no header is ever prepended, so
``trtexec --loadEngine`` and Triton read it as is. Everything needed to check compatibility later
(TensorRT version, GPU, compute capability, flags, profiles, source ONNX sha256) goes into the JSON
sidecar. A timing cache is loaded when present and saved after the build, so rebuilding (other
batch sizes, new weights of the same architecture) skips most tactic timing.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from stlm_deploy.backends import tensorrt_available
from stlm_deploy.errors import BackendUnavailable
from stlm_deploy.spec import IMG_SIZE_MULTIPLE, EngineSpec, is_img_size

from .gate import Gate, backend_outputs

__all__ = ["BuildSettings", "builder_settings", "build_engine", "build_gated_tensorrt", "tensorrt_available",
           "tensorrt_version",
           "TRT_INSTALL_HINT", "FP32_LAYER_TYPES", "DEFAULT_WORKSPACE_MB", "DEFAULT_MAX_BATCH", "DEFAULT_OPT_BATCH",
           "TensorRTUnavailable"]

TRT_INSTALL_HINT = ("TensorRT is not installed: pip install 'stlm-deploy[trt]' (tensorrt, cuda-python) on a machine "
                    "with an NVIDIA GPU, or choose --target onnx|openvino")
# TensorRT 10 layer types kept fp32 when BuilderFlag.FP16 is set (names of trt.LayerType).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE", "TOPK")
DEFAULT_WORKSPACE_MB = 4096
DEFAULT_MAX_BATCH = 8
DEFAULT_OPT_BATCH = 4
_INPUT = "image"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU) is missing; the message says what to install."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything one TensorRT build depends on (also recorded in the sidecar)."""

    trt_major: int
    precision: str  # "fp16" | "fp32" | "int8"
    onnx_file: str  # which ONNX file of the engine directory is parsed
    strongly_typed: bool
    flags: tuple[str, ...]  # trt.BuilderFlag names to set
    fp32_layer_types: tuple[str, ...]  # trt.LayerType names pinned to fp32 (TRT 10 + FP16 only)
    fp32_layer_names: tuple[str, ...]  # ONNX node names whose layers are pinned to fp32 (TRT 10 + FP16 only)
    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    workspace_bytes: int
    timing_cache: str | None
    version_compatible: bool
    hardware_compatibility_level: str  # "NONE" | "AMPERE_PLUS"
    plan_file: str = "model.plan"
    trtexec: str = ""
    calibrator: None = None  # explicit quantisation (Q/DQ in the ONNX): never an IInt8Calibrator

    def profile(self) -> dict[str, list[int]]:
        return {"min": list(self.min_shape), "opt": list(self.opt_shape), "max": list(self.max_shape)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("flags", "fp32_layer_types", "fp32_layer_names", "min_shape", "opt_shape", "max_shape"):
            d[k] = list(d[k])
        return d


def _shape(n: int, img_size: int, fused_pre: bool) -> tuple[int, ...]:
    return (n, img_size, img_size, 3) if fused_pre else (n, 3, img_size, img_size)


def _dims(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


def builder_settings(trt_major: int, fp16: bool, batch: int | str, max_batch: int = DEFAULT_MAX_BATCH,
                     opt_batch: int = DEFAULT_OPT_BATCH, img_size: int = 1024, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                     timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                     hardware_compatible: bool = False, fused_pre: bool = True,
                     fp32_layer_names: Iterable[str] = (), int8: bool = False) -> BuildSettings:
    """Pure: the build configuration and its equivalent ``trtexec`` command line.

    Args:
        trt_major: TensorRT major version (10, 11, ...); 10 uses the FP16 flag + pinned layers,
            >= 11 strongly typed networks from ``model.fp16.onnx``.
        fp16: mixed precision build (False: fp32 plan).
        batch: "dynamic" (profile min 1 / opt ``opt_batch`` / max ``max_batch``) or a fixed int.
        img_size: graph input side; ``fused_pre`` picks NHWC uint8 vs NCHW float32 shapes.
        workspace_mb: builder workspace pool limit.
        timing_cache: path of a reusable timing cache (loaded if present, saved after the build).
        version_compatible: plan loadable by later TensorRT versions of the same major (lean runtime).
        hardware_compatible: plan for any Ampere-or-newer GPU (``HardwareCompatibilityLevel.AMPERE_PLUS``).
        fp32_layer_names: ONNX node names kept fp32 by the precision policy (TRT 10 FP16 builds).
        int8: explicit-quantisation build of ``model.int8.onnx`` (Q/DQ) into ``model.int8.plan``.
    """
    if not isinstance(trt_major, int) or trt_major < 10:
        raise ValueError(f"TensorRT {trt_major} is not supported: TensorRT >= 10 is required")
    if not is_img_size(img_size):
        raise ValueError(f"img_size must be a positive multiple of {IMG_SIZE_MULTIPLE}, got {img_size!r}")
    if workspace_mb <= 0:
        raise ValueError(f"workspace_mb must be positive, got {workspace_mb}")
    if batch == "dynamic":
        if not 1 <= opt_batch <= max_batch:
            raise ValueError(f"TensorRT profile needs 1 <= opt_batch <= max_batch, got opt {opt_batch}, max {max_batch}")
        lo, opt, hi = 1, opt_batch, max_batch
    elif isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        lo = opt = hi = batch
    else:
        raise ValueError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    strongly_typed = trt_major >= 11
    flags: list[str] = []
    layer_types: tuple[str, ...] = ()
    layer_names: tuple[str, ...] = ()
    if int8 and not strongly_typed:
        flags.append("INT8")
    if fp16 and not strongly_typed:
        flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        layer_types = FP32_LAYER_TYPES
        layer_names = tuple(dict.fromkeys(fp32_layer_names))
    if version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if int8:
        onnx_file, plan_file = "model.int8.onnx", "model.int8.plan"
    else:
        onnx_file, plan_file = ("model.fp16.onnx" if (fp16 and strongly_typed) else "model.onnx"), "model.plan"
    shapes = [_shape(n, img_size, fused_pre) for n in (lo, opt, hi)]
    level = "AMPERE_PLUS" if hardware_compatible else "NONE"
    cache = os.fspath(timing_cache) if timing_cache is not None else None

    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={plan_file}"]
    if batch == "dynamic":
        cmd += [f"--minShapes={_INPUT}:{_dims(shapes[0])}", f"--optShapes={_INPUT}:{_dims(shapes[1])}",
                f"--maxShapes={_INPUT}:{_dims(shapes[2])}"]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    elif int8:
        cmd.append("--int8")
    if not strongly_typed and fp16:
        cmd += ["--fp16", "--precisionConstraints=obey"]
        if layer_names:
            spec = ",".join(f"{n}:fp32" for n in layer_names)
            cmd += [f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    cmd.append(f"--memPoolSize=workspace:{int(workspace_mb)}M")
    if cache:
        cmd.append(f"--timingCacheFile={cache}")
    if version_compatible:
        cmd.append("--versionCompatible")
    if hardware_compatible:
        cmd.append("--hardwareCompatibilityLevel=ampere+")
    return BuildSettings(
        trt_major=trt_major, precision="int8" if int8 else ("fp16" if fp16 else "fp32"), onnx_file=onnx_file,
        strongly_typed=strongly_typed, flags=tuple(flags), fp32_layer_types=layer_types,
        fp32_layer_names=layer_names, input_name=_INPUT, min_shape=shapes[0], opt_shape=shapes[1],
        max_shape=shapes[2], workspace_bytes=int(workspace_mb) << 20, timing_cache=cache,
        version_compatible=bool(version_compatible), hardware_compatibility_level=level, plan_file=plan_file,
        trtexec=" ".join(shlex.quote(c) for c in cmd))


# ------------------------------------------------------------------------------ real builds (lazy)
def tensorrt_version() -> str | None:
    """Installed TensorRT version without importing it (None when absent)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt-cu11"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt as trt  # installed without metadata (e.g. a system package)

    return str(trt.__version__)


def _import_trt() -> Any:
    """The runtime's TensorRT import (one availability check for build and run)."""
    from stlm_deploy.backends.tensorrt import import_tensorrt

    try:
        return import_tensorrt()
    except BackendUnavailable as e:
        raise TensorRTUnavailable(TRT_INSTALL_HINT) from e


def _gpu_info() -> tuple[str, str]:
    """(GPU name, compute capability 'M.m') of device 0 through the runtime's cuda-python import."""
    from stlm_deploy.backends.tensorrt import import_cudart

    try:
        err, props = import_cudart().cudaGetDeviceProperties(0)
    except Exception as e:  # noqa: BLE001 - no driver, no device, no cuda-python
        raise TensorRTUnavailable(f"TensorRT build needs an NVIDIA GPU ({e})") from e
    if int(err) != 0:
        raise TensorRTUnavailable(f"TensorRT build needs an NVIDIA GPU (cudaGetDeviceProperties: error {int(err)})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.split("\0", 1)[0].strip(), f"{props.major}.{props.minor}"


def _matches(layer_name: str, names: set[str]) -> bool:
    """TensorRT names parsed layers after their ONNX node (sometimes with a suffix or a bracket tag)."""
    if layer_name in names:
        return True
    base = layer_name.split(" ", 1)[0]
    if base in names:
        return True
    return any(layer_name.startswith(n + "_") or f"[ONNX Layer: {n}]" in layer_name for n in names)


def build_engine(settings: BuildSettings, engine_dir: str | os.PathLike, *, onnx_sha256: str | None = None,
                 log: Any = None) -> dict[str, Any]:
    """Build ``engine_dir/model.plan`` (raw bytes) + ``model.plan.json``; returns the sidecar dict."""
    from stlm_deploy.files import atomic_write_bytes, atomic_write_json, sha256_file

    trt = _import_trt()
    engine_dir = Path(engine_dir)
    onnx_path = engine_dir / settings.onnx_file
    gpu_name, cc = _gpu_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    if settings.strongly_typed:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path.name}: TensorRT could not parse it: {errs[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings.hardware_compatibility_level != "NONE":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      settings.hardware_compatibility_level)
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, settings.min_shape, settings.opt_shape, settings.max_shape)
    config.add_optimization_profile(profile)
    pinned = 0
    if settings.fp32_layer_types or settings.fp32_layer_names:
        types = {getattr(trt.LayerType, t) for t in settings.fp32_layer_types}
        names = set(settings.fp32_layer_names)
        floats = {trt.float32, trt.float16}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type not in types and not _matches(layer.name, names):
                continue
            outs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if not outs or any(o.dtype not in floats for o in outs):
                continue  # shape/index layers (TopK indices, Shape) keep their own types
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    cache_loaded = False
    if settings.timing_cache:
        cache_path = Path(settings.timing_cache)
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache_loaded = bool(data)
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # another TensorRT/GPU: start afresh
            cache_loaded = False
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {settings.onnx_file} (see the TensorRT log above)")
    plan = engine_dir / settings.plan_file
    atomic_write_bytes(plan, bytes(serialized))  # raw engine bytes, never a header
    if settings.timing_cache:
        atomic_write_bytes(settings.timing_cache, bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "tensorrt_version": str(trt.__version__), "gpu_name": gpu_name, "compute_capability": cc,
        "precision": settings.precision, "flags": list(settings.flags), "strongly_typed": settings.strongly_typed,
        "version_compatible": settings.version_compatible,
        "hardware_compatibility_level": settings.hardware_compatibility_level,
        "profiles": [{settings.input_name: settings.profile()}], "onnx_file": settings.onnx_file,
        "onnx_sha256": onnx_sha256 or sha256_file(onnx_path), "workspace_bytes": settings.workspace_bytes,
        "fp32_layers_pinned": pinned, "timing_cache": settings.timing_cache, "timing_cache_loaded": cache_loaded,
        "trtexec": settings.trtexec,
    }
    atomic_write_json(engine_dir / (settings.plan_file + ".json"), sidecar)
    if log is not None:
        log(f"TensorRT {trt.__version__} plan for {gpu_name} (cc {cc}): {plan.stat().st_size:,} bytes, "
            f"{pinned} layers pinned fp32")
    return json.loads(json.dumps(sidecar))


def build_gated_tensorrt(tmp: Path, settings: BuildSettings, batch: int | str, graph_inputs: Any,
                         gate: Gate, spec: EngineSpec) -> None:
    """Build the plan (TensorRT + GPU) and gate it through the runtime's TensorRT backend.

    ``graph_inputs`` None: not verified. Raises TensorRTUnavailable without TensorRT or a GPU.
    """
    from stlm_deploy.files import sha256_file

    sidecar = build_engine(settings, tmp, log=gate.say)
    spec.tools["tensorrt"] = sidecar["tensorrt_version"]
    if graph_inputs is not None:
        from stlm_deploy.backends.tensorrt import TensorRTBackend

        onnx_shas = [sha256_file(tmp / f) for f in ("model.onnx", "model.fp16.onnx") if (tmp / f).is_file()]
        backend = TensorRTBackend(tmp / settings.plan_file, onnx_sha256s=onnx_shas)
        got = backend_outputs(backend, graph_inputs, batch, dynamic_chunk=min(4, settings.max_shape[0]))
        gate.require(gate.check(settings.plan_file, "tensorrt", settings.precision, got,
                                details={"tensorrt_version": sidecar["tensorrt_version"],
                                         "gpu_name": sidecar["gpu_name"]}))
    spec.add_artifact(tmp, settings.plan_file, "tensorrt", settings.precision)
    spec.add_artifact(tmp, settings.plan_file + ".json", "json")
