"""stlm-serve on a REAL Triton server (PyTriton's bundled tritonserver, CPU) bound to 127.0.0.1 on free ports.

One server per module (startup ~4 s); every request has a timeout; the engine is the tiny contract graph
(``anomaly_map = mean_c(image) / 255``), so the server must give exactly what Detector.predict gives.
"""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.http", reason="needs the serve extra (tritonclient)")

from stlm_deploy import Detector  # noqa: E402
from stlm_deploy.serving.client import RemoteDetector  # noqa: E402
from stlm_deploy.errors import DeployError  # noqa: E402
from stlm_deploy.serving.server import ServeOptions, StlmServer  # noqa: E402
from tests.contract_engine import make_engine, sample_image  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports() -> dict[str, int]:
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_engine(tmp_path_factory.mktemp("serve"), "tiny", image_threshold=0.55, pixel_threshold=0.6,
                       score_range=(0.3, 0.9))


@pytest.fixture(scope="module")
def local(engine: Path):
    with Detector.load(engine, backend="ort") as det:
        yield det


@pytest.fixture(scope="module")
def server(engine: Path):
    det = Detector.load(engine, backend="ort")
    srv = StlmServer(det, ServeOptions(**ports(), max_queue_delay_us=5000, ready_timeout_s=90))
    srv.start()
    yield srv
    srv.stop()
    det.close()


def images(n: int = 3, h: int = 72, w: int = 90) -> list[np.ndarray]:
    return [sample_image(h, w, seed) for seed in range(n)]


def assert_same(remote: list, ref: list, maps: bool = True) -> None:
    assert len(remote) == len(ref)
    for r, p in zip(remote, ref):
        assert abs(r.score - p.score) <= TOL
        assert abs(r.normalized_score - p.normalized_score) <= TOL
        assert r.is_anomalous == p.is_anomalous
        if maps:
            assert r.anomaly_map.shape == p.anomaly_map.shape
            assert float(np.abs(r.anomaly_map - p.anomaly_map).max()) <= TOL


def test_ready_over_http_and_grpc(server: StlmServer) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    h = th.InferenceServerClient(server.http_url[len("http://"):])
    g = tg.InferenceServerClient(server.grpc_url)
    try:
        assert h.is_server_ready() and h.is_model_ready("tiny") and g.is_model_ready("tiny")
        cfg = h.get_model_config("tiny")
        assert cfg["max_batch_size"] == server.max_batch == 8 and "dynamic_batching" in cfg
        names = {t["name"] for t in cfg["input"]}
        assert names == {"image", "image_bytes"}
    finally:
        h.close()
        g.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_matches_detector(server: StlmServer, local: Detector, protocol: str) -> None:
    url = server.http_url if protocol == "http" else f"grpc://{server.grpc_url}"
    imgs = images() + [sample_image(50, 130, 9)]  # another size: its own request
    ref = local.predict(imgs)
    with RemoteDetector(url, "tiny") as remote:
        got = remote.predict(imgs)
    assert_same(got, ref)
    assert any(p.is_anomalous for p in ref) or any(not p.is_anomalous for p in ref)


def test_one_request_with_a_batch(server: StlmServer, local: Detector) -> None:
    import tritonclient.http as th

    batch = np.stack(images(4))
    c = th.InferenceServerClient(server.http_url[len("http://"):])
    try:
        inp = th.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        res = c.infer("tiny", [inp], outputs=[th.InferRequestedOutput(n) for n in
                                               ("score", "normalized_score", "is_anomalous")])
        assert res.as_numpy("anomaly_map") is None  # not asked for: not computed into the response
        ref = local.predict(list(batch))
        np.testing.assert_allclose(res.as_numpy("score").ravel(), [p.score for p in ref], atol=TOL)
        np.testing.assert_allclose(res.as_numpy("normalized_score").ravel(), [p.normalized_score for p in ref],
                                   atol=TOL)
        assert res.as_numpy("is_anomalous").ravel().tolist() == [p.is_anomalous for p in ref]
        with_map = c.infer("tiny", [inp], outputs=[th.InferRequestedOutput("anomaly_map")])
        maps = with_map.as_numpy("anomaly_map")
        assert maps.shape == batch.shape[:3] and maps.dtype == np.float32
        assert float(np.abs(maps - np.stack([p.anomaly_map for p in ref])).max()) <= TOL
    finally:
        c.close()


def test_image_bytes(server: StlmServer, local: Detector) -> None:
    imgs = images(2, 80, 64)
    png = cv2.imencode(".png", cv2.cvtColor(imgs[0], cv2.COLOR_RGB2BGR))[1].tobytes()
    jpg = cv2.imencode(".jpg", cv2.cvtColor(imgs[1], cv2.COLOR_RGB2BGR))[1].tobytes()
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in (png, jpg)]
    with RemoteDetector(server.http_url, "tiny") as remote:
        got = remote.predict_bytes([png, jpg])
    assert_same(got, local.predict(decoded))


