"""The export pipeline behind ``stlm-export``: checkpoint -> verified engine directory, atomically.

Order of work (each step gated before the next one runs):

1. validate options (one-line ``ExportError`` naming the flag), resolve targets, load the model;
2. calibration images and the PyTorch reference outputs on them (skipped with ``verify=False``);
3. fused fp32 ONNX (TorchScript exporter, full checker, onnxslim kept only if the parity probe
   passes) -> ``model.onnx``, gated with ONNX Runtime CPU;
4. ``--fp16``: ``model.fp16.onnx`` with the precision policy, gated;
5. OpenVINO IR (fp32 weights), parity-gated at f32; its bf16/fp16 inference task-gated
   against fp32 on the gate images (:mod:`stlm_export.precision_gate`: AUROC within 0.01, decisions
   >= 98 %, evidence recorded), the first that passes recorded as the IR's ``inference_precision``;
6. TensorRT plan + sidecar (needs TensorRT and a GPU), gated through the runtime's TensorRT backend;
6b. ``--int8``: ``model.int8.onnx`` (Q/DQ), ``openvino/model.int8.xml`` (NNCF) and, with TensorRT,
   ``model.int8.plan``, each published only if it passes the INT8 accuracy gate
   (:mod:`stlm_export.int8.build`); a failing INT8 artifact never stops the others;
7. ``parity.json``, Polygraphy ``inputs.json``/``outputs.json``, ``stlm.json`` with every artifact's
   sha256 and ``variants``: for every variant the runtimes can select, whether it is gated and why.

The task gates (bf16/fp16 and INT8) judge on one set of gate images (:mod:`stlm_export.int8.data`:
``--val-data``, the checkpoint's test or held-out split, the bundled sample, ...), never on the INT8
calibration images; how much evidence they had is printed, and a warning is printed (and kept in
parity.json and stlm.json) for every limit the images are too few to resolve.

Every gate runs the artifact through the runtime's backends (``stlm_deploy.backends``), and
``stlm.json`` is built with ``stlm_deploy.spec.EngineSpec`` (the format's one builder and reader).
Everything is written into a temporary sibling directory that replaces ``engines/<name>`` only
after the last step succeeded (``stlm_deploy.files.atomic_directory``): a failed gate, an error
or an interrupt leaves no partial directory and never touches an existing engine.

The ONNX files embed the engine description in ``metadata_props``: scalar ``stlm.*`` keys plus the
whole ``stlm.json`` as a JSON string under ``"stlm.json"``, *without* ``artifacts``, ``parity`` and
``variants``: a file cannot contain its own sha256, and the gate verdicts are measured on the finished file.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from stlm_deploy.files import atomic_directory, atomic_write_json, sha256_file
from stlm_deploy.spec import IMG_SIZE_MULTIPLE, EngineSpec, Preprocessing, Source, Thresholds, is_img_size, write_spec

from .calib import DEFAULT_MAX_IMAGES, CalibSet, TileLayout, calibration_images, image_folder
from .onnx_export import (DEFAULT_OPSET, METADATA_SPEC_KEY, check_opset, export_onnx, save_onnx, set_metadata,
                          torch_param_count)
from .precision import convert_fp16, float_nodes, fp32_nodes, name_nodes
from .gate import (POLYGRAPHY_RUNNER, Gate, ParityGateError, Tolerance, normalize_images, ort_outputs,
                   polygraphy_command, reference_outputs, write_polygraphy_files)
from .int8.build import Int8Outcome, build_gated_int8
from .int8.data import DEFAULT_VAL_IMAGES, ValSet, gate_data
from .openvino_build import build_gated_openvino
from .precision_gate import GateImages, PrecisionOutcome, variant_summary
from .task_gate import Int8Tolerance, TaskTolerance
from .tensorrt_build import (DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, DEFAULT_WORKSPACE_MB, TRT_INSTALL_HINT,
                             TensorRTUnavailable, build_engine, build_gated_tensorrt, builder_settings, tensorrt_available,
                             tensorrt_version)

if TYPE_CHECKING:
    from stlm_train.checkpoint import Checkpoint

__all__ = ["ExportError", "ExportOptions", "ExportResult", "TARGETS", "export_engine", "parse_batch",
           "resolve_targets", "default_name", "check_img_size", "ParityGateError", "Int8GateError", "spec_metadata",
           "int8_only"]

log_ = logging.getLogger("stlm_export")

TARGETS = ("onnx", "openvino", "tensorrt", "all")
_GENERIC_STEMS = {"model", "last", "best", "checkpoint", "final"}


class ExportError(ValueError):
    """A bad option or input; one line naming the flag or file (printed as ``Error: ...``)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Int8GateError(ParityGateError):
    """``--int8`` alone was asked for and an INT8 artifact failed its gate (the rest *was* published)."""

    def __init__(self, message: str, result: "ExportResult") -> None:
        super().__init__(message)
        self.result = result


