"""TensorRT backend: the pure compatibility check, the missing-extra error, the buffer/graph plumbing
against an in-memory fake of tensorrt + cuda-python, and (marked, skipped here) a real GPU run."""
from __future__ import annotations

import ctypes
import enum
import json
import logging
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from stlm_deploy import Detector
from stlm_deploy.backends import module_importable
from stlm_deploy.backends.tensorrt import (TRT_EXTRA_MESSAGE, PlanMismatch, TensorRTBackend,
                                           check_plan_compatibility, check_plan_source, parse_version)
from stlm_deploy.errors import BackendUnavailable, DeployError
from stlm_deploy.files import sha256_file
from stlm_deploy.spec import load_spec, write_spec

from .conftest import IMG, TOP_K, reference, sample_image

SIDE = {"tensorrt_version": "10.3.0.26", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
        "precision": "fp16", "profiles": [{"image": {"min": [1, 64, 64, 3], "opt": [2, 64, 64, 3],
                                                     "max": [4, 64, 64, 3]}}]}


# --------------------------------------------------------------------------------------- pure checks
def _mismatch(side: dict, *args: str) -> str:
    with pytest.raises(PlanMismatch) as ei:
        check_plan_compatibility(side, *args, where="engines/x/model.plan")
    assert "\n" not in str(ei.value) and str(ei.value).startswith("engines/x/model.plan")
    return str(ei.value)


def test_plan_compatible_cases(caplog):
    check_plan_compatibility(SIDE, "10.3.0.26", "NVIDIA L4", "8.9")
    check_plan_compatibility(SIDE, "10.3.0.30", "NVIDIA L4", "8.9")  # build number does not matter
    with caplog.at_level(logging.WARNING, logger="stlm_deploy"):
        check_plan_compatibility(SIDE, "10.3.0", "NVIDIA GeForce RTX 4090", "8.9")  # same arch, other model
    assert "built on NVIDIA L4, running on NVIDIA GeForce RTX 4090" in caplog.text
    vc = dict(SIDE, version_compatible=True)
    check_plan_compatibility(vc, "10.8.0.43", "NVIDIA L4", "8.9")
    check_plan_compatibility(dict(SIDE, flags=["FP16", "VERSION_COMPATIBLE"]), "10.9.0", "NVIDIA L4", "8.9")
    check_plan_compatibility(dict(SIDE, hardware_compatibility_level="AMPERE_PLUS"), "10.3.0", "NVIDIA A100", "8.0")


def test_plan_version_mismatch_messages():
    msg = _mismatch(SIDE, "10.8.0.43", "NVIDIA L4", "8.9")
    assert msg == ("engines/x/model.plan: built with TensorRT 10.3.0 but TensorRT 10.8.0 is installed; plans load "
                   "only on the TensorRT version that built them: rebuild the plan on this machine (stlm-export "
                   "--target tensorrt) or use backend 'ort' or install tensorrt==10.3.0")
    vc = dict(SIDE, version_compatible=True)
    assert "needs TensorRT 10.x >= 10.3.0, but 11.0.0 is installed" in _mismatch(vc, "11.0.0", "NVIDIA L4", "8.9")
    assert "but 10.2.1 is installed" in _mismatch(vc, "10.2.1", "NVIDIA L4", "8.9")


