"""Detector: numbers vs numpy on ORT and OpenVINO, artifact selection, integrity, auto choice, threads."""
from __future__ import annotations

import logging
from pathlib import Path
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stlm_deploy import DeployError, Detector, Prediction
from stlm_deploy.errors import BackendUnavailable, InputError, SpecError
from stlm_deploy.spec import load_spec, write_spec

from .conftest import IMG, reference, sample_image

SIZES = [(100, 150), (64, 64), (301, 207), (40, 40)]
BACKENDS = [("ort", None), ("openvino", "fp32")]


def _images(seed: int = 0) -> list[np.ndarray]:
    return [sample_image(hh, ww, seed + i) for i, (hh, ww) in enumerate(SIZES)]


def _check(preds: list[Prediction], imgs: list[np.ndarray], atol: float = 1e-5, bgr: bool = False) -> None:
    maps, scores = reference(imgs, bgr=bgr)
    assert len(preds) == len(imgs)
    for p, im, m, s in zip(preds, imgs, maps, scores):
        assert isinstance(p, Prediction) and isinstance(p.score, float)
        assert p.anomaly_map.shape == im.shape[:2] and p.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(p.anomaly_map, m, atol=atol)
        assert abs(p.score - s) < atol


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_predict_matches_numpy_for_all_input_forms(engines, backend, precision):
    det = Detector.load(engines["plain"], backend=backend, precision=precision)
    imgs = _images()
    _check(det.predict(imgs), imgs)  # list of different sizes
    single = det.predict(imgs[0])  # one (H, W, 3) image -> one Prediction
    assert isinstance(single, Prediction)
    _check([single], imgs[:1])
    stack = np.stack([sample_image(90, 120, s) for s in range(3)])  # (N, H, W, 3) -> list
    _check(det.predict(stack), list(stack))
    bgr = [im[:, :, ::-1].copy() for im in imgs]  # OpenCV frames
    _check(det.predict(bgr, bgr=True), bgr, bgr=True)
    _check(det.predict(bgr, bgr=True), imgs)  # ... give the same result as the RGB originals
    assert det.predict([]) == []
    plain = det.predict(imgs[0])
    assert plain.is_anomalous is None and plain.mask is None and plain.extra_maps == {}
    det.close()


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_unfused_engine_is_normalised_by_the_runtime(engines, backend, precision):
    det = Detector.load(engines["unfused"], backend=backend, precision=precision)
    assert not det.spec.input.fused_preprocessing and det.backend.input_dtype == np.float32
    _check(det.predict(_images(5)), _images(5), atol=1e-4)


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_fixed_batch_engine_splits_and_pads(engines, backend, precision):
    det = Detector.load(engines["fixed"], backend=backend, precision=precision)
    assert det.fixed_batch == 2
    imgs = _images() + [sample_image(70, 80, 9)]  # 5 images -> 2 + 2 + 1 (padded)
    _check(det.predict(imgs), imgs)
    _check([det.predict(imgs[2])], imgs[2:3])


def test_thresholds_mask_and_extra_maps(engines):
    det = Detector.load(engines["fused"], backend="ort")
    imgs = _images(3)
    preds = det.predict(imgs)
    for p, im in zip(preds, imgs):
        assert p.is_anomalous == (p.score > 0.5)
        assert p.mask is not None and p.mask.dtype == bool and p.mask.shape == im.shape[:2]
        np.testing.assert_array_equal(p.mask, p.anomaly_map > 0.6)
        assert p.tlm_map is not None and p.tlm_map.shape == im.shape[:2]
        np.testing.assert_allclose(p.tlm_map, 1 - p.anomaly_map, atol=1e-5)
    assert {p.is_anomalous for p in preds} <= {True, False}


def test_engine_argument_forms_select_artifacts(engines):
    eng = engines["fused"]
    cases = [(eng, "auto", None, "openvino/model.xml"),
             (eng / "stlm.json", "ort", None, "model.onnx"),
             (eng / "model.onnx", "auto", None, "model.onnx"),
             (eng / "model.fp16.onnx", "auto", None, "model.fp16.onnx"),
             (eng / "openvino" / "model.xml", "auto", "f32", "openvino/model.xml"),
             (eng / "openvino" / "model.bin", "openvino", "f32", "openvino/model.xml"),
             (eng / "model.onnx", "openvino", "f32", "model.onnx"),
             (eng, "ort", "fp16", "model.fp16.onnx"),
             (engines["plain"], "openvino", None, "model.onnx")]  # no IR: OpenVINO reads the ONNX file
    for engine, backend, precision, artifact in cases:
        det = Detector.load(engine, backend=backend, precision=precision)
        assert det.artifact == (eng if engine != engines["plain"] else engines["plain"]) / artifact, (engine, backend)
        _check([det.predict(sample_image(70, 90, 1))], [sample_image(70, 90, 1)], atol=1e-2)
    fp16 = Detector.load(eng, backend="ort", precision="fp16")
    assert fp16.info()["precision"] == "fp16"