@dataclass
class ExportOptions:
    """Everything ``stlm-export`` can be asked to do (CLI flags map 1:1 onto these fields)."""

    ckpt: str | os.PathLike
    out: str | os.PathLike | None = None
    name: str | None = None
    img_size: int | None = None
    batch: int | str = "dynamic"
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    int8: bool = False
    target: str | None = None  # None: onnx + openvino (+ tensorrt with --fp16 when TensorRT imports)
    verify: bool = True
    fuse_pre: bool = True
    with_tlm: bool = False
    calib_data: str | os.PathLike | None = None
    val_data: str | os.PathLike | None = None  # labelled test folder for the task gates (bf16/fp16, INT8)
    gate_images: int = DEFAULT_VAL_IMAGES  # at most this many gate images (spread evenly)
    task_tolerance: TaskTolerance | None = None  # bf16/fp16 task gate limits (tests, experiments)
    int8_accuracy_control: bool = True  # --int8: nncf.quantize_with_accuracy_control on labelled val data
    int8_tolerance: Int8Tolerance | None = None  # --int8 gate limits (tests, experiments)
    parity_images: int = DEFAULT_MAX_IMAGES
    simplify: bool = True
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: str | os.PathLike | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    engines_root: str | os.PathLike = "engines"
    tolerances: Mapping[str, Tolerance] | None = None  # per-precision overrides (experiments, tests)


@dataclass
class ExportResult:
    """What was published and the numbers behind it."""

    engine_dir: Path
    spec: dict[str, Any]
    parity: list[dict[str, Any]]
    graph: dict[str, Any]
    fp16_policy: dict[str, Any] | None = None
    targets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    int8: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------ option parsing
def parse_batch(value: Any) -> int | str:
    """``--batch``: "dynamic" or a positive integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        v = value.strip().lower()
        if v == "dynamic":
            return "dynamic"
        if v.isdigit() and int(v) > 0:
            return int(v)
    raise ExportError(f"--batch: expected 'dynamic' or a positive integer, got {value!r}")


def check_img_size(value: Any) -> int | None:
    """``--img-size``: the one size rule (``spec.is_img_size``); None keeps the checkpoint's size."""
    if value is None:
        return None
    if not is_img_size(value):
        raise ExportError(f"--img-size: must be a positive multiple of {IMG_SIZE_MULTIPLE} (e.g. 256, 512, 1024), "
                          f"got {value!r}")
    return value


def resolve_targets(target: str | None, fp16: bool, trt_importable: bool | None = None) -> tuple[str, ...]:
    """Targets to build: ``--target tensorrt`` needs TensorRT; ``all`` and the default take what is installed.

    ``all`` means every engine this machine can build (TensorRT only where it is importable), so the
    same command works on a CPU box and on a GPU box; the CLI says when TensorRT was left out.
    """
    if target is not None and target not in TARGETS:
        raise ExportError(f"--target: expected one of {', '.join(TARGETS)}, got {target!r}")
    trt_ok = tensorrt_available() if trt_importable is None else trt_importable
    if target is None:
        return ("onnx", "openvino", "tensorrt") if (fp16 and trt_ok) else ("onnx", "openvino")
    if target == "all":
        return ("onnx", "openvino", "tensorrt") if trt_ok else ("onnx", "openvino")
    wanted = ("onnx", target) if target != "onnx" else ("onnx",)
    if "tensorrt" in wanted and not trt_ok:
        raise ExportError(f"--target {target}: {TRT_INSTALL_HINT}")
    return wanted


