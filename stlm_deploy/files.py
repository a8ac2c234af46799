"""Files, torch-free: crash-safe writes, checksums and the one list of image extensions.

Training, export, benchmarks and the runtime all import this module (it is the ground floor: numpy
and the standard library only), so an image that one command accepts is an image for all of them,
and every published file is written the same way.

Everything the toolkit publishes goes through a temp file (or temp directory) in the destination's
own folder followed by a rename, so a reader never sees a half-written artifact and an interrupted
run never destroys the previous good one. Durability: the data is fsynced before the rename and the
folder after it, so a power cut cannot publish a name that points at unwritten blocks. A directory
that replaces an existing one is swapped in ONE step (Linux ``renameat2(RENAME_EXCHANGE)``): there is
no moment, and so no kill -9, at which the destination does not exist. Temp names carry the writer's
pid; those left by a killed writer (pid no longer alive) are removed by the next publish of the same
destination.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_output", "atomic_directory", "sha256_file", "sha256_bytes", "current_umask", "fsync_tree",
           "exchange_paths", "remove_stale_temps"]

#: Suffixes (lower case) read as images by training, calibration, benchmarks and ``stlm-infer``:
#: what OpenCV's imdecode reads in the opencv-python-headless wheels.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                                     ".pbm", ".jp2")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}
_DEFAULT_UMASK = 0o022


def is_image_file(path: str | os.PathLike) -> bool:
    """A regular file whose suffix (any case) is in :data:`IMAGE_EXTENSIONS`."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` without changing it.

    The classic ``os.umask(0); os.umask(mask)`` read leaves a window in which a file created by another
    thread gets mode 0666/0777 (world-writable). Kernels before 4.7 (and non-Linux systems) lack the
    ``Umask:`` line: the common default 022 is assumed there.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_UMASK


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync a file or a directory by path; file systems that cannot sync a directory are tolerated."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (and ``root``): a built directory is on disk before it is
    published (ONNX, OpenVINO and TensorRT writers do not sync what they write)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(dirpath, directory=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temp files/folders (and swap leftovers) of ``dest`` whose writer is dead; return them.

    Temp names are ``.<name>.<pid>.<random>.tmp`` and ``.<name>.old-<pid>``: a writer killed with
    SIGKILL cannot clean up after itself, so the next writer of the same destination does. A pid that
    is alive (or reused) keeps its temp: never delete what a running writer may still be filling.
    """
    dest = Path(dest)
    # the random part is tempfile's 8 characters, so ".eng.2024.<pid>.<rand>.tmp" (a temp of "eng.2024") never
    # reads as a temp of "eng" written by pid 2024
    pattern = re.compile(r"^\." + re.escape(dest.name) + r"\.(?:(\d+)\.[a-z0-9_]{8}\.tmp|old-(\d+))$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1) or m.group(2))):
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike, clean_stale: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is fsynced and replaces ``path``, on error it vanishes.

    ``clean_stale``: first remove temps of ``path`` left by killed writers (large files such as
    checkpoints; off by default because it lists the destination folder). ``durable=False`` skips the
    two fsyncs (still atomic, not crash-durable): for per-image outputs such as overlays, thousands per run.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            _fsync_path(tmp_path)  # the writer (torch.save, onnx.save, ...) may not have synced
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; publish with the usual modes
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_path(dest.parent, directory=True)  # the rename itself is durable


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` through a synced temp file and a rename (readers never see half a file)."""
    with atomic_output(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON with a final newline, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _renameat2() -> Any:
    """A callable ``(old: bytes, new: bytes, flags) -> int`` for renameat2, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda old, new, flags: fn(_AT_FDCWD, old, _AT_FDCWD, new, flags)
    nr = _RENAMEAT2_SYSCALL.get(platform.machine())
    syscall = getattr(libc, "syscall", None)
    if nr is None or syscall is None or not platform.system() == "Linux":
        return None
    syscall.restype = ctypes.c_long
    return lambda old, new, flags: syscall(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(old),
                                           ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(new), ctypes.c_uint(flags))


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); False where the kernel,
    C library or file system does not offer it (the caller then falls back to two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # no renameat2 (old kernel, seccomp) or no RENAME_EXCHANGE on this file system
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a sibling temp folder and swap it in only when the block succeeds.

    The first publish is a plain rename. An existing directory is exchanged with the new one in one
    atomic step, so ``path`` always holds a complete engine, the old or the new one, whenever the
    process is killed; the old one is removed afterwards. On failure the temp folder is removed and
    the old directory is untouched. Temps of killed earlier publishes are removed first.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not dest.exists():
        try:
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    elif exchange_paths(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
    else:
        # Fallback where RENAME_EXCHANGE is refused (kernel < 3.15, some network file systems): two renames,
        # with a short window in which ``dest`` does not exist; the old tree is kept until the new one is in.
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, backup)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(backup, dest)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_path(dest.parent, directory=True)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of bytes already in memory (e.g. a checkpoint read once, hashed, then loaded)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (plans and IRs can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
