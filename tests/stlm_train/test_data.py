"""Image I/O conversions, the four data-set layouts, and the procedural data set."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from stlm_train.data import (
    AnomalyDataset,
    DataError,
    Sample,
    build_dataset,
    list_images,
    make_generated_dataset,
    read_image_rgb,
    read_mask,
    resize_mask,
    resize_rgb,
)
from stlm_train.data import generated as gen


def _write_png(path: Path, arr: np.ndarray, color_type: int) -> None:
    """Minimal PNG writer: OpenCV cannot write grey+alpha (colour type 4) files."""
    h = arr.shape[0]
    depth = 16 if arr.dtype == np.uint16 else 8
    data = arr.astype(">u2") if depth == 16 else arr.astype(np.uint8)
    rows = np.ascontiguousarray(data).view(np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", arr.shape[1], h, depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _img(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _save_mask(path: Path, mask01: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (mask01 > 0).astype(np.uint8) * 255)
    return path


# ------------------------------------------------------------------------------------------- I/O


def test_read_rgb_colour_png_swaps_bgr(tmp_path: Path) -> None:
    rgb = _img()
    out = read_image_rgb(_save_rgb(tmp_path / "c.png", rgb))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_grey_png_replicated(tmp_path: Path) -> None:
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_image_rgb(tmp_path / "g.png")
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = _img()
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full(rgb.shape[:2], 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "a.png"), rgb)


def test_read_grey_alpha_png(tmp_path: Path) -> None:
    grey = (np.arange(12 * 16) % 251).astype(np.uint8).reshape(12, 16)
    _write_png(tmp_path / "ga.png", np.dstack([grey, np.full_like(grey, 3)]), color_type=4)
    out = read_image_rgb(tmp_path / "ga.png")
    assert out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_read_16bit_png_and_tiff_scaled_not_truncated(tmp_path: Path) -> None:
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    grey16 = k * 257  # exact 16-bit images of 0..255
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    out = read_image_rgb(tmp_path / "g16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], k.astype(np.uint8))
    # 1000/65535*255 = 3.89 -> 4 (truncating to the high byte would give 3)
    colour16 = np.zeros((4, 4, 3), np.uint16)
    colour16[..., 0] = 1000  # B
    colour16[..., 2] = 65535  # R
    cv2.imwrite(str(tmp_path / "c16.tif"), colour16)
    out = read_image_rgb(tmp_path / "c16.tif")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [255, 0, 4])


def test_read_mask_binary(tmp_path: Path) -> None:
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 3:7] = 255
    m[8, 8] = 1
    cv2.imwrite(str(tmp_path / "m.png"), m)
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    assert out.sum() == 12 + 1
    colour = np.zeros((10, 10, 3), np.uint8)
    colour[1, 1, 2] = 200
    cv2.imwrite(str(tmp_path / "mc.png"), colour)
    assert read_mask(tmp_path / "mc.png").sum() == 1


def test_read_errors_are_one_line_and_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "x.png"
    with pytest.raises(DataError) as exc:
        read_image_rgb(missing)
    msg = str(exc.value)
    assert "\n" not in msg and str(missing) in msg and "no such file" in msg
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError) as exc:
        read_mask(bad)
    msg = str(exc.value)
    assert "\n" not in msg and str(bad) in msg
    assert "cannot decode as a mask (unsupported format, empty or corrupt file)" in msg
    assert isinstance(exc.value, ValueError)


def test_list_images_case_insensitive_sorted(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.JpEg", "d.bmp", "e.TIF", "f.tiff", "notes.txt", "z.gif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder with an image suffix is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp", "e.TIF", "f.tiff"]
    assert list_images(tmp_path / "missing") == []


def test_resize_helpers() -> None:
    img = _img(30, 40)
    assert resize_rgb(img, 16).shape == (16, 16, 3)
    assert resize_rgb(img, (8, 12)).shape == (8, 12, 3)
    m = np.zeros((30, 40), np.uint8)
    m[10:20, 10:30] = 1
    r = resize_mask(m, 64)
    assert r.shape == (64, 64) and set(np.unique(r)) == {0, 1}


# --------------------------------------------------------------------------------- MVTec (real)


def test_mvtec_real_sample(sample_dir: Path) -> None:
    train = build_dataset(sample_dir, "mvtec", split="train", img_size=256)
    test = build_dataset(sample_dir, "mvtec", split="test", img_size=256)
    assert isinstance(train, AnomalyDataset) and len(train) == 5 and len(test) == 10
    assert train.labels.tolist() == [0] * 5
    assert sorted(test.labels.tolist()) == [0] * 5 + [1] * 5
    assert test.has_pixel_labels
    for i in range(len(test)):
        s = test[i]
        assert isinstance(s, Sample)
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (256, 256) and s.mask.dtype == np.uint8
        assert set(np.unique(s.mask)) <= {0, 1}
        p = Path(s.path)
        assert s.defect == p.parent.name
        if s.label == 1:
            assert s.defect == "broken_large" and s.mask.sum() > 100
            gt = sample_dir / "ground_truth" / "broken_large" / f"{p.stem}_mask.png"
            np.testing.assert_array_equal(s.mask, resize_mask(read_mask(gt), 256))
        else:
            assert s.defect == "good" and s.mask.sum() == 0
    # Native resolution: the mask has the image's own size.
    full = build_dataset(sample_dir, "mvtec", split="test", img_size=None)
    s = full[0]
    assert s.image.shape == (900, 900, 3) and s.mask.shape == (900, 900)
    # The data-set root plus a category name finds the same folder.
    by_cat = build_dataset(sample_dir.parent, "mvtec", category=sample_dir.name, split="test")
    assert by_cat.paths == test.paths


def test_mvtec_batches_with_torch_default_collate(sample_dir: Path) -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    ds = build_dataset(sample_dir, "mvtec", split="test", img_size=64)
    batch = torch_data.default_collate([ds[0], ds[9]])
    assert tuple(batch.image.shape) == (2, 64, 64, 3)
    assert tuple(batch.mask.shape) == (2, 64, 64)
    assert batch.label.tolist() == [ds.labels[0], ds.labels[9]]
    assert len(batch.path) == 2


def test_mvtec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_dataset(tmp_path / "absent", "mvtec")
    assert str(tmp_path / "absent") in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        build_dataset(tmp_path / "cat", "mvtec", split="train")
    msg = str(exc.value)
    assert str(tmp_path / "cat" / "train" / "good") in msg and "train/good" in msg
    # a defect image without its mask
    _save_rgb(tmp_path / "cat" / "test" / "crack" / "000.png", _img())
    with pytest.raises(DataError, match="missing mask"):
        build_dataset(tmp_path / "cat", "mvtec", split="test")
    with pytest.raises(DataError, match="unknown data format"):
        build_dataset(tmp_path / "cat", "coco")
    # data-set root without a category
    with pytest.raises(DataError, match="category"):
        build_dataset(tmp_path, "mvtec")


# ------------------------------------------------------------------------------ generated data


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_generated_deterministic_and_loadable(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = make_generated_dataset(tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - t0
    b = make_generated_dataset(tmp_path / "b", seed=3)
    c = make_generated_dataset(tmp_path / "c", seed=4)
    assert elapsed < 4.0  # about 0.4 s on 2 cores; generous for loaded machines
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == 16 + 6 + 6 + 6
    assert da == db
    assert sum(da[k] != dc[k] for k in da) == len(da)

    train = build_dataset(a, "mvtec", split="train", img_size=128)
    test = build_dataset(a, "mvtec", split="test", img_size=128)
    assert len(train) == 16 and len(test) == 12 and int(test.labels.sum()) == 6
    assert set(test.defects) == {"good", "defect"}
    for i in np.flatnonzero(test.labels):
        assert test[int(i)].mask.sum() > 0


def test_generated_masks_match_drawn_pixels(tmp_path: Path) -> None:
    root = make_generated_dataset(tmp_path / "g", n_train=2, n_test_good=1, n_test_bad=4, size=96, seed=7)
    pal = gen._palette(7)
    for i in range(4):
        clean, _disc = gen._render_good(gen._rng(7, gen._SPLIT_IDS["test_bad"], i), 96, pal)
        bad = read_image_rgb(root / "test" / "defect" / f"{i:03d}.png")
        mask = read_mask(root / "ground_truth" / "defect" / f"{i:03d}_mask.png")
        changed = np.any(bad != clean, axis=2)
        assert mask.sum() > 0
        np.testing.assert_array_equal(changed, mask.astype(bool))
    # Good images of the product are similar to each other, not random noise.
    g0 = read_image_rgb(root / "train" / "good" / "000.png").astype(float)
    g1 = read_image_rgb(root / "train" / "good" / "001.png").astype(float)
    assert np.abs(g0 - g1).mean() < 30


def test_texture_set_grey_sizes_vary_and_masks_cover_the_changes(tmp_path: Path) -> None:
    from stlm_train.data import make_texture_dataset
    from stlm_train.data import texture as tex

    a = make_texture_dataset(tmp_path / "a", n_train=6, n_test_good=2, n_test_bad=5, sides=(64, 160), seed=2)
    assert _digest(a) == _digest(make_texture_dataset(tmp_path / "b", n_train=6, n_test_good=2, n_test_bad=5,
                                                      sides=(64, 160), seed=2))
    raw = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((a / "train" / "good").glob("*.png"))]
    assert all(r.ndim == 2 for r in raw)  # single-channel files: the loader's grey path
    assert len({r.shape for r in raw}) > 3 and all(64 <= min(r.shape) and max(r.shape) <= 160 for r in raw)
    period = float(tex._rng(2, 98).uniform(10.0, 14.0))
    for i in range(5):
        rng = tex._rng(2, tex._SPLIT_IDS["test_bad"], i)
        clean = tex._surface(rng, (int(rng.integers(64, 161)), int(rng.integers(64, 161))), period)
        clean = np.clip(np.rint(clean), 0, 255).astype(np.uint8)
        bad = cv2.imread(str(a / "test" / "defect" / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED)
        mask = read_mask(a / "ground_truth" / "defect" / f"{i:03d}_mask.png").astype(bool)
        changed = bad != clean
        assert mask.any() and not (changed & ~mask).any()  # nothing changed outside the mask
        assert changed[mask].mean() > 0.8  # and the mask is what changed (a flattened patch may equal a pixel)
    test = build_dataset(a, "mvtec", split="test", img_size=64)
    assert len(test) == 7 and int(test.labels.sum()) == 5 and test[0].image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="sides"):
        make_texture_dataset(tmp_path / "c", sides=(200, 100))


# ---------------------------------------------------------------------------------------- VisA


def _make_visa(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:03d}.JPG"
            _save_rgb(root / rel, _img(seed=i))
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _save_rgb(root / rel, _img(seed=10 + i))
            m = np.zeros((12, 16), np.uint8)
            m[2 + i : 6, 3:9] = 1
            _save_mask(root / mrel, m)
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    # an anomaly in the train split (as in VisA's 2cls files) must never be trained on
    rows.append("candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def test_visa_layout(tmp_path: Path) -> None:
    _make_visa(tmp_path)
    train = build_dataset(tmp_path, "visa", category="candle", split="train", img_size=32)
    test = build_dataset(tmp_path, "visa", category="candle", split="test", img_size=32)
    assert len(train) == 2 and train.labels.tolist() == [0, 0]
    assert len(test) == 3 and test.labels.tolist() == [0, 1, 1]
    assert all("candle" in p for p in test.paths)
    s = test[2]
    assert s.label == 1 and s.defect == "anomaly" and s.image.shape == (32, 32, 3)
    expected = resize_mask(read_mask(tmp_path / "candle/Data/Masks/Anomaly/001.png"), 32)
    np.testing.assert_array_equal(s.mask, expected)
    assert test[0].mask.sum() == 0
    both = build_dataset(tmp_path, "visa", split="test")
    assert len(both) == 6
    with pytest.raises(DataError, match="pcb1"):
        build_dataset(tmp_path, "visa", category="macaroni9", split="test")
    with pytest.raises(DataError, match="1cls.csv"):
        build_dataset(tmp_path / "candle", "visa")


# ---------------------------------------------------------------------------------------- DAGM


def _make_dagm(cls_dir: Path, with_labels_txt: bool) -> None:
    for split, n, defective in (("Train", 5, {1, 3}), ("Test", 4, {2})):
        folder = cls_dir / split
        lines = ["1"]
        for i in range(n):
            name = f"{i:04d}.PNG"
            assert cv2.imwrite(_mk(folder / name), _img(seed=i)[..., 0])
            if i in defective:
                m = np.zeros((12, 16), np.uint8)
                m[3:8, 4:10] = 1
                _save_mask(folder / "Label" / f"{i:04d}_label.PNG", m)
                lines.append(f"{i + 1}\t1\t{name}\t0\t{i:04d}_label.PNG")
            else:
                lines.append(f"{i + 1}\t0\t{name}\t0\t0")
        if with_labels_txt:
            (folder / "Label").mkdir(exist_ok=True)
            (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")


def _mk(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.mark.parametrize("with_labels_txt", [True, False])
def test_dagm_layout(tmp_path: Path, with_labels_txt: bool) -> None:
    _make_dagm(tmp_path / "Class1", with_labels_txt)
    train = build_dataset(tmp_path, "dagm", category="Class1", split="train", img_size=24)
    assert len(train) == 3 and train.labels.tolist() == [0, 0, 0]
    assert [Path(p).name for p in train.paths] == ["0000.PNG", "0002.PNG", "0004.PNG"]
    test = build_dataset(tmp_path / "Class1", "dagm", split="test", img_size=24)
    assert test.labels.tolist() == [0, 0, 1, 0]
    s = test[2]
    assert s.image.shape == (24, 24, 3) and s.mask.sum() > 0 and s.defect == "defect"
    np.testing.assert_array_equal(s.image[..., 0], s.image[..., 2])  # grey source
    with pytest.raises(DataError, match="Class9|Train"):
        build_dataset(tmp_path, "dagm", category="Class9")


def test_dagm_labels_txt_wins_over_stray_label_files(tmp_path: Path) -> None:
    _make_dagm(tmp_path / "Class2", with_labels_txt=True)
    # a stray label image for a listed-good file is ignored when Labels.txt exists
    _save_mask(tmp_path / "Class2" / "Test" / "Label" / "0000_label.PNG", np.ones((12, 16), np.uint8))
    test = build_dataset(tmp_path / "Class2", "dagm", split="test")
    assert test.labels.tolist() == [0, 0, 1, 0]


# -------------------------------------------------------------------------------------- folder


def test_folder_layout(tmp_path: Path) -> None:
    for i in range(3):
        _save_rgb(tmp_path / "good" / f"g{i}.png", _img(seed=i))
    for i in range(2):
        _save_rgb(tmp_path / "scratch" / f"s{i}.png", _img(seed=20 + i))
    m = np.zeros((12, 16), np.uint8)
    m[1:4, 1:4] = 1
    _save_mask(tmp_path / "masks" / "scratch" / "s0_mask.png", m)
    _save_mask(tmp_path / "masks" / "scratch" / "s1.png", m)
    _save_rgb(tmp_path / "dent" / "d0.jpg", _img(seed=30))
    _save_mask(tmp_path / "ground_truth" / "dent" / "d0_mask.png", m)

    train = build_dataset(tmp_path, "folder", split="train", img_size=16)
    assert len(train) == 3  # no train/good: good/ is used
    test = build_dataset(tmp_path, "folder", split="test", img_size=16)
    assert len(test) == 6 and int(test.labels.sum()) == 3
    assert sorted(set(test.defects)) == ["dent", "good", "scratch"]
    assert test.has_pixel_labels
    for i in np.flatnonzero(test.labels):
        assert test[int(i)].mask.sum() > 0

    for i in range(4):
        _save_rgb(tmp_path / "train" / "good" / f"t{i}.png", _img(seed=40 + i))
    assert len(build_dataset(tmp_path, "folder", split="train")) == 4
    # a defect image without a mask: allowed, but pixel labels are then incomplete
    _save_rgb(tmp_path / "stain" / "x.png", _img(seed=50))
    test = build_dataset(tmp_path, "folder", split="test")
    assert not test.has_pixel_labels and len(test) == 7


def test_folder_empty_split_names_folder(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    with pytest.raises(DataError) as exc:
        build_dataset(tmp_path, "folder", split="train")
    msg = str(exc.value)
    assert str(tmp_path / "good") in msg and "good/*.png" in msg and "\n" not in msg