def default_name(ckpt: str | os.PathLike) -> str:
    """``runs/bottle/model.ckpt`` -> "bottle" (the run folder); ``stlm_bottle.pth`` -> "stlm_bottle"."""
    p = Path(ckpt)
    if p.stem.lower() in _GENERIC_STEMS and p.resolve().parent.name:
        return p.resolve().parent.name
    return p.stem


def _check_out(out: Path) -> None:
    """Never replace something that is not an engine directory (e.g. a typo pointing at $HOME)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "stlm.json").is_file():
        raise ExportError(f"--out {out}: exists, is not empty and is not an engine directory (no stlm.json); "
                          "refusing to replace it")


def _validate(opts: ExportOptions) -> tuple[int | str, int | None]:
    batch = parse_batch(opts.batch)
    if opts.int8 and not opts.verify:
        raise ExportError("--int8 with --no-verify: INT8 artifacts are published only through their accuracy gate")
    if opts.int8 and not opts.fuse_pre:
        raise ExportError("--int8 with --no-fuse-pre: INT8 calibration feeds uint8 images; use the fused graph")
    if opts.int8 and batch not in ("dynamic", 1):
        raise ExportError(f"--int8 with --batch {batch}: calibration feeds one image per call; use --batch dynamic or 1")
    if not opts.verify and opts.val_data is not None:
        raise ExportError("--val-data with --no-verify: the gate images are only used by the gates")
    if not isinstance(opts.gate_images, int) or isinstance(opts.gate_images, bool) or opts.gate_images < 1:
        raise ExportError(f"--gate-images: must be a positive integer, got {opts.gate_images!r}")
    if opts.val_data is not None:
        image_folder("--val-data", opts.val_data, ExportError)
    img_size = check_img_size(opts.img_size)
    try:
        check_opset(opts.opset)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if not isinstance(opts.parity_images, int) or opts.parity_images < 1:
        raise ExportError(f"--parity-images: must be a positive integer, got {opts.parity_images!r}")
    if batch == "dynamic" and not 1 <= opts.opt_batch <= opts.max_batch:
        raise ExportError(f"--opt-batch/--max-batch: need 1 <= opt <= max, got {opts.opt_batch}/{opts.max_batch}")
    if opts.name is not None and (not opts.name.strip() or "/" in opts.name or "\\" in opts.name
                                  or opts.name in (".", "..")):
        raise ExportError(f"--name: must be a plain folder name, got {opts.name!r}")
    if opts.calib_data is not None:
        image_folder("--calib-data", opts.calib_data, ExportError)
    return batch, img_size


# ------------------------------------------------------------------------------------------- helpers
def _tool_versions(extra: Mapping[str, str | None] = ()) -> dict[str, str]:
    tools: dict[str, str] = {}
    for key, dists in (("torch", ("torch",)), ("onnx", ("onnx",)),
                       ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("openvino", ("openvino",)),
                       ("onnxslim", ("onnxslim",)), ("onnxsim", ("onnxsim",)),
                       ("onnxconverter_common", ("onnxconverter-common",)), ("polygraphy", ("polygraphy",))):
        for d in dists:
            try:
                tools[key] = md.version(d)
                break
            except md.PackageNotFoundError:
                continue
    for k, v in dict(extra).items():
        if v:
            tools[k] = v
    return tools


def _thresholds(record: "Checkpoint", img_size: int, with_tlm: bool) -> Thresholds:
    """The checkpoint's thresholds as stlm.json records them (TLM ones only for a --with-tlm graph)."""
    from stlm_train.checkpoint.record import finite_or_none

    th = record.thresholds
    if th is None:
        return Thresholds()
    method = th.method or "checkpoint"
    if record.trained_size is not None and record.trained_size != img_size:
        method += f" (chosen at img_size {record.trained_size}; engine exported at {img_size})"
    tlm = {k: v for k in ("tlm_image", "tlm_pixel") if with_tlm and (v := finite_or_none(th.extra.get(k))) is not None}
    lo, hi = th.score_min, th.score_max
    if lo is None or hi is None or not hi > lo:  # older checkpoints: the runtime's documented fallback span
        lo = hi = None
    return Thresholds(image=th.image, pixel=th.pixel, method=method, score_min=lo, score_max=hi, extra=tlm)


