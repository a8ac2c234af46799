"""Host pre/post-processing: input validation, colour order, resize, normalisation, map resize."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from stlm_deploy.errors import InputError
from stlm_deploy.preprocess import (make_input, normalize_nchw, prepare_batch, resize_image, resize_map,
                                    split_images, validate_image)
from stlm_deploy.spec import DEFAULT_MEAN, DEFAULT_STD, EngineSpec

from .conftest import sample_image


@pytest.mark.parametrize("bad, got", [
    (np.zeros((8, 8, 3), np.float32), "got float32 (8, 8, 3)"),
    (np.zeros((8, 8), np.uint8), "got uint8 (8, 8)"),
    (np.zeros((8, 8, 4), np.uint8), "got uint8 (8, 8, 4)"),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), "got uint8 (1, 2, 8, 8, 3)"),
    (np.zeros((0, 8, 3), np.uint8), "got uint8 (0, 8, 3)"),
    ("cat.png", "got str"),
])
def test_bad_inputs_give_one_line_input_error(bad, got):
    with pytest.raises(InputError) as ei:
        split_images(bad)
    msg = str(ei.value)
    assert msg.startswith("image: expected uint8 RGB array of shape (H, W, 3) or (N, H, W, 3)")
    assert msg.endswith(got) and "\n" not in msg


def test_list_elements_are_named():
    with pytest.raises(InputError, match=r"^image\[1\]: expected uint8 RGB array of shape \(H, W, 3\), got "
                                         r"uint16 \(4, 4, 3\)$"):
        split_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint16)])


def test_split_images_forms():
    one = np.zeros((5, 6, 3), np.uint8)
    assert split_images(one)[1] is True and len(split_images(one)[0]) == 1
    imgs, single = split_images(np.zeros((3, 5, 6, 3), np.uint8))
    assert not single and len(imgs) == 3
    imgs, single = split_images([one, np.zeros((7, 2, 3), np.uint8)])
    assert not single and [i.shape for i in imgs] == [(5, 6, 3), (7, 2, 3)]
    assert split_images([]) == ([], False)
    assert validate_image(one) is one


def test_resize_matches_cv2_bilinear_and_skips_same_size():
    img = sample_image(97, 131)
    out = resize_image(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR))
    same = sample_image(64, 64)
    np.testing.assert_array_equal(resize_image(same, 64), same)
    # non-contiguous views (e.g. a channel flip) are accepted
    np.testing.assert_array_equal(resize_image(img[:, :, ::-1], 64), cv2.resize(np.ascontiguousarray(img[:, :, ::-1]),
                                                                                 (64, 64)))


def test_resize_uses_half_pixel_centres():
    # 2x upsampling of [0, 100] with half-pixel centres gives 0, 25, 75, 100 (align_corners=False)
    row = np.array([[0, 100]], np.float32)
    up = cv2.resize(row, (4, 1), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_map(row, (1, 4)), up)
    np.testing.assert_allclose(up[0], [0, 25, 75, 100])


def test_prepare_batch_bgr_and_sizes():
    a, b = sample_image(40, 80, 1), sample_image(64, 64, 2)
    batch, sizes = prepare_batch([a, b], 64, bgr=True)
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8 and sizes == [(40, 80), (64, 64)]
    np.testing.assert_array_equal(batch[1], b[:, :, ::-1])
    np.testing.assert_array_equal(batch[0], cv2.resize(a[:, :, ::-1].copy(), (64, 64)))


def test_normalisation_for_unfused_engines():
    batch = np.stack([sample_image(64, 64, 3), sample_image(64, 64, 4)])
    x = normalize_nchw(batch, DEFAULT_MEAN, DEFAULT_STD)
    ref = ((batch.astype(np.float64) - np.array(DEFAULT_MEAN)) / np.array(DEFAULT_STD)).transpose(0, 3, 1, 2)
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    unfused = EngineSpec.create("u", 64, opset=17, fused_preprocessing=False)
    np.testing.assert_array_equal(make_input(batch, unfused), x)
    fused = EngineSpec.create("f", 64, opset=17)
    assert make_input(batch, fused).dtype == np.uint8


def test_resize_map_back_to_original_size():
    m = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    out = resize_map(m, (100, 37))
    assert out.shape == (100, 37) and out.dtype == np.float32
    np.testing.assert_allclose(out, cv2.resize(m, (37, 100), interpolation=cv2.INTER_LINEAR))
    assert resize_map(m, (64, 64)) is not None and resize_map(m, (64, 64)).shape == (64, 64)
