"""The one image reader: file -> uint8 HxWx3 RGB, the same for training, evaluation, export
calibration, stlm-infer and (by the same rules) the C++ example.

Rules, applied one way everywhere:
* EXIF orientation is applied (a camera JPEG tagged Orientation=6 is upright, as a viewer shows it;
  training once read such files unrotated while inference rotated them);
* 16-bit -> 8-bit by scaling x*255/65535 (rounded), never by truncation; float images in [0, 1] x 255;
* grey -> replicated to three channels; alpha (grey+alpha, RGBA) -> dropped, never composited;
* bytes are read with numpy first so non-ASCII paths work everywhere and a missing file gives our
  message instead of an OpenCV warning.
OpenCV flags: ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` keeps the depth and applies EXIF orientation
(``IMREAD_UNCHANGED`` would ignore it).

Bounded memory: before anything is decoded, width and height are read from the file's header (PNG
IHDR, JPEG SOFn, BMP, TIFF/BigTIFF, WebP, PNM, JPEG 2000; :func:`image_size`, pure Python, a few
hundred bytes of work) and an image above ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, 64
megapixels; ``None`` or 0 = no cap) is refused with one line naming the file. OpenCV 5.0 has no
header-only query (``imdecode`` allocates the full image; its own ``OPENCV_IO_MAX_IMAGE_PIXELS``
guard is process-wide, 1 gigapixel, and raises ``cv2.error``), so the header reader is ours; an
OpenCV error while decoding is turned into the same one-line :class:`InputError`.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from .errors import InputError

#: OpenCV's silent log level (cv2.utils.logging.LOG_LEVEL_SILENT)
OPENCV_SILENT = 0


def opencv_log_level(level: int) -> int:
    """Set OpenCV's log level, return the previous one. OpenCV's codec warnings are multi-line and per
    file, so callers that report one line per failed image silence them. ``cv2.utils.logging`` exists from
    OpenCV 4.11; the serve extra's 4.10 only has ``cv2.setLogLevel``/``cv2.getLogLevel``."""
    log = getattr(cv2.utils, "logging", None)
    if log is not None:
        previous = log.getLogLevel()
        log.setLogLevel(level)
    else:
        previous = cv2.getLogLevel()
        cv2.setLogLevel(level)
    return int(previous)