def spec_metadata(engine: EngineSpec, precision: str) -> dict[str, str]:
    """``metadata_props`` of one ONNX file: scalar mirrors + the spec (minus artifacts/parity) as JSON."""
    spec = engine.to_dict()
    embedded = {k: v for k, v in spec.items() if k not in ("artifacts", "parity", "variants")}
    props: dict[str, str] = {}
    for key in ("format", "format_version", "model_family", "name", "img_size", "top_k", "opset", "batch", "created"):
        props[f"stlm.{key}"] = str(spec[key])
    inp = spec["input"]
    props.update({"stlm.input.name": inp["name"], "stlm.input.dtype": inp["dtype"], "stlm.input.layout": inp["layout"],
                  "stlm.input.channel_order": inp["channel_order"],
                  "stlm.input.fused_preprocessing": json.dumps(inp["fused_preprocessing"]),
                  "stlm.outputs": ",".join(o["name"] for o in spec["outputs"]),
                  "stlm.preprocessing.mean": json.dumps(spec["preprocessing"]["mean"]),
                  "stlm.preprocessing.std": json.dumps(spec["preprocessing"]["std"]),
                  "stlm.thresholds.image": json.dumps(engine.thresholds.image),
                  "stlm.thresholds.pixel": json.dumps(engine.thresholds.pixel),
                  "stlm.source.sha256": spec["source"]["sha256"], "stlm.source.kind": spec["source"]["kind"],
                  "stlm.precision": precision,
                  METADATA_SPEC_KEY: json.dumps(embedded, sort_keys=False)})
    return props


def int8_only(opts: ExportOptions) -> bool:
    """``--int8`` was the only thing asked for (no --fp16, no --target): a failing INT8 gate exits non-zero.

    The fp32 ``model.onnx`` (and its default OpenVINO IR) are the base every export writes, not a request.
    """
    return bool(opts.int8) and not opts.fp16 and opts.target is None


def _say_gate_images(val: ValSet, opts: ExportOptions, say: Callable[[str], None]) -> list[str]:
    """Print what the task gates will judge on and every evidence warning; returns the warnings."""
    tol = opts.task_tolerance or TaskTolerance()
    ev = val.evidence()
    say(f"gate images: {ev.line(tol)}{' (' + val.note + ')' if val.note else ''}")
    warnings = [f"weak gate evidence: {w}" for w in ev.warnings(tol)]
    for w in warnings:
        say(f"WARNING: {w}")
    return warnings


