"""Property-based fuzzing (hypothesis) of the two parsers that read untrusted-looking bytes: stlm.json and
encoded images. Whatever the bytes, the result is a valid object or the project's one-line error type
(``DeployError``: ``SpecError`` / ``InputError``), never another exception, a crash or a hang. Bounded:
a few hundred examples with a per-example deadline, a few seconds in all."""
from __future__ import annotations

import json
import math
from typing import Any

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stlm_deploy.errors import DeployError, InputError, SpecError  # noqa: E402
from stlm_deploy.images import decode_image_rgb  # noqa: E402
from stlm_deploy.spec import EngineSpec, load_spec  # noqa: E402

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _quiet_opencv():
    """OpenCV logs every corrupt input it rejects; the test checks our one-line errors instead."""
    from stlm_deploy.images import OPENCV_SILENT, opencv_log_level

    previous = opencv_log_level(OPENCV_SILENT)
    yield
    opencv_log_level(previous)


def _one_line(e: BaseException) -> None:
    assert isinstance(e, DeployError), f"{type(e).__name__}: {e}"
    assert str(e) and "\n" not in str(e)


# ------------------------------------------------------------------------------------------ stlm.json
@pytest.fixture(scope="module")
def valid_spec(tmp_path_factory) -> dict[str, Any]:
    from tests.contract_engine import make_engine

    eng = make_engine(tmp_path_factory.mktemp("fuzz"), "e", image_threshold=0.5, pixel_threshold=0.6)
    return json.loads((eng / "stlm.json").read_text())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _parse_or_one_line_error(data: Any) -> None:
    try:
        spec = EngineSpec.from_dict(data, where="engines/x/stlm.json")
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        _one_line(e)
        assert isinstance(e, SpecError) or "precision" in str(e), e
        return
    again = EngineSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # what parses round-trips
    assert again.to_dict() == spec.to_dict()
    for v in (spec.thresholds.image, spec.thresholds.pixel, *spec.preprocessing.std):
        assert v is None or math.isfinite(v)


@FUZZ
@given(data=st.data(), action=st.sampled_from(["replace", "delete"]), value=json_values)
def test_fuzz_stlm_json_fields_end_in_a_spec_error_or_a_valid_spec(valid_spec, data, action, value):
    doc = json.loads(json.dumps(valid_spec))
    path = data.draw(st.sampled_from(_paths(doc)))
    _parse_or_one_line_error(_mutate(doc, path, action, value))


@FUZZ
@given(raw=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
       cut=st.integers(min_value=0, max_value=4000), depth=st.integers(min_value=0, max_value=3000))
def test_fuzz_stlm_json_bytes_truncations_and_nesting_end_in_a_spec_error(valid_spec, tmp_path, raw, cut, depth):
    good = json.dumps(valid_spec, indent=2).encode()
    for i, blob in enumerate((raw, good[:cut], b"[" * depth + b"]" * depth, b'{"img_size": ' + b"9" * (depth * 3) + b"}",
                              good.replace(b'"img_size": 64', b'"img_size": ' + raw[:20]))):
        d = tmp_path / f"e{i}"
        d.mkdir(exist_ok=True)
        (d / "stlm.json").write_bytes(blob)
        try:
            load_spec(d)
        except Exception as e:  # noqa: BLE001
            _one_line(e)
            assert isinstance(e, SpecError) and str(e).startswith(str(d / "stlm.json")[:0]), e
        else:
            assert blob == good or blob.startswith(good[:cut])  # only the intact file parses


# ------------------------------------------------------------------------------------------- images
def _encoded(kind: str, h: int, w: int, channels: int, depth: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    dtype = {"u8": np.uint8, "u16": np.uint16, "f32": np.float32}[depth]
    shape = (h, w) if channels == 1 else (h, w, channels)
    img = rng.random(shape).astype(np.float32) if dtype == np.float32 else \
        rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    ok, buf = cv2.imencode(kind, img)
    assert ok
    return buf.tobytes()


@st.composite
def images(draw) -> tuple[bytes, bool]:
    """(encoded image, whether OpenCV reads its own encoding back: not every float/alpha TIFF it writes)."""
    kind = draw(st.sampled_from([".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm"]))
    depths = {".png": ["u8", "u16"], ".tiff": ["u8", "u16", "f32"], ".ppm": ["u8", "u16"]}.get(kind, ["u8"])
    channels = draw(st.sampled_from([1, 3] if kind in (".jpg", ".ppm") else [1, 3, 4]))
    if kind == ".ppm":
        channels = 3
    depth = draw(st.sampled_from(depths))
    return (_encoded(kind, draw(st.integers(1, 40)), draw(st.integers(1, 40)), channels, depth,
                     draw(st.integers(0, 2 ** 16))), depth != "f32" and kind != ".tiff")


def _decode_or_one_line_error(blob: bytes) -> None:
    try:
        rgb = decode_image_rgb(blob, where="fuzz.png", max_pixels=1_000_000)
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        _one_line(e)
        assert isinstance(e, InputError) and str(e).startswith("fuzz.png"), e
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_fuzz_random_bytes_as_an_image(blob):
    _decode_or_one_line_error(blob)


@FUZZ
@given(image=images(), cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                max_size=6))
def test_fuzz_truncated_and_corrupted_images_of_odd_sizes_and_depths(image, cut, flips):
    image, readable = image
    _decode_or_one_line_error(image)
    if readable:  # intact: must decode
        decode_image_rgb(image, max_pixels=None)
    _decode_or_one_line_error(image[:int(len(image) * cut)])
    corrupt = bytearray(image)
    for where, byte in flips:
        corrupt[min(int(where * len(corrupt)), len(corrupt) - 1)] = byte
    _decode_or_one_line_error(bytes(corrupt))


@FUZZ
@given(w=st.integers(1, 2 ** 31 - 1), h=st.integers(1, 2 ** 31 - 1))
def test_fuzz_headers_that_claim_huge_sizes_are_refused_before_decoding(w, h):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
           + b"\x00" * 64)
    _decode_or_one_line_error(png)
    if w * h > 1_000_000:
        with pytest.raises(InputError, match="too large to decode"):
            decode_image_rgb(png, where="fuzz.png", max_pixels=1_000_000)
