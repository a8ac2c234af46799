"""stlm_deploy.files: the one image-extension list and the atomic writes every package uses."""
from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

import stlm_deploy.cli
import stlm_export.calib
import stlm_train.data.io
from stlm_deploy import files

from .conftest import sample_image


def test_one_image_extension_list_for_training_calibration_and_inference():
    assert stlm_train.data.io.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert stlm_export.calib.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert stlm_deploy.cli.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS


def test_a_webp_is_an_image_everywhere(tmp_path: Path):
    """Once accepted for calibration but ignored as training data: now one answer for all three."""
    from stlm_deploy.batch import collect_inputs

    rgb = sample_image(40, 48, 1)
    assert cv2.imwrite(str(tmp_path / "a.webp"), rgb) and cv2.imwrite(str(tmp_path / "b.png"), rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    names = ["a.webp", "b.png"]
    assert [p.name for p in stlm_train.data.io.list_images(tmp_path)] == names
    assert [p.name for p in stlm_export.calib.find_images(tmp_path)] == names
    assert [p.name for p, _ in collect_inputs([str(tmp_path)])[0]] == names
    assert stlm_train.data.io.read_image_rgb(tmp_path / "a.webp").shape == (40, 48, 3)


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path: Path):
    dest = tmp_path / "sub" / "x.json"
    files.atomic_write_json(dest, {"a": 1})
    assert json.loads(dest.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with files.atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(dest.read_text()) == {"a": 1} and sorted(p.name for p in dest.parent.iterdir()) == ["x.json"]



# ------------------------------------------------------------------ issue 12 item 3: durable, one-step publishing
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_umask_is_read_without_changing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """os.umask(0) + restore left a window in which other threads created world-writable files."""
    old = os.umask(0o027)
    try:
        def no_umask(*_a):  # any call would open the 0-umask window again
            raise AssertionError("os.umask must not be called to read the umask")

        monkeypatch.setattr(os, "umask", no_umask)
        assert files.current_umask() == 0o027
        f = files.atomic_write_text(tmp_path / "a.txt", "x")
        with files.atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        assert stat.S_IMODE(f.stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_files_and_their_folder_are_fsynced_around_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append(("rename", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    dest = tmp_path / "ckpt.bin"
    with files.atomic_output(dest) as tmp:  # a writer that never syncs (torch.save, onnx.save)
        tmp.write_bytes(b"payload")
        tmp_name = str(tmp)
    assert events == [("fsync", tmp_name), ("rename", str(dest)), ("fsync", str(tmp_path))]
    events.clear()
    with files.atomic_directory(tmp_path / "eng") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "m.onnx").write_bytes(b"m")
    publish = events.index(("rename", str(tmp_path / "eng")))  # first publish: a plain rename
    before = [p for kind, p in events[:publish] if kind == "fsync"]
    assert any(p.endswith("/sub/m.onnx") for p in before) and any(p.endswith("/sub") for p in before)
    assert any(p.endswith(".tmp") for p in before) and events[-1] == ("fsync", str(tmp_path))


def test_engine_directory_swap_is_one_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dest = tmp_path / "eng"
    with files.atomic_directory(dest) as tmp:  # first publish: a plain rename
        (tmp / "stlm.json").write_text("old")
    old_inode = dest.stat().st_ino
    renames: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append(str(b)), real_replace(a, b)))
    with files.atomic_directory(dest) as tmp:
        (tmp / "stlm.json").write_text("new")
        new_inode = tmp.stat().st_ino
    assert (dest / "stlm.json").read_text() == "new" and dest.stat().st_ino == new_inode != old_inode
    assert renames == [], "the swap must not go through two renames (a kill between them leaves no engine)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert files.exchange_paths(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_fallback_two_renames_when_the_exchange_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dest = tmp_path / "eng"
    for text in ("old", "new"):
        monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
        with files.atomic_directory(dest) as tmp:
            (tmp / "stlm.json").write_text(text)
    assert (dest / "stlm.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_temps_of_killed_writers_are_removed_on_the_next_publish(tmp_path: Path):
    dead, alive = _dead_pid(), os.getppid()
    stale_dir = tmp_path / f".eng.{dead}.abc123_z.tmp"
    stale_old = tmp_path / f".eng.old-{dead}"
    live_dir = tmp_path / f".eng.{alive}.def456_z.tmp"
    other = tmp_path / f".other.{dead}.x1234567.tmp"
    dotted = tmp_path / f".eng.{dead}.{alive}.k1234567.tmp"  # a live temp of the engine named "eng.<dead>"
    for d in (stale_dir, stale_old, live_dir, other, dotted):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"partial")
    stale_file = tmp_path / f".last.ckpt.{dead}.zz99yy88.tmp"
    stale_file.write_bytes(b"half a checkpoint")
    with files.atomic_directory(tmp_path / "eng") as tmp:
        assert f".eng.{os.getpid()}." in tmp.name  # the writer's pid is in its temp name
        (tmp / "stlm.json").write_text("{}")
    assert not stale_dir.exists() and not stale_old.exists()
    assert live_dir.exists() and other.exists() and dotted.exists()  # live writers', other destinations': kept
    with files.atomic_output(tmp_path / "last.ckpt", clean_stale=True) as tmp:
        tmp.write_bytes(b"ok")
    assert not stale_file.exists() and (tmp_path / "last.ckpt").read_bytes() == b"ok"


_PUBLISH_LOOP = r"""
import sys
from pathlib import Path
from stlm_deploy.files import atomic_directory
dest, i = Path(sys.argv[1]), 0
print("ready", flush=True)
while True:
    i += 1
    with atomic_directory(dest) as tmp:
        for k in range(20):
            (tmp / f"part{k}.bin").write_bytes(bytes([i % 251]) * 4096)
        (tmp / "stlm.json").write_text(str(i))
"""


def test_kill_9_at_random_times_during_publishing_always_leaves_a_complete_directory(tmp_path: Path):
    """Publish in a loop and SIGKILL it at random moments: the destination always exists and is whole."""
    dest = tmp_path / "eng"
    script = tmp_path / "loop.py"
    script.write_text(_PUBLISH_LOOP)
    with files.atomic_directory(dest) as tmp:  # the previous engine
        for k in range(20):
            (tmp / f"part{k}.bin").write_bytes(bytes([0]) * 4096)
        (tmp / "stlm.json").write_text("0")
    rng = random.Random(12)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(dest)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + rng.random() * 0.4)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        assert dest.exists(), "the engine directory vanished: the swap was not atomic"
        n = int((dest / "stlm.json").read_text())
        parts = sorted(dest.glob("part*.bin"))
        assert len(parts) == 20 and all(p.read_bytes() == bytes([n % 251]) * 4096 for p in parts)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".eng.")]
    with files.atomic_directory(dest) as tmp:  # the next publish removes what the killed ones left
        (tmp / "stlm.json").write_text("0")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eng.")], leftovers
