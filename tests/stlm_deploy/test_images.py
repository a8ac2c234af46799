"""The one image reader (stlm_deploy.images): EXIF orientation, depths, channels, errors; and the
training reader is the same function."""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from stlm_deploy.errors import InputError
from stlm_deploy.images import decode_image_rgb, read_image_rgb, read_mask
from stlm_deploy.preprocess import RESIZE_POLICIES, interpolation_for, resize_image


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment holding only the Orientation tag (0x0112) after SOI."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) \
        + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + jpeg[2:]


def _asymmetric(h: int = 40, w: int = 64) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:10, :20] = (255, 0, 0)  # red block in the top-left corner (RGB)
    img[-5:, :, 2] = 200
    return img


def test_exif_orientation_is_applied(tmp_path):
    rgb = _asymmetric()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    path = tmp_path / "camera.jpg"
    path.write_bytes(_with_exif_orientation(buf.tobytes(), 6))  # 6: rotate 90 degrees clockwise to view
    img = read_image_rgb(path)
    assert img.shape == (64, 40, 3)  # upright, as a viewer shows it
    # the red block moved from the top-left to the top-right corner
    assert img[:20, -10:, 0].mean() > 200 and img[:20, :10, 0].mean() < 60


def test_training_reader_is_the_runtime_reader(tmp_path):
    from stlm_train.data.io import DataError
    from stlm_train.data.io import read_image_rgb as train_read

    rgb = _asymmetric()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    path = tmp_path / "x.jpg"
    path.write_bytes(_with_exif_orientation(buf.tobytes(), 6))
    np.testing.assert_array_equal(train_read(path), read_image_rgb(path))
    with pytest.raises(DataError, match="missing.png.*no such file"):
        train_read(tmp_path / "missing.png")


@pytest.mark.parametrize("kind", ["grey", "grey16", "rgba", "rgb16"])
def test_depths_and_channels_are_handled_one_way(tmp_path, kind):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    if kind == "grey":
        arr, want = base[:, :, 0], np.repeat(base[:, :, :1], 3, axis=2)
    elif kind == "grey16":
        g16 = base[:, :, 0].astype(np.uint16) * 257
        arr, want = g16, np.repeat(base[:, :, :1], 3, axis=2)
    elif kind == "rgba":
        arr = np.dstack([cv2.cvtColor(base, cv2.COLOR_RGB2BGR), np.full((12, 16), 7, np.uint8)])
        want = base  # alpha dropped, never composited
    else:
        arr, want = cv2.cvtColor(base, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257, base
    path = tmp_path / f"{kind}.png"
    assert cv2.imwrite(str(path), arr)
    got = read_image_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (12, 16, 3)
    np.testing.assert_array_equal(got, want)


def test_reader_errors_are_one_line_and_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    for path, needle in ((bad, "cannot decode as an image (unsupported format, empty or corrupt file)"),
                         (tmp_path / "nope.png", "no such file"),
                         (tmp_path, "is a directory")):
        with pytest.raises(InputError) as e:
            read_image_rgb(path)
        assert needle in str(e.value) and str(path.name) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="<bytes>"):
        decode_image_rgb(b"")


def test_mask_reader_binarises(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:5] = 255
    assert cv2.imwrite(str(tmp_path / "m.png"), m)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), (m > 0).astype(np.uint8))


def test_area_policy_shrinks_with_pixel_area_and_enlarges_bilinearly():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert RESIZE_POLICIES[0] == "area"
    np.testing.assert_array_equal(resize_image(big, 100, "area"), cv2.resize(big, (100, 100), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(resize_image(big, 100, "bilinear"),
                                  cv2.resize(big, (100, 100), interpolation=cv2.INTER_LINEAR))
    # a 3x3 block average: area is exact, bilinear aliases (samples single pixels)
    blocks = big.reshape(100, 3, 100, 3, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(resize_image(big, 100, "area") - blocks).max() <= 0.5
    assert np.abs(resize_image(big, 100, "bilinear") - blocks).mean() > 10
    small = big[:50, :50]
    np.testing.assert_array_equal(resize_image(small, 100, "area"),
                                  cv2.resize(small, (100, 100), interpolation=cv2.INTER_LINEAR))
    assert interpolation_for("area", (50, 300), (100, 100)) == cv2.INTER_LINEAR  # mixed: not shrinking
    with pytest.raises(InputError, match="resize policy must be one of 'area', 'bilinear'|area, bilinear"):
        interpolation_for("nearest", (1, 1), (2, 2))


# ---------------------------------------------------------------- issue 12 item 5: bounded memory
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height and nothing else (no pixel data): tiny, truncated."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + \
        struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".pgm", ".pbm", ".jp2"])
def test_image_size_reads_the_header_of_every_accepted_format(ext):
    from stlm_deploy.files import IMAGE_EXTENSIONS
    from stlm_deploy.images import image_size

    assert ext in IMAGE_EXTENSIONS
    img = _asymmetric(37, 53)
    ok, buf = cv2.imencode(ext, img[:, :, 0] if ext in (".pgm", ".pbm") else img)
    assert ok
    assert image_size(buf.tobytes()) == (53, 37)
    assert image_size(buf.tobytes()[:4]) is None and image_size(b"not an image at all") is None


def test_pixel_cap_refuses_from_the_header_before_decoding(tmp_path, monkeypatch):
    from stlm_deploy import images

    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(40000, 40000))  # 1.6 gigapixels announced, 33 bytes on disk
    decoded: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(images.cv2, "imdecode", lambda buf, flags: decoded.append(1) or real(buf, flags))
    with pytest.raises(InputError) as ei:
        read_image_rgb(huge)
    msg = str(ei.value)
    assert msg.startswith(f"{huge}: image is too large to decode (40000x40000 = 1,600,000,000 pixels, limit "
                          "64,000,000; raise max_pixels / --max-pixels to allow it)")
    assert "\n" not in msg and decoded == []  # refused from the header: the decoder was never called
    with pytest.raises(InputError, match="<bytes>: image is too large"):
        decode_image_rgb(huge.read_bytes())
    # the cap is an argument with a default: a small cap refuses a normal image, None lifts it
    small = tmp_path / "small.png"
    assert cv2.imwrite(str(small), _asymmetric(40, 64))
    assert read_image_rgb(small).shape == (40, 64, 3) and images.DEFAULT_MAX_PIXELS == 64_000_000
    with pytest.raises(InputError, match=r"small.png: image is too large to decode \(64x40 = 2,560 pixels, "
                                         r"limit 2,000"):
        read_image_rgb(small, max_pixels=2000)
    assert read_image_rgb(small, max_pixels=2560).shape == (40, 64, 3)
    decoded.clear()
    with pytest.raises(InputError, match="huge.png: cannot decode as an image"):  # no cap: OpenCV tries, fails
        read_image_rgb(huge, max_pixels=None)
    assert decoded == [1]


def test_opencv_errors_become_one_line_input_errors(tmp_path, monkeypatch):
    from stlm_deploy import images

    def boom(buf, flags):
        raise cv2.error("OpenCV(5.0.0) grfmt.cpp:1 error: (-215:Assertion failed)\n  pixels <= limit")

    monkeypatch.setattr(images.cv2, "imdecode", boom)
    path = tmp_path / "x.png"
    assert cv2.imwrite(str(path), _asymmetric())
    with pytest.raises(InputError) as ei:
        read_image_rgb(path)
    assert str(ei.value).startswith(f"{path}: cannot decode as an image (") and "\n" not in str(ei.value)