__all__ = ["opencv_log_level", "read_image_rgb", "read_mask", "decode_image_rgb", "to_uint8", "image_size", "check_pixels",
           "IMREAD_FLAGS", "DEFAULT_MAX_PIXELS", "HEADER_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]
IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
#: Largest image (width x height) decoded by default: 64 megapixels = 192 MB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 64_000_000
#: Bytes read before the size check (JPEG headers may sit behind large EXIF/ICC segments).
HEADER_BYTES = 1 << 20


# ------------------------------------------------------------------------------------- header sizes
def _png(b: bytes) -> Optional[tuple[int, int]]:
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return w, h
    return None


def _jpeg(b: bytes) -> Optional[tuple[int, int]]:
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None  # lost sync: corrupt header
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2:i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): P(1) Y(2) X(2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _bmp(b: bytes) -> Optional[tuple[int, int]]:
    if b[:2] != b"BM" or len(b) < 26:
        return None
    (hsize,) = struct.unpack("<I", b[14:18])
    if hsize == 12:  # OS/2 BITMAPCOREHEADER
        w, h = struct.unpack("<HH", b[18:22])
    else:
        w, h = struct.unpack("<ii", b[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


def _tiff(b: bytes) -> Optional[tuple[int, int]]:
    if b[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    e = "<" if b[:2] == b"II" else ">"
    big = b[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (off,) = struct.unpack(e + "Q", b[8:16])
            (count,) = struct.unpack(e + "Q", b[off:off + 8])
            pos, size = off + 8, 20
        else:
            (off,) = struct.unpack(e + "I", b[4:8])
            (count,) = struct.unpack(e + "H", b[off:off + 2])
            pos, size = off + 2, 12
        found: dict[int, int] = {}
        for k in range(min(count, 4096)):
            ent = b[pos + k * size: pos + (k + 1) * size]
            if len(ent) < size:
                break
            tag, typ = struct.unpack(e + "HH", ent[:4])
            if tag in (256, 257):
                value = ent[12:] if big else ent[8:]
                fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
                if fmt is None:
                    return None
                (found[tag],) = struct.unpack(e + fmt, value[:struct.calcsize(fmt)])
        if 256 in found and 257 in found:
            return found[256], found[257]
    except struct.error:
        return None
    return None


def _webp(b: bytes) -> Optional[tuple[int, int]]:
    if b[:4] != b"RIFF" or b[8:12] != b"WEBP" or len(b) < 30:
        return None
    kind = b[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return w, h
    if kind == b"VP8L" and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _pnm(b: bytes) -> Optional[tuple[int, int]]:
    if len(b) < 3 or b[0:1] != b"P" or b[1:2] not in b"123456":
        return None
    tokens: list[int] = []
    i, n = 2, min(len(b), 4096)
    while len(tokens) < 2 and i < n:
        c = b[i:i + 1]
        if c == b"#":
            while i < n and b[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isdigit():
            j = i
            while j < n and b[j:j + 1].isdigit():
                j += 1
            tokens.append(int(b[i:j]))
            i = j
            continue
        elif not c.isspace():
            return None
        i += 1
    return (tokens[0], tokens[1]) if len(tokens) == 2 else None


def _jp2(b: bytes) -> Optional[tuple[int, int]]:
    if b[:4] == b"\xff\x4f\xff\x51" and len(b) >= 24:  # raw J2K codestream: SIZ marker
        xs, ys, xo, yo = struct.unpack(">IIII", b[8:24])
        return xs - xo, ys - yo
    if b[4:12] != b"jP  \r\n\x87\n":
        return None
    at = b.find(b"ihdr")
    if at < 0 or at + 12 > len(b):
        return None
    h, w = struct.unpack(">II", b[at + 4:at + 12])
    return w, h


_READERS = (_png, _jpeg, _bmp, _tiff, _webp, _pnm, _jp2)


def image_size(header: bytes | np.ndarray) -> Optional[tuple[int, int]]:
    """(width, height) from the first bytes of an encoded image, or None when the format or the header is
    not recognised (the decoder then decides). Reads the header only, never decodes pixels."""
    b = header.tobytes() if isinstance(header, np.ndarray) else bytes(header)
    for reader in _READERS:
        try:
            size = reader(b)
        except (struct.error, ValueError, IndexError):
            size = None
        if size is not None:
            return size
    return None


def check_pixels(header: bytes | np.ndarray, where: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 what: str = "image") -> None:
    """Refuse (one-line :class:`InputError` naming ``where``) an image whose header says it has more
    than ``max_pixels`` pixels; ``None`` or 0 = no cap."""
    if not max_pixels:
        return
    size = image_size(header)
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise InputError(f"{where}: {what} is too large to decode ({w}x{h} = {w * h:,} pixels, limit "
                         f"{max_pixels:,}; raise max_pixels / --max-pixels to allow it)")


def _read_bytes(path: PathLike, what: str, max_pixels: Optional[int] = None) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        reason = "is a directory, not a file" if p.is_dir() else "no such file"
        raise InputError(f"cannot read {what} '{p}': {reason}")
    try:
        if max_pixels:
            with open(p, "rb") as f:
                head = f.read(HEADER_BYTES)
            check_pixels(head, str(p), max_pixels, what)
        return np.fromfile(str(p), dtype=np.uint8)
    except OSError as exc:  # permissions, I/O errors
        raise InputError(f"cannot read {what} '{p}': {exc.strerror or exc}") from None


_ARTICLE = {"image": "an image", "mask": "a mask"}


def _decode(buf: np.ndarray, flags: int, where: str, what: str) -> np.ndarray:
    try:
        img = cv2.imdecode(buf, flags) if buf.size else None
    except cv2.error as exc:  # OpenCV's own size guard, corrupt data, codec failures
        detail = " ".join(str(exc).split())
        raise InputError(f"{where}: cannot decode as {_ARTICLE[what]} ({detail[-160:]})") from None
    if img is None or img.size == 0:
        raise InputError(f"{where}: cannot decode as {_ARTICLE[what]} (unsupported format, empty or corrupt file)")
    return img


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Bring any decoded depth to uint8 by scaling (16-bit: x*255/65535), never by truncation."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.rint(img.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return np.rint((img.astype(np.float32) + 32768.0) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        # Float TIFF/EXR: [0, 1] data is the common convention; larger ranges are taken as 0..255.
        f = np.nan_to_num(img.astype(np.float32))
        scale = 255.0 if float(f.max(initial=0.0)) <= 1.0 else 1.0
        return np.rint(np.clip(f * scale, 0.0, 255.0)).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)  # int32 and anything else: clip to the 8-bit range


def _to_rgb(img: np.ndarray, where: str) -> np.ndarray:
    img = to_uint8(img)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3:
        raise InputError(f"cannot read image '{where}': unexpected array shape {img.shape}")
    channels = img.shape[2]
    if channels in (1, 2):  # grey or grey+alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise InputError(f"cannot read image '{where}': expected 1-4 channels, found {channels}")


def decode_image_rgb(data: bytes | np.ndarray, where: str = "<bytes>",
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> uint8 HxWx3 RGB by the rules above; images above ``max_pixels``
    (from the header, before decoding) are refused."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    check_pixels(buf[:HEADER_BYTES], where, max_pixels)
    try:
        return _to_rgb(_decode(buf, IMREAD_FLAGS, where, "image"), where)
    except MemoryError:
        raise InputError(f"{where}: out of memory while decoding the image") from None


def read_image_rgb(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB; :class:`InputError` (one line, naming the path) otherwise.

    ``max_pixels``: refuse images with more pixels (read from the header before the file is decoded;
    default 64 megapixels, ``None`` or 0 = no cap)."""
    return decode_image_rgb(_read_bytes(path, "image", max_pixels), str(path), max_pixels=None)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as uint8 HxW with values {0, 1} (any non-zero pixel is defective).

    Colour masks count a pixel as defective when any colour channel is non-zero (alpha is ignored).
    Masks are read unrotated (IMREAD_UNCHANGED): they are written by tools, not cameras.
    """
    img = _decode(_read_bytes(path, "mask", DEFAULT_MAX_PIXELS), cv2.IMREAD_UNCHANGED, str(path), "mask")
    if img.ndim == 3:
        img = img[:, :, :3] if img.shape[2] >= 3 else img[:, :, :1]
        img = img.max(axis=2)
    elif img.ndim != 2:
        raise InputError(f"cannot read mask '{path}': unexpected array shape {img.shape}")
    return (np.nan_to_num(img) > 0).astype(np.uint8)
