"""A Triton model repository from a verified engine directory (``stlm-export --target triton``).

For users who run their own Triton (a container, KServe): one model per artifact of the engine,
each serving the raw fused graph (``image`` UINT8 ``[S, S, 3]`` per item -> ``anomaly_map`` FP32
``[S, S]`` and ``score`` FP32):

    REPO/<name>/config.pbtxt + 1/model.onnx                      onnxruntime backend
    REPO/<name>_openvino/config.pbtxt + 1/model.xml, model.bin   openvino backend (when the engine has the IR)
    REPO/<name>_tensorrt/config.pbtxt + 1/model.plan             tensorrt_plan backend, cc_model_filenames
                                                                 from the plan's sidecar (when built)
    REPO/stlm.json                                               the engine description (thresholds, sizes)

Each config has ``max_batch_size`` (the engine's fixed batch, else the TensorRT profile's max batch),
``dynamic_batching``, ``instance_group`` and the engine's thresholds, calibration score range, image
size and resize policy in ``parameters`` (``stlm.*`` keys).

The resize to ``S`` and back and the decision (``score > threshold``, the normalized score) are a
documented CLIENT step, not an ensemble: stock Triton images have no OpenCV in the Python backend.
The client resizes with :func:`stlm_deploy.preprocess.prepare_batch`, maps the anomaly map back with
:func:`stlm_deploy.preprocess.resize_map` and decides with the ``stlm.*`` parameters
(:mod:`stlm_deploy.decision`): :class:`stlm_deploy.serving.client.RemoteDetector` does exactly that when it
finds such a model (``stlm-infer --url`` too); ``stlm-serve`` does all of it on the server instead. A tiled
engine's models carry ``stlm.format_version`` (2) and ``stlm.preprocessing.work_size`` / ``tile_overlap`` /
``tile_blend``: the client step then tiles (:mod:`stlm_deploy.tiling`) and sends the tiles.

Config text is written here without tritonclient (the export extra does not need it); the tests parse
every generated file with Triton's own ``model_config_pb2``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stlm_deploy.files import atomic_directory, atomic_write_text
from stlm_deploy.spec import SPEC_FILENAME, EngineSpec, load_spec

__all__ = ["TritonRepoOptions", "write_triton_repository", "model_config_text", "kserve_manifest"]

_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


@dataclass
class TritonRepoOptions:
    """Knobs of the generated configs (stlm-export flags)."""

    max_batch: int = 8  # dynamic-batch engines: the TensorRT profile's max batch
    max_queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_AUTO"  # instance_group kind: KIND_AUTO (GPU when there is one), KIND_CPU, KIND_GPU


def _q(text: str) -> str:
    return json.dumps(str(text))  # a protobuf text-format string literal (JSON escaping is a subset)


def _dims(shape: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _parameters(spec: EngineSpec, artifact: str, precision: str | None) -> dict[str, str]:
    params = {"stlm.name": spec.name, "stlm.model_family": spec.model_family, "stlm.img_size": str(spec.img_size),
              "stlm.resize": spec.preprocessing.resize, "stlm.top_k": str(spec.top_k),
              **spec.thresholds.to_parameters(),
              "stlm.input.fused_preprocessing": json.dumps(spec.input.fused_preprocessing),
              "stlm.artifact": artifact, "stlm.precision": precision or "default",
              "stlm.source.sha256": spec.source.sha256}
    if not spec.input.fused_preprocessing:
        params["stlm.preprocessing.mean"] = json.dumps(spec.preprocessing.mean)
        params["stlm.preprocessing.std"] = json.dumps(spec.preprocessing.std)
    if spec.tiling is not None:  # the client step tiles (stlm_deploy.serving.client); format_version says it must
        params["stlm.format_version"] = str(spec.format_version)
        params.update({f"stlm.preprocessing.{k}": str(v) for k, v in spec.tiling.to_preprocessing().items()})
    return params


def model_config_text(spec: EngineSpec, model_name: str, backend: str, opts: TritonRepoOptions,
                      artifact: str, precision: str | None = None, extra: str = "") -> str:
    """config.pbtxt for one backend serving the raw graph of ``spec`` (batch dimension left to Triton)."""
    fixed = spec.fixed_batch
    max_batch = fixed if fixed else int(opts.max_batch)
    inp = spec.input
    lines = [f"name: {_q(model_name)}", f"backend: {_q(backend)}", f"max_batch_size: {max_batch}",
             "input [", "  {", f"    name: {_q(inp.name)}", f"    data_type: {_TYPES[inp.dtype]}",
             f"    dims: {_dims(inp.shape[1:])}"]
    if inp.layout == "NCHW":
        lines.append("    format: FORMAT_NCHW")
    lines += ["  }", "]", "output ["]
    outs = []
    for o in spec.outputs:
        body = [f"    name: {_q(o.name)}", f"    data_type: {_TYPES.get(o.dtype, 'TYPE_FP32')}"]
        if len(o.shape) == 1:  # per-item scalar ([N] in the graph): Triton needs dims [1] reshaped to []
            body += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        else:
            body.append(f"    dims: {_dims(o.shape[1:])}")
        outs.append("  {\n" + "\n".join(body) + "\n  }")
    lines += [",\n".join(outs), "]"]
    if not fixed or fixed > 1:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {int(opts.max_queue_delay_us)}", "}"]
    kind = "KIND_GPU" if backend == "tensorrt" else opts.kind
    lines += ["instance_group [", "  {", f"    count: {int(opts.instances)}", f"    kind: {kind}", "  }", "]"]
    for key, value in _parameters(spec, artifact, precision).items():
        lines.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _cc_filenames(engine_dir: Path, plan: str) -> str:
    """``cc_model_filenames`` for the plan: the compute capability its sidecar recorded."""
    sidecar = engine_dir / (plan + ".json")
    try:
        cc = json.loads(sidecar.read_text(encoding="utf-8")).get("compute_capability")
    except (OSError, ValueError):
        cc = None
    if not cc:
        return ""
    return f"cc_model_filenames {{ key: {_q(cc)} value: \"model.plan\" }}"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def write_triton_repository(engine: str | os.PathLike, repo: str | os.PathLike,
                            opts: TritonRepoOptions | None = None, name: str | None = None) -> dict[str, Any]:
    """Write ``repo`` (replaced atomically) from the engine directory ``engine``; return what was written."""
    opts = opts or TritonRepoOptions()
    engine_dir = Path(engine)
    spec = load_spec(engine_dir)
    name = name or spec.name
    written: dict[str, Any] = {"repository": str(repo), "models": {}}
    with atomic_directory(Path(repo)) as tmp:
        onnx = spec.find_artifacts("onnx", "fp32") or spec.find_artifacts("onnx")
        if not onnx:
            raise ValueError(f"{engine_dir}: no ONNX artifact listed in {SPEC_FILENAME}")
        _copy(engine_dir / onnx[0], tmp / name / "1" / "model.onnx")
        atomic_write_text(tmp / name / "config.pbtxt",
                          model_config_text(spec, name, "onnxruntime", opts, onnx[0],
                                            spec.artifacts[onnx[0]].precision,
                                            extra='default_model_filename: "model.onnx"'))
        written["models"][name] = {"backend": "onnxruntime", "artifact": onnx[0]}
        xml = [a for a in spec.find_artifacts("openvino") if a.endswith(".xml")]
        if xml:
            ov = f"{name}_openvino"
            _copy(engine_dir / xml[0], tmp / ov / "1" / "model.xml")
            _copy(engine_dir / (xml[0][: -len(".xml")] + ".bin"), tmp / ov / "1" / "model.bin")
            atomic_write_text(tmp / ov / "config.pbtxt",
                              model_config_text(spec, ov, "openvino", opts, xml[0], spec.artifacts[xml[0]].precision,
                                                extra='default_model_filename: "model.xml"'))
            written["models"][ov] = {"backend": "openvino", "artifact": xml[0]}
        plans = spec.find_artifacts("tensorrt")
        if plans:
            trt = f"{name}_tensorrt"
            _copy(engine_dir / plans[0], tmp / trt / "1" / "model.plan")
            extra = "\n".join(x for x in ('default_model_filename: "model.plan"',
                                          _cc_filenames(engine_dir, plans[0])) if x)
            atomic_write_text(tmp / trt / "config.pbtxt",
                              model_config_text(spec, trt, "tensorrt", opts, plans[0],
                                                spec.artifacts[plans[0]].precision, extra=extra))
            written["models"][trt] = {"backend": "tensorrt_plan", "artifact": plans[0]}
        _copy(engine_dir / SPEC_FILENAME, tmp / SPEC_FILENAME)
    return written


def kserve_manifest(name: str, storage_uri: str, model: str | None = None, *, gpus: int = 0,
                    runtime_version: str = "24.08-py3", min_replicas: int = 1, max_replicas: int = 4) -> dict[str, Any]:
    """A KServe ``InferenceService`` (serving.kserve.io/v1beta1) running the repository on Triton.

    ``storage_uri``: where the repository lives for the cluster (``s3://``, ``gs://``, ``pvc://``).
    """
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    predictor: dict[str, Any] = {
        "minReplicas": int(min_replicas), "maxReplicas": int(max_replicas),
        "model": {"modelFormat": {"name": "triton"}, "runtime": "kserve-tritonserver",
                  "runtimeVersion": runtime_version, "storageUri": storage_uri,
                  "resources": resources}}
    if model:  # load only this model of the repository (the others stay on disk)
        predictor["model"]["args"] = ["--model-control-mode=explicit", f"--load-model={model}"]
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name.lower().replace("_", "-"),
                         "annotations": {"serving.kserve.io/deploymentMode": "Serverless"}},
            "spec": {"predictor": predictor}}
