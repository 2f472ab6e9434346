"""Alignment: the original's POS fit, resize and crop reproduced to the pixel on real photos."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, FACES, golden_lm5
from util.landmarks import flip_y, lm68_to_5
from util.preprocess import align_img, image_to_array, load_lm3d, pos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lm3d():
    return load_lm3d(os.path.join(ROOT, "BFM"))


def test_standard_landmarks(lm3d):
    assert lm3d.shape == (5, 3)
    # image-left eye (subject's right) has the smaller x; eyes above the nose, nose above the mouth
    assert lm3d[0, 0] < lm3d[1, 0] and lm3d[3, 0] < lm3d[4, 0]
    assert lm3d[0, 1] > lm3d[2, 1] > lm3d[3, 1]


def test_pos_recovers_a_known_similarity(lm3d):
    s, t = 123.4, np.array([56.7, -8.9])
    xp = s * lm3d[:, :2].T + t[:, None]
    t_fit, s_fit = pos(xp, lm3d.T)
    np.testing.assert_allclose(t_fit, t, atol=1e-6)
    assert s_fit == pytest.approx(s, rel=1e-6)


@pytest.mark.parametrize("name", ["000002.jpg", "emma.jpg", "vd006.png"])
def test_alignment_matches_the_original_on_real_photos(name, lm3d):
    """Golden values were computed with the original implementation's align_img (tests/data)."""
    gold = json.load(open(os.path.join(DATA, "align_golden.json")))[name]
    img = Image.open(os.path.join(FACES, name)).convert("RGB")
    lm = flip_y(np.array(golden_lm5()[name], np.float32), img.size[1])
    tr, crop, lm_crop = align_img(img, lm, lm3d)
    assert crop.size == (224, 224)
    assert tr.s == pytest.approx(gold["s"], rel=1e-12)
    assert (tr.tx, tr.ty) == pytest.approx((gold["tx"], gold["ty"]), rel=1e-12)
    np.testing.assert_allclose(lm_crop, gold["lm_crop_yup"], atol=1e-9)
    assert hashlib.sha256(np.asarray(crop).tobytes()).hexdigest() == gold["crop_sha256"]


def test_rounding_is_truncation_toward_zero(lm3d):
    """The crop offsets use numpy int32 truncation: a face near the left edge gives negative left."""
    img = Image.new("RGB", (300, 300), (128, 128, 128))
    lm = np.array([[20, 150], [60, 150], [40, 130], [25, 105], [55, 105]], np.float32)  # y up
    tr, crop, _ = align_img(img, lm, lm3d)
    expected_left = w_half = tr.w / 2 - 112 + (tr.tx - 150) * tr.s
    assert tr.left == int(np.float64(expected_left).astype(np.int32)) and expected_left < 0
    assert tr.left == int(np.trunc(w_half))
    assert np.asarray(crop)[:, 0].sum() == 0  # outside the photo: black, as PIL's crop pads


def test_crop_to_image_inverts_alignment(lm3d):
    name = "000002.jpg"
    img = Image.open(os.path.join(FACES, name)).convert("RGB")
    lm_down = np.array(golden_lm5()[name], np.float32)
    tr, _, lm_crop = align_img(img, flip_y(lm_down, img.size[1]), lm3d)
    back = tr.crop_to_image(flip_y(lm_crop, 224))
    # the landmarks come back to where they were detected (within the half-pixel conventions)
    np.testing.assert_allclose(back, lm_down, atol=1.0)


def test_image_to_crop_is_the_mapping_align_img_applies(lm3d):
    name = "000002.jpg"
    img = Image.open(os.path.join(FACES, name)).convert("RGB")
    lm_up = flip_y(np.array(golden_lm5()[name], np.float64), img.size[1])
    tr, _, lm_crop = align_img(img, lm_up, lm3d)
    np.testing.assert_allclose(tr.image_to_crop(lm_up), lm_crop, atol=1e-9)
    # any other points (e.g. 68 landmarks) follow the same similarity: distances scale by s
    others = lm_up + np.array([[10.0, -4.0]])
    moved = tr.image_to_crop(others)
    np.testing.assert_allclose(moved - lm_crop, (others - lm_up) * tr.s, atol=1e-9)


def test_lm68_to_5_from_68():
    lm68 = np.random.default_rng(0).normal(size=(68, 2))
    five = lm68_to_5(lm68)
    np.testing.assert_allclose(five[0], (lm68[36] + lm68[39]) / 2)
    np.testing.assert_allclose(five[2], lm68[30])
    np.testing.assert_allclose(five[4], lm68[54])
    np.testing.assert_allclose(five[1], (lm68[42] + lm68[45]) / 2)
    np.testing.assert_allclose(five[3], lm68[48])


def test_lm68_to_5_is_one_mapping_for_arrays_and_tensors():
    """util.landmarks.lm68_to_5: (..., 68, D) NumPy or torch, batched, differentiable; the 1-based
    indices of the original (37 & 40, 43 & 46, 31, 49, 55) written out here independently."""
    import torch

    lm68 = np.random.default_rng(1).normal(size=(3, 68, 3)).astype(np.float32)
    want = np.stack([lm68[:, [36, 39]].mean(1), lm68[:, [42, 45]].mean(1), lm68[:, 30], lm68[:, 48], lm68[:, 54]], 1)
    got = lm68_to_5(lm68)
    assert got.shape == (3, 5, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    t = torch.from_numpy(lm68).requires_grad_(True)
    out = lm68_to_5(t)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5, 3)
    np.testing.assert_array_equal(out.detach().numpy(), want)
    out.sum().backward()
    assert float(t.grad[0, 36, 0]) == 0.5 and float(t.grad[0, 30, 0]) == 1.0 and float(t.grad[0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match=r"\(\.\.\., 68, D\)"):
        lm68_to_5(np.zeros((5, 2)))


def test_flip_y_round_trip():
    pts = np.array([[1.0, 2.0], [3.0, 9.0]])
    np.testing.assert_array_equal(flip_y(pts, 10), [[1.0, 7.0], [3.0, 0.0]])
    np.testing.assert_array_equal(flip_y(flip_y(pts, 10), 10), pts)


def test_image_to_array_matches_original_division():
    img = Image.fromarray(np.arange(224 * 224 * 3, dtype=np.uint32).reshape(224, 224, 3).astype(np.uint8))
    arr = image_to_array(img)
    assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, (np.asarray(img) / 255.0).astype(np.float32).transpose(2, 0, 1))
