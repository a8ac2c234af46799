"""``stlm-export --target triton``: every generated config.pbtxt parsed with Triton's own model-config protobuf
(shipped in tritonclient), so a typo fails here and not in a deployment; the KServe manifest checked with
the kserve SDK's model classes when that package is installed, else against the InferenceService schema rules."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stlm_deploy.spec import load_spec, write_spec
from stlm_export.triton_repo import TritonRepoOptions, kserve_manifest, write_triton_repository
from tests.contract_engine import make_engine

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (serve extra)")
from google.protobuf import text_format  # noqa: E402


def parse(path: Path):
    """config.pbtxt -> inference.ModelConfig (raises on any unknown field or bad value)."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    d = make_engine(tmp_path / "engines", "bottle", openvino_ir=True, with_tlm=True, image_threshold=0.52,
                    pixel_threshold=0.6, score_range=(0.31, 0.77))
    # a TensorRT plan cannot be built here: a stand-in file + sidecar exercises the tensorrt_plan entry
    (d / "model.plan").write_bytes(b"plan bytes")
    (d / "model.plan.json").write_text(json.dumps({"compute_capability": "9.0", "tensorrt_version": "10.9"}))
    spec = load_spec(d)
    spec.add_artifact(d, "model.plan", "tensorrt", "fp16")
    spec.add_artifact(d, "model.plan.json", "json")
    write_spec(d, spec)
    return d