def test_plan_gpu_mismatch_messages():
    msg = _mismatch(SIDE, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
    assert ("built for NVIDIA L4 (compute capability 8.9) but this GPU is NVIDIA A100-SXM4-80GB (8.0); a plan runs "
            "only on the compute capability it was built for") in msg
    amp = dict(SIDE, hardware_compatibility_level="AMPERE_PLUS")
    assert "Ampere or newer GPUs" in _mismatch(amp, "10.3.0", "Tesla T4", "7.5")


def test_plan_sidecar_problems():
    assert "model.plan.json: field 'tensorrt_version' is missing" in _mismatch({"compute_capability": "8.9"},
                                                                             "10.3.0", "g", "8.9")
    assert "compute capability must look like '8.9'" in _mismatch(dict(SIDE, compute_capability="sm_89"),
                                                                 "10.3.0", "g", "8.9")
    assert "must be a JSON object" in _mismatch([], "10.3.0", "g", "8.9")  # type: ignore[arg-type]
    assert parse_version("10.8.0.post1") == (10, 8, 0)


def test_stale_plan_detection():
    check_plan_source({"onnx_sha256": "a" * 64}, ["a" * 64, "b" * 64])
    check_plan_source({}, ["a" * 64])
    with pytest.raises(DeployError, match=r"built from an ONNX model \(sha256 cccccccccccc\.\.\.\) .* stale"):
        check_plan_source({"onnx_sha256": "c" * 64}, ["a" * 64], where="model.plan")


# ---------------------------------------------------------------------------------- engine with plan
def _add_plan(eng: Path, plan: bytes, **side) -> Path:
    (eng / "model.plan").write_bytes(plan)
    sidecar = dict(SIDE, precision="fp32", onnx_sha256=sha256_file(eng / "model.onnx"), **side)
    (eng / "model.plan.json").write_text(json.dumps(sidecar))
    spec = load_spec(eng)
    spec.add_artifact(eng, "model.plan", "tensorrt", "fp32")
    spec.add_artifact(eng, "model.plan.json", "json", None)
    write_spec(eng, spec)
    return eng


@pytest.mark.skipif(module_importable("tensorrt"), reason="tensorrt is installed")
def test_missing_tensorrt_extra_is_one_clear_line(engine_copy):
    eng = _add_plan(engine_copy("plain"), b"plan")
    with pytest.raises(BackendUnavailable) as ei:
        TensorRTBackend(eng / "model.plan").activate()
    assert str(ei.value) == TRT_EXTRA_MESSAGE == (
        "TensorRT backend needs the 'trt' extra: pip install 'stlm-deploy[trt]' (tensorrt, cuda-python) and an "
        "NVIDIA GPU")
    with pytest.raises(DeployError, match=r"needs the 'trt' extra"):
        Detector.load(eng, backend="tensorrt")
    with pytest.raises(DeployError, match=r"needs the 'trt' extra"):
        Detector.load(eng / "model.plan")  # the file selects the backend
    det = Detector.load(eng)  # auto skips TensorRT and says why
    assert det.backend_name != "tensorrt" and any("tensorrt" in n for n in det.selection_notes)


# ------------------------------------------------------------------------ fake tensorrt + cuda-python
class _Cuda:
    """Just enough of cuda.bindings.runtime: 'device' memory is host memory, streams run eagerly."""

    def __init__(self) -> None:
        self.mem: dict[int, ctypes.Array] = {}
        self.capturing: list | None = None
        self.launches = 0
        self.device_count = 1
        self.current = threading.local()  # CUDA's current device is per thread; a new thread starts on 0
        self.devices_used: list[int] = []  # the calling thread's current device at each work call

    def on(self) -> int:
        dev = getattr(self.current, "device", 0)
        self.devices_used.append(dev)
        return dev

    def module(self) -> types.ModuleType:
        m = types.ModuleType("cuda.bindings.runtime")
        m.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1}, start=0)
        m.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
        m.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})
        ok = m.cudaError_t.cudaSuccess

        def alloc(n: int) -> tuple:
            self.on()
            buf = (ctypes.c_uint8 * n)()
            self.mem[ctypes.addressof(buf)] = buf
            return ok, ctypes.addressof(buf)

        def free(p: int) -> tuple:
            self.mem.pop(p)
            return (ok,)

        def memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> tuple:
            self.on()
            op = lambda: ctypes.memmove(dst, src, n)  # noqa: E731
            self.capturing.append(op) if self.capturing is not None else op()
            return (ok,)

        def end_capture(stream: int) -> tuple:
            graph, self.capturing = list(self.capturing or []), None
            return ok, graph

        def launch(graph: list, stream: int) -> tuple:
            self.launches += 1
            for op in graph:
                op()
            return (ok,)

        m.cudaGetDeviceCount = lambda: (ok, self.device_count)
        m.cudaSetDevice = lambda i: (setattr(self.current, "device", i), (ok,))[1]
        m.cudaGetDeviceProperties = lambda i: (ok, types.SimpleNamespace(name=b"NVIDIA L4\0\0\0", major=8, minor=9))
        m.cudaMalloc = m.cudaMallocHost = alloc
        m.cudaFree = m.cudaFreeHost = free
        m.cudaStreamCreate = lambda: (ok, 7)
        m.cudaStreamDestroy = lambda s: (ok,)
        m.cudaStreamSynchronize = lambda s: (self.on(), (ok,))[1]
        m.cudaMemcpyAsync = memcpy
        m.cudaStreamBeginCapture = lambda s, mode: (setattr(self, "capturing", []), (ok,))[1]
        m.cudaStreamEndCapture = end_capture
        m.cudaGraphInstantiate = lambda g, flags: (ok, g)
        m.cudaGraphLaunch = launch
        m.cudaGraphDestroy = m.cudaGraphExecDestroy = lambda g: (ok,)
        return m