def test_artifact_selection_errors(engines):
    with pytest.raises(BackendUnavailable, match=r"no ONNX artifact with precision fp16 \(have: model\.onnx fp32\)"):
        Detector.load(engines["plain"], backend="ort", precision="fp16")
    with pytest.raises(DeployError, match=r"model\.onnx: backend 'tensorrt' cannot run this file; use backend 'ort'"):
        Detector.load(engines["plain"] / "model.onnx", backend="tensorrt")
    with pytest.raises(DeployError, match=r"model\.fp16\.onnx: is fp16, but precision fp32 was requested"):
        Detector.load(engines["fused"] / "model.fp16.onnx", precision="fp32")
    with pytest.raises(DeployError, match=r"model\.xml: backend 'ort' cannot run this file; use backend 'openvino'"):
        Detector.load(engines["fused"] / "openvino" / "model.xml", backend="ort")
    assert Detector.load(engines["fused"] / "parity.json", backend="ort").artifact.name == "model.onnx"
    with pytest.raises(DeployError, match="backend: expected one of auto, ort, openvino, tensorrt, got 'cuda'"):
        Detector.load(engines["plain"], backend="cuda")
    with pytest.raises(DeployError, match=r"ort backend: unknown option\(s\) cuda_graph"):
        Detector.load(engines["plain"], backend="ort", cuda_graph=True)
    with pytest.raises(DeployError, match="providers: only valid with backend='ort'"):
        Detector.load(engines["plain"], providers=["cuda"])