# ---------------------------------------------------------------------------------------- the export
def export_engine(opts: ExportOptions, log: Callable[[str], None] | None = None) -> ExportResult:
    """Run the whole export; raises ExportError / CheckpointError / ParityGateError (all one line)."""
    from stlm_train.checkpoint import read_checkpoint
    from stlm_train.modeling import tiling_of

    say = log or (lambda msg: log_.info(msg))
    t0 = time.perf_counter()
    batch, img_size = _validate(opts)
    targets = resolve_targets(opts.target, opts.fp16)
    if opts.target == "all" and "tensorrt" not in targets:
        say(f"--target all: TensorRT left out on this machine ({TRT_INSTALL_HINT})")
    ckpt = Path(opts.ckpt)
    name = opts.name or default_name(ckpt)
    out = Path(opts.out) if opts.out is not None else Path(opts.engines_root) / name
    _check_out(out)

    record = read_checkpoint(ckpt)  # read once: the sha256 is that of the bytes loaded
    if record.kind == "official_stfpm":
        raise ExportError(f"{ckpt}: an official STFPM snapshot needs its ImageNet teacher: save a project checkpoint "
                          "first (stlm_train.save_checkpoint(PATH, stlm_train.load_model(SNAPSHOT, teacher=...)))")
    stlm = record.model(img_size)  # errors name the file
    family = record.family
    if opts.with_tlm and family != "stlm":
        raise ExportError(f"--with-tlm: {ckpt} is a {family} model, which has a single map (no TLM map)")
    cfg = stlm.cfg
    s = cfg.img_size
    tiling = tiling_of(stlm)  # a tiled checkpoint: a per-tile graph, gated on stitched maps, stlm.json version 2
    tiled = TileLayout(tiling, int(cfg.top_k)) if tiling is not None else None
    say(f"{ckpt}: {record.source_kind} {family} checkpoint, config {cfg.name} at {s} px, {torch_param_count(stlm):,} parameters; "
        f"targets {', '.join(targets)}{' +fp16' if opts.fp16 else ''}, batch {batch}, opset {opts.opset}"
        + (f"; tiled: {tiling.describe()}" if tiling is not None else ""))

    calib8: CalibSet | None = None
    val: ValSet | None = None
    if opts.verify:  # before any work: a bad --calib-data/--val-data fails fast
        try:
            calib8, val = gate_data(opts.calib_data, opts.val_data, record.train_split, s, cfg.resize, int8=opts.int8,
                                    max_images=opts.gate_images, parity_images=opts.parity_images, tiled=tiled)
        except ValueError as e:
            raise ExportError(str(e)) from None
        warnings = _say_gate_images(val, opts, say)
    else:
        warnings = []

    # calibration images and the PyTorch reference
    calib: CalibSet | None = None
    ref: dict[str, np.ndarray] = {}
    graph_inputs: np.ndarray | None = None
    if opts.verify:
        try:
            calib = calibration_images(opts.calib_data, s, opts.parity_images, cfg.resize, tiled)
        except ValueError as e:
            raise ExportError(str(e)) from None
        ref = reference_outputs(stlm, calib.images, with_tlm=opts.with_tlm)
        graph_inputs = calib.images if opts.fuse_pre else normalize_images(stlm, calib.images)
        say(f"parity images: {len(calib)} from {calib.source}"
            + (f" ({len(calib.images)} tiles, compared stitched)" if tiled is not None else ""))
    gate = Gate(ref, calib.source if calib else "", opts.tolerances, say, calib.layout if calib else None)

    def probe(model: Any) -> tuple[bool, str]:
        rec = gate.check("model.onnx (simplified)", "onnxruntime-cpu", "fp32", ort_outputs(model, graph_inputs, batch))
        return rec.passed, f"max|Δmap| {rec.max_abs_map:.2e}"

    exp = export_onnx(stlm, opset=opts.opset, batch=batch, fuse_pre=opts.fuse_pre, with_tlm=opts.with_tlm,
                      simplify=opts.simplify, probe=probe if opts.verify else None)
    name_nodes(exp.model)
    notes = list(exp.notes)
    graph = {**exp.report.to_dict(), "torch_params": torch_param_count(stlm), "raw_nodes": exp.raw_report.nodes,
             "simplified": exp.simplified, "simplifier": exp.simplifier}
    say(f"model.onnx: {exp.report.line()} (exporter output: {exp.raw_report.nodes} nodes; "
        f"{'; '.join(exp.notes)})")

    trt_ver = tensorrt_version()
    trt_major = int(trt_ver.split(".")[0]) if trt_ver else 10
    fp32_names = sorted(set(fp32_nodes(exp.model)) & float_nodes(exp.model)) if opts.fp16 else []
    timing_cache = opts.timing_cache
    if timing_cache is None and "tensorrt" in targets:
        timing_cache = out.parent / ".trt-timing.cache"  # shared by every engine built next to this one
    settings = builder_settings(trt_major, opts.fp16, batch, opts.max_batch, opts.opt_batch, s, opts.workspace_mb,
                                timing_cache, opts.version_compatible, opts.hardware_compatible, opts.fuse_pre,
                                fp32_layer_names=fp32_names if trt_major < 11 else ())

    spec = EngineSpec.create(
        name, s, opset=opts.opset, model_family=family, fused_preprocessing=opts.fuse_pre, batch=batch, with_tlm=opts.with_tlm,
        preprocessing=Preprocessing(resize=cfg.resize, mean=[float(v) for v in cfg.pixel_mean],
                                    std=[float(v) for v in cfg.pixel_std],
                                    **(dict(work_size=tiling.work_size, tile_overlap=tiling.overlap,
                                            tile_blend=tiling.blend) if tiling is not None else {})),
        top_k=int(cfg.top_k), thresholds=_thresholds(record, s, opts.with_tlm),
        source=Source(checkpoint=str(ckpt), sha256=record.sha256, kind=record.source_kind),
        tools=_tool_versions({"tensorrt": trt_ver if "tensorrt" in targets else None}), trtexec=settings.trtexec)
    fp16_policy: dict[str, Any] | None = None

    with atomic_directory(out) as tmp:
        set_metadata(exp.model, spec_metadata(spec, "fp32"))
        save_onnx(exp.model, tmp / "model.onnx")
        spec.add_artifact(tmp, "model.onnx", "onnx", "fp32")
        if opts.verify:
            gate.require(gate.check("model.onnx", "onnxruntime-cpu", "fp32",
                                    ort_outputs(tmp / "model.onnx", graph_inputs, batch)))

        if opts.fp16:
            conv = convert_fp16(exp.model)
            set_metadata(conv.model, spec_metadata(spec, "fp16"))
            save_onnx(conv.model, tmp / "model.fp16.onnx")
            spec.add_artifact(tmp, "model.fp16.onnx", "onnx", "fp16")
            fp16_policy = conv.summary()
            say(f"model.fp16.onnx: {conv.count} nodes kept fp32: "
                + ", ".join(f"{k} {v}" for k, v in conv.histogram().items()))
            if opts.verify:
                gate.require(gate.check("model.fp16.onnx", "onnxruntime-cpu", "fp16",
                                        ort_outputs(tmp / "model.fp16.onnx", graph_inputs, batch),
                                        details={"kept_fp32_count": conv.count,
                                                 "kept_fp32_by_op": conv.histogram()}))

        task: GateImages | None = None
        if val is not None:
            val_inputs = val.images if opts.fuse_pre else normalize_images(stlm, val.images)
            task = GateImages(val, ort_outputs(tmp / "model.onnx", val_inputs, batch), spec.thresholds.image,
                              opts.task_tolerance or TaskTolerance(), val_inputs)
        precision: PrecisionOutcome | None = None
        if "openvino" in targets:
            precision = build_gated_openvino(tmp, batch, graph_inputs, gate, spec, task, say)

        if "tensorrt" in targets:
            try:
                build_gated_tensorrt(tmp, settings, batch, graph_inputs, gate, spec)
            except TensorRTUnavailable as e:
                raise ExportError(f"--target tensorrt: {e}") from None

        int8: Int8Outcome | None = None
        if opts.int8:
            trt_int8 = None
            if "tensorrt" in targets:
                int8_settings = builder_settings(trt_major, opts.fp16, batch, opts.max_batch, opts.opt_batch, s,
                                                 opts.workspace_mb, timing_cache, opts.version_compatible,
                                                 opts.hardware_compatible, opts.fuse_pre, int8=True)

                def trt_int8() -> tuple[str, Any]:
                    from stlm_deploy.backends.tensorrt import TensorRTBackend

                    build_engine(int8_settings, tmp, log=say)
                    return int8_settings.plan_file, TensorRTBackend(tmp / int8_settings.plan_file,
                                                                    onnx_sha256s=[sha256_file(tmp / "model.int8.onnx")])
            assert calib8 is not None and val is not None and task is not None
            int8 = build_gated_int8(tmp, spec, calib8, val, targets=targets, metadata=spec_metadata(spec, "int8"),
                                    tolerance=opts.int8_tolerance, accuracy_control=opts.int8_accuracy_control,
                                    trt_build=trt_int8, fp32=task.fp32, say=say)

        summary: dict[str, Any] = {"verified": False, "passed": None, "summary": {}}
        if opts.verify:
            assert calib is not None and graph_inputs is not None
            # one Polygraphy iteration: 2 images (dynamic) or exactly one fixed batch (last image repeated)
            n_poly = 2 if batch == "dynamic" else int(batch)
            take = np.minimum(np.arange(n_poly), len(calib) - 1)
            write_polygraphy_files(tmp, "image", graph_inputs[take], {k: v[take] for k, v in ref.items()})
            parity = {"format": "stlm-parity", "format_version": 1, "reference": "pytorch STLM.predict (cpu, fp32)",
                      "n_images": len(calib), "image_source": calib.source, "images": calib.paths,
                      **({"tiling": {**tiling.to_preprocessing(), "n_tiles": int(len(calib.images)),
                                     "compared": "stitched maps and top-k scores per image (stlm_deploy.tiling); "
                                                 "inputs.json/outputs.json hold the per-tile graph I/O"}}
                         if tiling is not None else {}),
                      "passed": all(r.passed for r in gate.records),
                      "artifacts": [r.to_dict() for r in gate.records],
                      "graph": graph, "fp16_policy": fp16_policy, "notes": notes,
                      "int8": int8.to_dict() if int8 is not None else None,
                      "gate_images": task.data() if task is not None else None,
                      "precision_gates": precision.to_dict() if precision is not None else None,
                      "warnings": warnings,
                      "polygraphy": {"inputs": "inputs.json", "outputs": "outputs.json", "runner": POLYGRAPHY_RUNNER,
                                     "n_images": n_poly, "command": polygraphy_command()}}
            atomic_write_json(tmp / "parity.json", parity)
            for rel in ("inputs.json", "outputs.json", "parity.json"):
                spec.add_artifact(tmp, rel, "json")
            summary = {"verified": True, "passed": parity["passed"], "n_images": len(calib),
                       "image_source": calib.source, "report": "parity.json",
                       "summary": {r.artifact: {"backend": r.backend, "precision": r.precision,
                                                "max_abs_map": r.max_abs_map, "max_abs_score": r.max_abs_score,
                                                "spearman": r.spearman, "pass": r.passed}
                                   for r in gate.records}}
            if int8 is not None:
                summary["int8_passed"] = int8.passed
                summary["summary"].update({r.artifact: {"backend": r.backend, "precision": "int8", **r.summary()}
                                           for r in int8.records})
            if precision is not None:
                summary["precision_gates"] = {f"openvino/{r.precision}": r.summary() for r in precision.records}
            summary["warnings"] = warnings
        spec.parity = summary
        spec.set_variants(variant_summary(
            gate.records, precision, int8, verified=opts.verify,
            built={"model.fp16.onnx": opts.fp16, "openvino/model.xml": "openvino" in targets}))
        for label, v in spec.variants.items():
            say(f"variant {label}: {'gated' if v.gated else 'not gated'} ({v.why})")
        write_spec(tmp, spec)
    say(f"published {out} ({len(spec.artifacts)} artifacts, {time.perf_counter() - t0:.1f} s)")
    result = ExportResult(engine_dir=out, spec=spec.to_dict(), parity=[r.to_dict() for r in gate.records], graph=graph,
                          fp16_policy=fp16_policy, targets=targets, notes=notes, seconds=time.perf_counter() - t0,
                          int8=int8.to_dict() if int8 is not None else None)
    if int8 is not None and int8.failures:
        msg = ("INT8 gate failed, INT8 artifact(s) not published (the other artifacts were): "
               + " | ".join(r.line() for r in int8.failures))
        if int8_only(opts):
            raise Int8GateError(msg, result)
        say(msg)
    return result