def test_malformed_requests_get_clear_errors_and_server_stays_up(server: StlmServer, local: Detector) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = th.InferenceServerClient(server.http_url[len("http://"):])
    img = images(1)[0]
    try:
        wrong_dtype = th.InferInput("image", [1, *img.shape], "FP32")
        wrong_dtype.set_data_from_numpy(img[None].astype(np.float32))
        with pytest.raises(InferenceServerException, match="FP32.*UINT8|UINT8.*FP32"):
            c.infer("tiny", [wrong_dtype])
        wrong_rank = th.InferInput("image", [1, img.shape[0], 3], "UINT8")
        wrong_rank.set_data_from_numpy(img[None, :, 0, :])
        with pytest.raises(InferenceServerException, match="shape"):
            c.infer("tiny", [wrong_rank])
    finally:
        c.close()
    with RemoteDetector(server.http_url, "tiny") as remote:
        with pytest.raises(DeployError, match=r"image_bytes'\[0\]: cannot decode as an image"):
            remote.predict_bytes([b"not an image"])
        assert_same([remote.predict(img)], [local.predict(img)])  # still serving


def test_stlm_infer_url_writes_what_local_inference_writes(server: StlmServer, engine: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stlm_deploy.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images(3)):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    runs = {}
    for how, args in (("local", ["--engine", str(engine), "--backend", "ort"]),
                      ("remote", ["--url", server.http_url, "--model", "tiny", "--engine", str(engine)])):
        out = tmp_path / how
        r = CliRunner().invoke(main, [*args, "--save-maps", str(folder), "--out", str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        with open(out / "scores.csv", newline="") as f:
            runs[how] = (list(csv.DictReader(f)), out)
    (local_rows, lo), (remote_rows, ro) = runs["local"], runs["remote"]
    assert [r["path"] for r in local_rows] == [r["path"] for r in remote_rows]
    for a, b in zip(local_rows, remote_rows):
        assert abs(float(a["score"]) - float(b["score"])) <= TOL
        assert abs(float(a["normalized_score"]) - float(b["normalized_score"])) <= TOL
        assert a["is_anomalous"] == b["is_anomalous"]
    for npy in sorted((lo / "maps").glob("*.npy")):
        assert float(np.abs(np.load(npy) - np.load(ro / "maps" / npy.name)).max()) <= TOL
    assert sorted(p.name for p in (ro / "overlays").glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_stlm_serve_command_starts_serves_and_stops_cleanly(engine: Path, local: Detector) -> None:
    """The console command end to end: ready line, a request, SIGINT -> exit 0 and the ports released.

    Started the way a script's background job starts (``trap '' INT``: SIGINT inherited as ignored),
    which must not stop Ctrl-C / kill -INT from stopping the server."""
    p = ports()
    cmd = ["/bin/sh", "-c", "trap '' INT; exec \"$0\" \"$@\"",
           sys.executable, "-m", "stlm_deploy.serving.cli", str(engine), "--backend", "ort", "--name", "bottle",
           "--http-port", str(p["http_port"]), "--grpc-port", str(p["grpc_port"]),
           "--metrics-port", str(p["metrics_port"]), "--max-batch", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline, lines = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "stlm-serve: model 'bottle' ready" in line:
                break
        assert "ready" in "".join(lines), "".join(lines)[-2000:]
        img = images(1)[0]
        with RemoteDetector(f"grpc://127.0.0.1:{p['grpc_port']}", "bottle") as remote:
            assert_same([remote.predict(img)], [local.predict(img)])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest[-2000:]
        assert "stlm-serve: stopping" in rest and time.monotonic() - t0 < 45
        for port in p.values():  # nobody listens any more (SO_REUSEADDR: closed connections may linger)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_client_errors_are_one_line(server: StlmServer) -> None:
    with pytest.raises(DeployError, match="cannot list the served models .*name the model"):
        RemoteDetector(server.http_url)  # the repository index needs PyTriton's token
    with pytest.raises(DeployError, match="bottle"):
        RemoteDetector(server.http_url, "bottle")  # no such model
    with pytest.raises(DeployError, match=r"expected http://HOST:PORT or grpc://HOST:PORT"):
        RemoteDetector("ftp://127.0.0.1:1", "tiny")


def test_port_in_use_is_one_line(engine: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = ports()
        proc = subprocess.run([sys.executable, "-m", "stlm_deploy.serving.cli", str(engine), "--backend", "ort",
                               "--http-port", str(p["http_port"]), "--grpc-port", str(port),
                               "--metrics-port", str(p["metrics_port"])], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: --grpc-port {port}: cannot listen on 127.0.0.1")


def test_bad_engine_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "stlm_deploy.serving.cli", str(tmp_path / "missing")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: ") and "missing" in proc.stderr


@contextlib.contextmanager
def raw_repository_model(engine: Path, tmp_path: Path):
    """Serve ``stlm-export --target triton``'s onnxruntime model of ``engine`` behind a real Triton; yields
    (url, model name, the config's parameters). Stand-in for Triton's onnxruntime backend: the same
    model.onnx run by ONNX Runtime with the same tensors."""
    import onnxruntime as ort
    from google.protobuf import json_format, text_format
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.grpc import model_config_pb2 as mc

    from stlm_deploy.serving.server import python_library_env, wait_model_ready
    from stlm_export.triton_repo import write_triton_repository

    repo = tmp_path / "repo"
    write_triton_repository(engine, repo)
    name = engine.name
    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    as_served = json_format.MessageToDict(cfg, preserving_proto_field_name=True)  # what get_model_config returns
    params = {k: v["string_value"] for k, v in as_served["parameters"].items()}
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    s = int(params["stlm.img_size"])

    def raw(requests):
        out = []
        for req in requests:
            m, sc = session.run(["anomaly_map", "score"], {"image": req.data["image"]})
            out.append({"anomaly_map": m, "score": sc.reshape(-1, 1)})
        return out

    python_library_env()
    p = ports()
    triton = Triton(config=TritonConfig(http_address="127.0.0.1", grpc_address="127.0.0.1", metrics_address="127.0.0.1",
                                        http_port=p["http_port"], grpc_port=p["grpc_port"],
                                        metrics_port=p["metrics_port"]))
    try:
        triton.bind(f"{name}_raw", raw, inputs=[Tensor(name="image", dtype=np.uint8, shape=(s, s, 3))],
                    outputs=[Tensor(name="anomaly_map", dtype=np.float32, shape=(s, s)),
                             Tensor(name="score", dtype=np.float32, shape=(1,))],
                    config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher()))
        triton.run()
        wait_model_ready(f"http://127.0.0.1:{p['http_port']}", f"{name}_raw", 90, alive=triton.is_alive)
        yield f"http://127.0.0.1:{p['http_port']}", f"{name}_raw", params
    finally:
        triton.stop()


def test_client_step_for_a_raw_repository_model(engine: Path, local: Detector, tmp_path: Path) -> None:
    """``stlm-export --target triton`` models serve the raw graph; RemoteDetector does the documented client
    step (resize, resize back, decide with the config's ``stlm.*`` parameters)."""
    from stlm_deploy.spec import Thresholds

    with raw_repository_model(engine, tmp_path) as (url, name, params):
        assert Thresholds.from_parameters(params) == local.spec.thresholds
        imgs = images(2) + [sample_image(100, 40, 5)]
        with RemoteDetector(url, name, thresholds=Thresholds.from_parameters(params)) as rd:
            assert rd.raw and rd.img_size == 64 and rd.tiling is None
            got = rd.predict(imgs)
        assert_same(got, local.predict(imgs))


def test_tiled_engine_on_the_server_and_through_the_raw_client_step(tmp_path: Path) -> None:
    """A tiled engine: stlm-serve (the Detector on the server) and the client step of a raw repository model
    (the client cuts and blends the tiles) give the local Detector's stitched map within 1e-5. (The stand-in
    Triton model cannot carry the config's parameters: thresholds and tiling are parsed from the generated
    config.pbtxt and handed over, as in the untiled test.)"""
    from stlm_deploy.serving.client import _tiling_from
    from stlm_deploy.spec import Thresholds

    tiled = make_engine(tmp_path, "tiled", work_size=160, image_threshold=0.55, pixel_threshold=0.6,
                        score_range=(0.3, 0.9))
    imgs = [sample_image(200, 150, 0), sample_image(64, 300, 1), sample_image(50, 50, 2)]
    det = Detector.load(tiled, backend="ort")
    ref = det.predict(imgs)
    assert max(p.n_tiles for p in ref) > 1
    srv = StlmServer(det, ServeOptions(**ports(), ready_timeout_s=90))
    srv.start()
    try:
        with RemoteDetector(srv.http_url, "tiled") as remote:
            assert_same(remote.predict(imgs), ref)
    finally:
        srv.stop()
        det.close()
    with raw_repository_model(tiled, tmp_path) as (url, name, params):
        assert params["stlm.format_version"] == "2" and params["stlm.preprocessing.work_size"] == "160"
        tiling = _tiling_from(params, 64, "config.pbtxt")
        assert tiling == det.tiling
        with RemoteDetector(url, name, thresholds=Thresholds.from_parameters(params), tiling=tiling) as rd:
            assert rd.raw and rd.tiling is not None and rd.tiling.work_size == 160
            got = rd.predict(imgs)
        assert_same(got, ref)
        assert [p.n_tiles for p in got] == [p.n_tiles for p in ref]
    with pytest.raises(DeployError, match=r"config.pbtxt: parameter 'stlm.format_version' is 3, newer than this client "
                                          r"supports \(2\)"):
        _tiling_from({**params, "stlm.format_version": "3"}, 64, "config.pbtxt")
    with pytest.raises(DeployError, match=r"work_size: must be at least the tile size 64"):
        _tiling_from({**params, "stlm.preprocessing.work_size": "32"}, 64, "config.pbtxt")