def test_checksums_are_verified_before_use(engine_copy):
    import onnx

    eng = engine_copy("fused")
    model = onnx.load(str(eng / "model.onnx"))
    model.producer_name = "edited-by-hand"  # still a valid model, but not the exported one
    onnx.save(model, str(eng / "model.onnx"))
    with pytest.raises(DeployError, match=r"model\.onnx: sha256 mismatch \(expected [0-9a-f]{12}\.\.\., found "):
        Detector.load(eng, backend="ort")
    with pytest.raises(DeployError, match=r"sha256 mismatch"):
        Detector.load(eng / "model.onnx")
    Detector.load(eng, backend="openvino")  # uses the IR, which is intact
    Detector.load(eng, backend="ort", verify=False)  # explicitly opted out
    with open(eng / "openvino" / "model.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DeployError, match=r"openvino/model\.bin: sha256 mismatch"):
        Detector.load(eng, backend="openvino")


def test_graph_must_match_spec(engine_copy):
    eng = engine_copy("plain")
    spec = load_spec(eng)
    spec.input.name = "pixels"
    write_spec(eng, spec)
    with pytest.raises(SpecError, match=r"graph input is 'image' but stlm\.json field 'input\.name' says 'pixels'"):
        Detector.load(eng, backend="ort")


def test_auto_backend_choice_is_reported(engines, caplog, monkeypatch):
    import stlm_deploy.selection as detector_mod

    with caplog.at_level(logging.INFO, logger="stlm_deploy"):
        det = Detector.load(engines["fused"])
    info = det.info()
    assert det.selected_by == info["selected_by"] == "auto"
    # On this CPU-only test machine: no TensorRT, onnxruntime without CUDA -> OpenVINO.
    if "CUDAExecutionProvider" not in info["providers"] and det.backend_name == "openvino":
        assert any(n.startswith("ort[cuda]: ") for n in det.selection_notes)
        assert "auto backend picked openvino (openvino/model.xml" in caplog.text
    assert f"auto backend picked {det.backend_name}" in caplog.text
    real = detector_mod.module_importable
    monkeypatch.setattr(detector_mod, "module_importable", lambda n: False if n == "openvino" else real(n))
    det = Detector.load(engines["fused"])
    assert det.backend_name == "ort" and det.backend.providers_used[-1] == "CPUExecutionProvider"
    assert "openvino: openvino not installed" in det.selection_notes


def test_explicit_gpu_provider_fallback_is_an_error(engines):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("GPU onnxruntime installed")
    with pytest.raises(BackendUnavailable, match="requested CUDAExecutionProvider but the session fell back to CPU"):
        Detector.load(engines["plain"], backend="ort", providers=["cuda"])


def test_info_reports_what_runs(engines):
    det = Detector.load(engines["plain"], backend="ort", threads=1)
    info = det.info()
    assert info["backend"] == "ort" and info["precision"] == "fp32" and info["device"] == "cpu"
    assert info["providers"] == ["CPUExecutionProvider"] and info["artifact"].endswith("model.onnx")
    assert info["selected_by"] == "ort" and info["backend_info"]["threads"] == 1
    assert info["img_size"] == IMG and info["name"] == "plain"
    assert "backend=ort" in repr(det)


def test_bad_input_is_an_input_error(engines):
    det = Detector.load(engines["plain"], backend="ort")
    with pytest.raises(InputError, match=r"^image: expected uint8 RGB array .* got float32 \(8, 8, 3\)$"):
        det.predict(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_thread_safety_matches_serial(engines, backend, precision):
    det = Detector.load(engines["plain"], backend=backend, precision=precision)
    jobs = [[sample_image(40 + 7 * k, 50 + 3 * k, k)] * (1 + k % 3) for k in range(12)]
    serial = [[p.score for p in det.predict(j)] + [float(det.predict(j)[0].anomaly_map.sum())] for j in jobs]
    barrier = threading.Barrier(4)

    def worker(w: int) -> list[tuple[int, list[float]]]:
        barrier.wait()
        out = []
        for k in range(w, len(jobs), 4):
            for _ in range(3):
                preds = det.predict(jobs[k])
                out.append((k, [p.score for p in preds] + [float(preds[0].anomaly_map.sum())]))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for part in pool.map(worker, range(4)) for r in part]
    assert len(results) == 3 * len(jobs)
    for k, got in results:
        assert got == serial[k]


# ---------------------------------------------------------------- issue 12 item 1: never a silent "normal"
@pytest.fixture(scope="module")
def nan_engine(tmp_path_factory) -> Path:
    """A real engine whose graph turns pure-white pixels into NaN (what an fp16 overflow does)."""
    from tests.contract_engine import make_engine

    return make_engine(tmp_path_factory.mktemp("nan"), "poisoned", openvino_ir=True, image_threshold=0.5,
                       nan_on_white=True)


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_nonfinite_backend_output_raises_naming_engine_backend_and_precision(nan_engine, backend, precision):
    from stlm_deploy import NonFiniteOutput

    white = np.full((80, 90, 3), 255, np.uint8)
    with Detector.load(nan_engine, backend=backend, precision=precision) as det:
        good = det.predict(sample_image(80, 90, 1))  # the same graph on an ordinary image is fine
        assert np.isfinite(good.score) and good.is_anomalous is not None
        with pytest.raises(NonFiniteOutput) as ei:
            det.predict(white)
        msg = str(ei.value)
        assert isinstance(ei.value, DeployError) and "\n" not in msg
        assert "engine 'poisoned'" in msg and f"backend {backend}" in msg
        assert f"precision {det.backend.precision}" in msg and "NaN" in msg and "'anomaly_map'" in msg
        with pytest.raises(NonFiniteOutput, match=r"for image\(s\) \[1\] of a batch of 3"):
            det.predict([sample_image(64, 64, 2), white, sample_image(64, 64, 3)])


# ---------------------------------------------------------------- issue 12 item 5: bounded memory
def _record_batches(det: Detector) -> list[int]:
    seen: list[int] = []
    real = det.backend.infer

    def infer(feed):
        seen.append(int(next(iter(feed.values())).shape[0]))
        return real(feed)

    det.backend.infer = infer
    return seen


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_predict_on_a_long_list_runs_in_chunks_of_the_batch_limit(engines, backend, precision):
    imgs = [sample_image(40 + i, 50, i) for i in range(19)]
    with Detector.load(engines["plain"], backend=backend, precision=precision) as det:
        assert det.chunk_size == 8
        seen = _record_batches(det)
        _check(det.predict(imgs), imgs)
        assert seen == [8, 8, 3]  # never one giant batch of 19
    with Detector.load(engines["plain"], backend=backend, precision=precision, batch_size=5) as det:
        seen = _record_batches(det)
        _check(det.predict(np.stack([sample_image(64, 64, i) for i in range(12)])),
               [sample_image(64, 64, i) for i in range(12)])
        assert seen == [5, 5, 2]
    with Detector.load(engines["fixed"], backend=backend, precision=precision, batch_size=5) as det:
        seen = _record_batches(det)  # a fixed-batch engine always runs its exported batch (padded)
        _check(det.predict(imgs[:5]), imgs[:5])
        assert seen == [2, 2, 2]
    with pytest.raises(DeployError, match="batch_size: expected a positive integer"):
        Detector.load(engines["plain"], backend="ort", batch_size=-1)


def test_openvino_infer_requests_come_from_a_bounded_pool(engines):
    with Detector.load(engines["plain"], backend="openvino", precision="fp32") as det:
        b = det.backend
        assert b.max_requests >= 2 and det.info()["backend_info"]["max_requests"] == b.max_requests
        img = sample_image(64, 64, 5)
        want = det.predict(img).score
        scores: list[float] = []
        for _ in range(20):  # 20 short-lived threads, one after the other: one request serves them all
            t = threading.Thread(target=lambda: scores.append(det.predict(img).score))
            t.start()
            t.join()
        assert scores == [want] * 20 and b.requests_created == 1
        barrier = threading.Barrier(12)

        def worker(_: int) -> float:
            barrier.wait()
            return det.predict(img).score

        with ThreadPoolExecutor(12) as pool:  # 12 threads at once: never more requests than the pool allows
            assert list(pool.map(worker, range(12))) == [want] * 12
        assert 1 <= b.requests_created <= b.max_requests < 12
    from stlm_deploy.backends.openvino import OpenVinoBackend

    with OpenVinoBackend(engines["plain"] / "model.onnx", max_requests=1) as one:
        x = np.zeros((3, IMG, IMG, 3), np.uint8)
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda _: one.infer({"image": x})["score"], range(6)))
        assert one.requests_created == 1 and all(np.array_equal(o, outs[0]) for o in outs)


