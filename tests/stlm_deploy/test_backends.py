"""ONNX Runtime and OpenVINO backends on a real tiny graph, plus their install/precision guards."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stlm_deploy.backends import available_backends, backend_class, create_backend
from stlm_deploy.backends.base import default_threads
from stlm_deploy.backends.openvino import OpenVinoBackend, choose_inference_precision
from stlm_deploy.backends.ort import OrtBackend, check_ort_installation, find_ort_conflict, resolve_providers
from stlm_deploy.errors import BackendUnavailable, DeployError

from .conftest import IMG, TOP_K, sample_image


def _batch(n: int = 3) -> np.ndarray:
    return np.stack([sample_image(IMG, IMG, seed) for seed in range(n)])


def _expected(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = batch.astype(np.float32).mean(axis=3) / 255.0
    return m, np.sort(m.reshape(len(m), -1), axis=1)[:, -TOP_K:].mean(axis=1)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# ------------------------------------------------------------------------------------------------ ORT
def test_ort_backend_runs_contract_graph(engines):
    x = _batch()
    with OrtBackend(engines["plain"] / "model.onnx", threads=2) as be:
        assert be.is_active and be.name == "ort"
        assert (be.input_name, be.input_dtype, be.input_shape) == ("image", np.uint8, [-1, IMG, IMG, 3])
        assert be.output_names == ["anomaly_map", "score"] and be.max_batch is None
        assert be.providers_used == ["CPUExecutionProvider"] and be.device == "cpu" and be.precision == "fp32"
        out = be.infer({"image": x})
        m, s = _expected(x)
        np.testing.assert_allclose(out["anomaly_map"], m, atol=1e-6)
        np.testing.assert_allclose(out["score"], s, atol=1e-6)
        assert be.info()["threads"] == 2
    assert not be.is_active
    with pytest.raises(DeployError, match="call activate()"):
        be.infer({"image": x})


def test_ort_rejects_wrong_feed(engines):
    with OrtBackend(engines["plain"] / "model.onnx") as be:
        with pytest.raises(DeployError, match=r"input 'image' must be uint8, got float32"):
            be.infer({"image": _batch().astype(np.float32)})
        with pytest.raises(DeployError, match=r"feed must contain input 'image', got \['x'\]"):
            be.infer({"x": _batch()})
        with pytest.raises(DeployError, match=r"onnxruntime inference failed on input uint8 \(1, 32, 32, 3\)"):
            be.infer({"image": np.zeros((1, 32, 32, 3), np.uint8)})


@pytest.mark.parametrize("provider, full", [("cuda", "CUDAExecutionProvider"),
                                            ("tensorrt", "TensorrtExecutionProvider")])
def test_ort_gpu_provider_fallback_is_an_error(engines, provider, full):
    if _ort_has_cuda():
        pytest.skip("this onnxruntime has GPU providers; the CPU-fallback case cannot be provoked")
    be = OrtBackend(engines["plain"] / "model.onnx", providers=[provider])
    with pytest.raises(BackendUnavailable) as ei:
        be.activate()
    msg = str(ei.value)
    assert f"requested {full} but the session fell back to CPU" in msg and "\n" not in msg
    assert "session providers: CPUExecutionProvider" in msg and not be.is_active


def test_resolve_providers():
    assert resolve_providers(["cuda"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cpu,tensorrt cuda") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                      "CPUExecutionProvider"]
    with pytest.raises(DeployError, match="unknown execution provider 'gpu'"):
        resolve_providers(["gpu"])


def test_ort_conflict_detector_is_pure():
    assert find_ort_conflict(["numpy", "onnxruntime", "opencv-python"]) is None
    assert find_ort_conflict(["onnxruntime-gpu"]) is None
    assert find_ort_conflict([]) is None
    msg = find_ort_conflict(["numpy", "onnxruntime", "onnxruntime_gpu"])
    assert msg is not None and "\n" not in msg
    assert msg.startswith("onnxruntime and onnxruntime-gpu are installed together")
    assert "shadow each other" in msg and "pip uninstall -y onnxruntime onnxruntime-gpu" in msg
    three = find_ort_conflict(["ONNXRuntime", "onnxruntime-gpu", "onnxruntime-directml"])
    assert three is not None and three.startswith("onnxruntime, onnxruntime-directml and onnxruntime-gpu")
    with pytest.raises(DeployError, match="^onnxruntime: onnxruntime and onnxruntime-gpu are installed together"):
        check_ort_installation(["onnxruntime", "onnxruntime-gpu"])
    check_ort_installation(["onnxruntime"])
    check_ort_installation()  # this environment is clean


def test_ort_optimized_model_cache(engines, tmp_path):
    cache = tmp_path / "cache" / "model.opt.onnx"
    x = _batch(2)
    with OrtBackend(engines["plain"] / "model.onnx", optimized_model_path=cache) as be:
        first = be.infer({"image": x})
        assert not be.loaded_from_cache
    assert cache.is_file() and cache.with_name(cache.name + ".json").is_file()
    with OrtBackend(engines["plain"] / "model.onnx", optimized_model_path=cache) as be:
        assert be.loaded_from_cache
        second = be.infer({"image": x})
    np.testing.assert_array_equal(first["score"], second["score"])
    with OrtBackend(engines["fused"] / "model.onnx", optimized_model_path=cache) as be:  # other model: rebuilt
        assert not be.loaded_from_cache


def test_ort_unloadable_model_is_one_line(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(DeployError) as ei:
        OrtBackend(bad).activate()
    assert "onnxruntime cannot load the model" in str(ei.value) and "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------ OpenVINO
@pytest.mark.parametrize("artifact", ["openvino/model.xml", "model.onnx"])
def test_openvino_backend_fp32(engines, artifact):
    x = _batch()
    with OpenVinoBackend(engines["fused"] / artifact, precision="f32", threads=2) as be:
        assert be.precision == "fp32" and be.inference_precision == "fp32"
        assert (be.input_name, be.input_dtype, be.input_shape) == ("image", np.uint8, [-1, IMG, IMG, 3])
        assert be.output_names == ["anomaly_map", "score", "tlm_map"]
        out = be.infer({"image": x})
    m, s = _expected(x)
    np.testing.assert_allclose(out["anomaly_map"], m, atol=1e-6)
    np.testing.assert_allclose(out["score"], s, atol=1e-6)
    np.testing.assert_allclose(out["tlm_map"], 1 - m, atol=1e-6)


def test_openvino_reports_precision_actually_used(engines):
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with OpenVinoBackend(engines["plain"] / "model.onnx", precision="bf16") as be:
        if "BF16" in caps:
            assert be.precision == "bf16" and not be.notes
        else:
            assert be.precision == "fp32" and "no BF16 support" in be.notes[0]
    with OpenVinoBackend(engines["plain"] / "model.onnx") as be:  # device default, whatever it is, is reported
        assert be.precision in ("fp32", "bf16", "fp16")
        assert be.info()["requested_precision"] is None


def test_choose_inference_precision_is_pure():
    assert choose_inference_precision(None, ["FP32"]) == (None, None)
    assert choose_inference_precision("fp32", ["BF16"]) == ("f32", None)
    assert choose_inference_precision("bf16", ["FP32", "BF16"]) == ("bf16", None)
    hint, note = choose_inference_precision("bf16", ["FP32", "INT8"])
    assert hint == "f32" and note == ("bf16 requested but OpenVINO CPU reports no BF16 support "
                                      "(OPTIMIZATION_CAPABILITIES: FP32, INT8); using f32")
    assert choose_inference_precision("f16", ["FP16"]) == ("f16", None)
    assert choose_inference_precision("fp16", ["BF16"])[0] == "f32"
    assert choose_inference_precision("int8", ["INT8"]) == (None, None)


def test_openvino_requests_come_from_a_bounded_pool(engines):
    x = _batch(2)
    with OpenVinoBackend(engines["plain"] / "model.onnx", precision="f32", max_requests=3) as be:
        ref = be.infer({"image": x})["score"]
        barrier = threading.Barrier(8)

        def work(_: int) -> np.ndarray:
            barrier.wait()
            return be.infer({"image": x})["score"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
        # 8 concurrent threads (+ the main one) share at most 3 requests; one thread at a time per request
        assert be.max_requests == 3 and 1 <= be.requests_created <= 3
        assert be.info()["requests_created"] == be.requests_created
    with pytest.raises(DeployError, match="max_requests must be >= 1"):
        OpenVinoBackend(engines["plain"] / "model.onnx", max_requests=0)
    for r in results:
        np.testing.assert_array_equal(r, ref)


# ------------------------------------------------------------------------------------------ registry
def test_registry_and_available_backends(engines):
    avail = available_backends()
    assert "ort" in avail and "CPUExecutionProvider" in avail["ort"] and "openvino" in avail
    assert backend_class("ort") is OrtBackend and backend_class("openvino") is OpenVinoBackend
    be = create_backend("ort", engines["plain"] / "model.onnx", threads=1)
    assert not be.is_active and be.threads == 1
    with pytest.raises(DeployError, match="backend: expected one of auto, tensorrt, ort, openvino, got 'onnx'"):
        backend_class("onnx")
    assert default_threads() >= 1


def test_openvino_compiles_a_dynamic_batch_ir_for_batch_1_too(engines):
    """Issue 24: single images run on a batch-1 compilation of a dynamic IR (no dynamic-shape execution), other
    batch sizes on the IR as exported, compiled on first use; same numbers, the reported shape stays dynamic."""
    path = engines["plain"] / "model.onnx"
    with OpenVinoBackend(path, precision="f32") as be, OpenVinoBackend(path, precision="f32", static_batch1=False) as ref:
        assert be.input_shape[0] == -1 and be.fixed_batch is None and be.compiled_shapes == ["batch 1"]
        one, three = _batch(1), _batch(3)
        a, b = be.infer({"image": one}), ref.infer({"image": one})
        assert be.compiled_shapes == ["batch 1"] and ref.compiled_shapes == ["as exported"]
        assert np.abs(a["anomaly_map"] - b["anomaly_map"]).max() <= 1e-6 and a["score"].shape == (1,)
        c = be.infer({"image": three})
        assert be.compiled_shapes == ["batch 1", "as exported"] and c["anomaly_map"].shape[0] == 3
        assert np.abs(c["anomaly_map"] - ref.infer({"image": three})["anomaly_map"]).max() <= 1e-6
        assert be.info()["compiled_shapes"] == ["batch 1", "as exported"] and be.requests_created == 2
    with OpenVinoBackend(engines["fixed"] / "model.onnx", precision="f32") as fixed:  # nothing to specialise
        assert fixed.compiled_shapes == ["as exported"] and fixed.fixed_batch == 2