def test_repository_configs_parse_with_tritons_protobuf(engine: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    written = write_triton_repository(engine, repo, TritonRepoOptions(max_batch=16, max_queue_delay_us=500,
                                                                      instances=2))
    assert set(written["models"]) == {"bottle", "bottle_openvino", "bottle_tensorrt"}
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert files == {"stlm.json", "bottle/config.pbtxt", "bottle/1/model.onnx", "bottle_openvino/config.pbtxt",
                     "bottle_openvino/1/model.xml", "bottle_openvino/1/model.bin", "bottle_tensorrt/config.pbtxt",
                     "bottle_tensorrt/1/model.plan"}
    assert (repo / "bottle/1/model.onnx").read_bytes() == (engine / "model.onnx").read_bytes()
    backends = {}
    for model in written["models"]:
        cfg = parse(repo / model / "config.pbtxt")
        backends[model] = cfg.backend
        assert cfg.name == model and cfg.max_batch_size == 16
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        [inp] = cfg.input
        assert inp.name == "image" and inp.data_type == mc.TYPE_UINT8 and list(inp.dims) == [64, 64, 3]
        outs = {o.name: o for o in cfg.output}
        assert set(outs) == {"anomaly_map", "score", "tlm_map"}
        assert list(outs["anomaly_map"].dims) == [64, 64] and outs["anomaly_map"].data_type == mc.TYPE_FP32
        assert list(outs["score"].dims) == [1] and list(outs["score"].reshape.shape) == []
        [group] = cfg.instance_group
        assert group.count == 2
        assert group.kind == (mc.ModelInstanceGroup.KIND_GPU if model.endswith("tensorrt")
                              else mc.ModelInstanceGroup.KIND_AUTO)
        p = params(cfg)
        assert json.loads(p["stlm.thresholds.image"]) == 0.52 and json.loads(p["stlm.thresholds.pixel"]) == 0.6
        assert json.loads(p["stlm.thresholds.score_min"]) == 0.31 and json.loads(p["stlm.thresholds.score_max"]) == 0.77
        assert p["stlm.img_size"] == "64" and p["stlm.resize"] == load_spec(engine).preprocessing.resize
    assert backends == {"bottle": "onnxruntime", "bottle_openvino": "openvino", "bottle_tensorrt": "tensorrt"}
    trt = parse(repo / "bottle_tensorrt" / "config.pbtxt")
    assert dict(trt.cc_model_filenames) == {"9.0": "model.plan"} and trt.default_model_filename == "model.plan"


def test_fixed_batch_and_unfused_engines(tmp_path: Path) -> None:
    fixed = make_engine(tmp_path / "e", "fixed", batch=1)
    cfg = parse(write_and_get(fixed, tmp_path / "r1", "fixed"))
    assert cfg.max_batch_size == 1 and not cfg.HasField("dynamic_batching")  # a batch of 1 is all it can run
    unfused = make_engine(tmp_path / "e", "unfused", fused=False)
    cfg = parse(write_and_get(unfused, tmp_path / "r2", "unfused"))
    [inp] = cfg.input
    assert inp.data_type == mc.TYPE_FP32 and list(inp.dims) == [3, 64, 64] and inp.format == mc.ModelInput.FORMAT_NCHW
    mean = json.loads(params(cfg)["stlm.preprocessing.mean"])
    assert np.allclose(mean, load_spec(unfused).preprocessing.mean)


def write_and_get(engine: Path, repo: Path, name: str) -> Path:
    write_triton_repository(engine, repo)
    return repo / name / "config.pbtxt"


def test_a_typo_would_fail_the_parse(engine: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: Triton's protobuf refuses a misspelt field."""
    cfg = write_and_get(engine, tmp_path / "repo", "bottle")
    cfg.write_text(cfg.read_text().replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        parse(cfg)


def test_kserve_manifest(tmp_path: Path) -> None:
    doc = kserve_manifest("bottle_v2", "s3://models/bottle", model="bottle", gpus=1)
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "bottle-v2"  # a DNS-1035 label
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["storageUri"] == "s3://models/bottle"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--load-model=bottle" in model["args"]
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve SDK not installed: schema rules checked above only")
    # kserve's gRPC protobufs clash with tritonclient's in one process (duplicate 'inference.*' symbols): a
    # subprocess builds the SDK object from the manifest's values; it must serialise back to exactly the
    # manifest, so a misspelt or misplaced key (unknown to the SDK's attribute maps) fails the round trip
    doc_file = tmp_path / "isvc.json"
    doc_file.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-c", KSERVE_ROUND_TRIP, str(doc_file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == doc


KSERVE_ROUND_TRIP = """
import json, sys
import kserve
from kubernetes import client as k8s
doc = json.load(open(sys.argv[1]))
p = doc["spec"]["predictor"]; m = p["model"]
isvc = kserve.V1beta1InferenceService(
    api_version=doc["apiVersion"], kind=doc["kind"],
    metadata=k8s.V1ObjectMeta(name=doc["metadata"]["name"], annotations=doc["metadata"]["annotations"]),
    spec=kserve.V1beta1InferenceServiceSpec(predictor=kserve.V1beta1PredictorSpec(
        min_replicas=p["minReplicas"], max_replicas=p["maxReplicas"],
        model=kserve.V1beta1ModelSpec(
            model_format=kserve.V1beta1ModelFormat(name=m["modelFormat"]["name"]), runtime=m["runtime"],
            runtime_version=m["runtimeVersion"], storage_uri=m["storageUri"], args=m["args"],
            resources=k8s.V1ResourceRequirements(requests=m["resources"]["requests"], limits=m["resources"]["limits"])))))
back = kserve.ApiClient().sanitize_for_serialization(isvc)
back["spec"]["predictor"]["model"].pop("name", None)  # the SDK's required container name, "" by default
print(json.dumps(back))
"""


def test_export_cli_target_triton(small_ckpt, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stlm_export.cli import main

    repo, eng = tmp_path / "repo", tmp_path / "engine"
    r = CliRunner().invoke(main, ["--ckpt", str(small_ckpt), "--target", "triton", "--out", str(repo), "--engine-out",
                                  str(eng), "--no-verify", "--no-simplify", "--name", "demo", "--max-batch", "4",
                                  "--storage-uri", "gs://bucket/demo"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(repo) and (eng / "stlm.json").is_file()
    assert parse(repo / "demo" / "config.pbtxt").max_batch_size == 4
    assert parse(repo / "demo_openvino" / "config.pbtxt").backend == "openvino"
    manifest = json.loads((repo / "inferenceservice.json").read_text())
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/demo"