# ------------------------------------------------------------------ issue 12 item 6: close() waits for calls in flight
@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_close_waits_for_the_calls_in_flight(engines, backend):
    """close() from one thread while four others predict: it returns only after every running call has
    returned (it freed the session under them before), and later calls get one line saying it is closed."""
    import time

    det = Detector.load(engines["fused"], backend=backend, threads=1, batch_size=256)
    batch = np.stack([sample_image(IMG, IMG, i % 7) for i in range(256)])  # one backend call, some ms long
    want = reference([batch[0]])[1][0]
    calls: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    started = threading.Barrier(5)

    def worker() -> None:
        started.wait()
        while True:
            t0 = time.perf_counter()
            try:
                preds = det.predict(batch)
            except BaseException as e:  # noqa: BLE001 - every error is examined below
                errors.append(e)
                return
            calls.append((t0, time.perf_counter()))
            assert abs(preds[0].score - want) < 1e-5

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    closing = time.perf_counter()
    det.close()
    closed = time.perf_counter()
    for t in threads:
        t.join(60)
    assert calls and len(errors) == 4
    assert any(t0 < closing < t1 for t0, t1 in calls), "no call was in flight when close() began"
    late = [t1 - closed for _, t1 in calls if t1 > closed]
    assert not late, f"{len(late)} call(s) still ran after close() returned"
    for e in errors:
        assert isinstance(e, DeployError) and "\n" not in str(e) and "closed" in str(e), repr(e)


# ------------------------------------------------------------------ issue 12 item 9: soak
def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status VmRSS here")


@pytest.mark.parametrize("backend", ["openvino", "ort"])
def test_soak_four_threads_of_100_calls_are_bit_identical_to_serial_with_bounded_memory(engines, backend):
    """4 threads x 100 predictions on ONE Detector equal the serial results bit for bit, and the process grows
    by less than 50 MB (a request, session or buffer leaked per call or per thread would show here)."""
    images = [sample_image(40 + 13 * k, 90 - 7 * k, k) for k in range(10)]  # resize up/down, odd sizes
    with Detector.load(engines["fused"], backend=backend, threads=1) as det:
        serial = [det.predict(im) for im in images]
        for _ in range(3):  # warm-up: allocator pools and infer requests reach their steady state
            det.predict(images)
        before = _rss_mib()

        def worker(t: int) -> list[tuple[int, Prediction]]:
            return [(k % 10, det.predict(images[k % 10])) for k in range(t, t + 100)]

        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(worker, range(4)))
        grown = _rss_mib() - before
    assert sum(len(r) for r in runs) == 400
    for run in runs:
        for k, pred in run:
            ref = serial[k]
            assert pred.score == ref.score and np.array_equal(pred.anomaly_map, ref.anomaly_map)
            assert np.array_equal(pred.mask, ref.mask) and pred.is_anomalous == ref.is_anomalous
            assert all(np.array_equal(pred.extra_maps[n], ref.extra_maps[n]) for n in ref.extra_maps)
    assert grown < 50, f"RSS grew by {grown:.1f} MB over 400 threaded calls"