def _fake_trt(cuda: _Cuda) -> types.ModuleType:
    """Engine semantics = the fixture graph (map = mean_c / 255, score = top-k mean), profile batch 1..4."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "UINT8 FLOAT")
    trt.nptype = lambda dt: {trt.DataType.UINT8: np.uint8, trt.DataType.FLOAT: np.float32}[dt]
    names = ["image", "anomaly_map", "score"]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Context:
        def __init__(self) -> None:
            self.n = -1
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.n = shape[0]
            return 1 <= shape[0] <= 4 and tuple(shape[1:]) == (IMG, IMG, 3)

        def get_tensor_shape(self, name: str) -> tuple:
            return {"image": (self.n, IMG, IMG, 3), "anomaly_map": (self.n, IMG, IMG), "score": (self.n,)}[name]

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def _view(self, name: str, dtype: type) -> np.ndarray:
            shape = self.get_tensor_shape(name)
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = (ctypes.c_uint8 * n).from_address(self.addr[name])
            return np.frombuffer(raw, np.uint8).view(dtype).reshape(shape)

        def execute_async_v3(self, stream: int) -> bool:
            cuda.on()

            def run() -> None:
                x = self._view("image", np.uint8)
                m = x.astype(np.float32).mean(axis=3) / 255.0
                self._view("anomaly_map", np.float32)[...] = m
                self._view("score", np.float32)[...] = np.sort(m.reshape(self.n, -1), axis=1)[:, -TOP_K:].mean(1)
            cuda.capturing.append(run) if cuda.capturing is not None else run()
            return True

    class Engine:
        num_io_tensors = 3

        def get_tensor_name(self, i: int) -> str:
            return names[i]

        def get_tensor_mode(self, name: str):
            return trt.TensorIOMode.INPUT if name == "image" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str):
            return trt.DataType.UINT8 if name == "image" else trt.DataType.FLOAT

        def get_tensor_shape(self, name: str) -> tuple:
            return {"image": (-1, IMG, IMG, 3), "anomaly_map": (-1, IMG, IMG), "score": (-1,)}[name]

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            return [(1, IMG, IMG, 3), (2, IMG, IMG, 3), (4, IMG, IMG, 3)]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return Engine() if data == b"FAKEPLAN" else None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch) -> _Cuda:
    """Fake TensorRT + CUDA handed to the backend through its lazy loaders (sys.modules is left alone)."""
    import stlm_deploy.backends.tensorrt as trt_backend
    import stlm_deploy.selection as selection

    cuda = _Cuda()
    trt, rt = _fake_trt(cuda), cuda.module()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: rt)
    monkeypatch.setattr(selection, "tensorrt_available", lambda: True)
    return cuda


def test_fake_tensorrt_backend_plumbing_and_cuda_graphs(engine_copy, fake_gpu):
    eng = _add_plan(engine_copy("plain"), b"FAKEPLAN")
    x3 = np.stack([sample_image(IMG, IMG, s) for s in range(3)])
    m3 = x3.astype(np.float32).mean(axis=3) / 255.0
    with TensorRTBackend(eng / "model.plan", cuda_graph=True, onnx_sha256s=[sha256_file(eng / "model.onnx")]) as be:
        assert (be.input_name, be.input_dtype, be.max_batch) == ("image", np.uint8, 4)
        assert be.input_shape == [-1, IMG, IMG, 3]
        assert be.output_names == ["anomaly_map", "score"] and be.precision == "fp32" and be.device == "cuda:0"
        assert be.gpu_name == "NVIDIA L4" and be.compute_capability == "8.9"
        outs = [be.infer({"image": x3}) for _ in range(3)]  # warm-up, capture + launch, launch
        assert be.graph_launches == 2 and fake_gpu.launches == 2
        for o in outs:
            np.testing.assert_allclose(o["anomaly_map"], m3, atol=1e-6)
        x3b = x3[::-1].copy()  # same shape, new data: the replayed graph must read the new input
        np.testing.assert_allclose(be.infer({"image": x3b})["anomaly_map"], m3[::-1], atol=1e-6)
        x4 = np.concatenate([x3, x3[:1]])  # new shape: buffers grow, graph dropped, plain run first
        np.testing.assert_allclose(be.infer({"image": x4})["score"], be.infer({"image": x4})["score"])
        with pytest.raises(DeployError, match=r"batch 5 exceeds the plan's maximum 4"):
            be.infer({"image": np.zeros((5, IMG, IMG, 3), np.uint8)})
    assert not fake_gpu.mem  # every cudaMalloc/cudaMallocHost was freed


def test_fake_tensorrt_through_detector(engine_copy, fake_gpu):
    eng = _add_plan(engine_copy("plain"), b"FAKEPLAN")
    imgs = [sample_image(50 + 10 * i, 70, i) for i in range(6)]
    det = Detector.load(eng)  # auto prefers TensorRT when it can run
    assert det.backend_name == "tensorrt" and det.selected_by == "auto"
    assert det.info()["artifact"].endswith("model.plan")
    preds = det.predict(imgs)  # 6 images > profile max 4: split into chunks
    maps, scores = reference(imgs)
    for p, m, s in zip(preds, maps, scores):
        assert p.anomaly_map.shape == m.shape and abs(p.score - s) < 1e-6
    graph_det = Detector.load(eng, backend="tensorrt", threads=2, cuda_graph=True)  # threads: ignored on GPU
    for _ in range(3):
        assert [p.score for p in graph_det.predict(imgs[:4])] == pytest.approx(scores[:4], abs=1e-6)
    assert graph_det.backend.graph_launches == 2 and graph_det.info()["backend_info"]["cuda_graph"]
    graph_det.close()
    with pytest.raises(DeployError, match=r"no fp16 TensorRT plan in this engine \(have: model\.plan fp32\)"):
        Detector.load(eng, backend="tensorrt", precision="fp16")
    with pytest.raises(DeployError, match="the plan was built for fp32, fp16 was requested"):
        TensorRTBackend(eng / "model.plan", precision="fp16", artifact_precision="fp32").activate()


def test_fake_tensorrt_mismatch_explicit_vs_auto(engine_copy, fake_gpu):
    eng = _add_plan(engine_copy("plain"), b"FAKEPLAN", compute_capability="9.0", gpu_name="NVIDIA H100")
    with pytest.raises(PlanMismatch, match=r"built for NVIDIA H100 \(compute capability 9\.0\) but this GPU is "
                                           r"NVIDIA L4 \(8\.9\)"):
        Detector.load(eng, backend="tensorrt")
    det = Detector.load(eng)
    assert det.backend_name != "tensorrt"
    assert any(n.startswith("tensorrt: ") and "compute capability 9.0" in n for n in det.selection_notes)


def test_tampered_plan_is_never_skipped(engine_copy, fake_gpu):
    eng = _add_plan(engine_copy("plain"), b"FAKEPLAN")
    (eng / "model.plan").write_bytes(b"FAKEPLAN-modified")
    with pytest.raises(DeployError, match=r"model\.plan: sha256 mismatch"):
        Detector.load(eng)


# -------------------------------------------------------------------------------------- real TensorRT
def _gpu_present() -> bool:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            return False
    err, n = cudart.cudaGetDeviceCount()
    return int(err) == 0 and n > 0


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_plan(engine_copy):
    trt = pytest.importorskip("tensorrt")
    if not _gpu_present():
        pytest.skip("no CUDA GPU")
    from cuda.bindings import runtime as cudart  # noqa: F401 (checked above)

    eng = engine_copy("plain")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((eng / "model.onnx").read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, IMG, IMG, 3), (2, IMG, IMG, 3), (4, IMG, IMG, 3))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    err, prop = cudart.cudaGetDeviceProperties(0)
    (eng / "model.plan").write_bytes(bytes(plan))
    side = {"tensorrt_version": trt.__version__, "gpu_name": prop.name.split(b"\0")[0].decode(),
            "compute_capability": f"{prop.major}.{prop.minor}", "precision": "fp32",
            "onnx_sha256": sha256_file(eng / "model.onnx")}
    (eng / "model.plan.json").write_text(json.dumps(side))
    spec = load_spec(eng)
    spec.add_artifact(eng, "model.plan", "tensorrt", "fp32")
    spec.add_artifact(eng, "model.plan.json", "json", None)
    write_spec(eng, spec)
    imgs = [sample_image(80, 90, i) for i in range(5)]
    maps, scores = reference(imgs)
    for graph in (False, True):
        det = Detector.load(eng, backend="tensorrt", cuda_graph=graph)
        for _ in range(3):
            preds = det.predict(imgs)
            for p, m, s in zip(preds, maps, scores):
                np.testing.assert_allclose(p.anomaly_map, m, atol=1e-5)
                assert abs(p.score - s) < 1e-5
        det.close()


def test_tensorrt_sets_the_cuda_device_on_every_call_from_any_thread(engine_copy, fake_gpu):
    """CUDA's current device is per thread and a new thread starts on device 0: a backend on GPU 1 called
    from a worker thread ran its copies and kernels against GPU 0's context (TensorRT cannot be installed
    here: the fake runtime records the calling thread's current device at every CUDA work call)."""
    eng = _add_plan(engine_copy("plain"), b"FAKEPLAN")
    fake_gpu.device_count = 2
    x = np.stack([sample_image(IMG, IMG, s) for s in range(2)])
    want = x.astype(np.float32).mean(axis=3) / 255.0
    with TensorRTBackend(eng / "model.plan", device_id=1) as be:
        assert be.device == "cuda:1"
        fake_gpu.devices_used.clear()
        results: list[np.ndarray] = []
        workers = [threading.Thread(target=lambda: results.append(be.infer({"image": x})["anomaly_map"]))
                   for _ in range(3)]
        for t in workers:
            t.start()
            t.join()
        fake_gpu.current.device = 0  # the main thread moved to another GPU meanwhile (e.g. another library)
        results.append(be.infer({"image": x})["anomaly_map"])
    assert len(results) == 4 and all(np.allclose(r, want, atol=1e-6) for r in results)
    assert fake_gpu.devices_used and set(fake_gpu.devices_used) == {1}, fake_gpu.devices_used
