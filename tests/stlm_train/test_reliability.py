"""Issue 12: processes that fork or get killed. Each scenario runs in a child process, so this pytest
process never forks a runtime's thread pools (the Makefile runs this folder apart for that reason)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stlm_train.checkpoint import read_file

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _kill_when(proc: subprocess.Popen, seen, timeout: float = 300.0, poll: float = 0.0005) -> None:
    """SIGKILL ``proc`` the moment ``seen()`` is true (polled every ``poll`` s); fail if it exits first."""
    end = time.monotonic() + timeout
    while not seen():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before the moment to kill it")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the moment to kill")
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)


def _temps(folder: Path, name: str) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------ item 6: fork after load
_FORK_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from tests.contract_engine import make_engine, sample_image
from stlm_deploy import Detector

root, out = Path(sys.argv[1]), {}
for backend in ("ort", "openvino"):
    det = Detector.load(make_engine(root, backend, openvino_ir=backend == "openvino"), backend=backend)
    img = sample_image(64, 64, 1)
    before = det.predict(img).score  # the runtime's thread pools are running now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must get one line, never touch the parent's runtime state
        os.close(r)
        try:
            det.predict(img)
            msg = "no error"
        except Exception as e:
            msg = type(e).__name__ + ": " + str(e)
        det.close()
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    _, status = os.waitpid(pid, 0)
    out[backend] = {"child": data.decode(), "status": status, "parent_still_works": det.predict(img).score == before}
    det.close()
print(json.dumps(out))
"""


def test_a_detector_used_in_a_forked_child_is_a_one_line_error(tmp_path: Path):
    """A Detector created in the parent and used after fork: one line, not heap corruption or a hang."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    script = tmp_path / "fork.py"
    script.write_text(_FORK_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "engines")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend, r in result.items():
        assert r["status"] == 0 and r["parent_still_works"], (backend, r)
        msg = r["child"]
        assert msg.startswith("DeployError: ") and "\n" not in msg, msg
        assert f"{backend} backend" in msg and "used in forked child" in msg and "spawn" in msg, msg


# ------------------------------------------------------------------- item 9: kill -9 during a checkpoint save
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from stlm_train.data import make_generated_dataset

    return make_generated_dataset(tmp_path_factory.mktemp("gen") / "d", n_train=8, n_test_good=2, n_test_bad=2,
                                  size=128, seed=0)


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "stlm_train.cli", "train", "--config", "small", "--img-size", "128", "--quiet",
            "--no-eval", *args]


def test_kill_9_during_a_checkpoint_save_then_resume_continues(tiny_data: Path, tmp_path: Path):
    """SIGKILL while last.ckpt is being rewritten (its temp file exists): the previous last.ckpt stays whole,
    and --resume continues from it to the requested step and removes the killed save's temp file."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train("--data", str(tiny_data), "--out", str(run), "--steps", "4", "--save-every", "1"),
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # the second save started: a good last.ckpt exists and the next one is half written
        _kill_when(proc, lambda: (run / "last.ckpt").is_file() and bool(_temps(run, "last.ckpt")))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert _temps(run, "last.ckpt"), "the kill did not land during a save"
    state = read_file(run / "last.ckpt")  # the last good state, complete
    saved = int(state["step"])
    assert 1 <= saved < 4 and len(state["history"]) == saved and not (run / "model.ckpt").exists()
    done = subprocess.run(_train("--out", str(run), "--steps", "4", "--resume"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = read_file(run / "last.ckpt")
    assert int(final["step"]) == 4 and final["history"][:saved].tolist() == state["history"].tolist()
    assert read_file(run / "model.ckpt")["train"]["steps"] == 4
    assert not _temps(run, "last.ckpt")  # the killed save's temp is gone
