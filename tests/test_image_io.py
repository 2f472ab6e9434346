"""The shared image loader: every odd photo gives upright RGB uint8 pixels or a clear reason."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from helpers_images import FACES, make_odd_files, sha256
from util.image_io import (ALPHA_BACKGROUND, IMAGE_EXTENSIONS, LOAD_REASONS, ImageLoadError, is_image_file,
                           list_images, load_image, load_image_array)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("odd") / "photos")
    expected = make_odd_files(d)
    hashes = {n: sha256(os.path.join(d, n)) for n in expected if os.path.isfile(os.path.join(d, n))}
    return d, expected, hashes


@pytest.fixture(scope="module")
def face_rgb():
    return np.asarray(Image.open(os.path.join(FACES, "000002.jpg")).convert("RGB"))


def test_every_odd_file_loads_or_gives_its_reason(odd):
    d, expected, hashes = odd
    for name, (status, reason) in expected.items():
        path = os.path.join(d, name)
        if reason in LOAD_REASONS:
            with pytest.raises(ImageLoadError) as e:
                load_image(path)
            assert e.value.reason == reason, name
            assert e.value.path == path and reason in str(e.value)
        else:
            im = load_image(path)
            assert im.mode == "RGB", name
            a = load_image_array(path)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.flags.c_contiguous
    # reading never changes a file
    assert {n: sha256(os.path.join(d, n)) for n in hashes} == hashes


def test_lossless_variants_give_the_same_pixels(odd, face_rgb):
    d, _, _ = odd
    for name in ("mixed.Png", "bitmap.bmp", "tiff_long.tiff", "tiff_upper.TIF", "naïve café 写真.png"):
        np.testing.assert_array_equal(load_image_array(os.path.join(d, name)), face_rgb, err_msg=name)
    gray = np.asarray(Image.fromarray(face_rgb).convert("L"))
    for name in ("gray.png", "gray16.png", "gray16_tiff.tif"):  # 16-bit: v * 257 -> v exactly
        a = load_image_array(os.path.join(d, name))
        np.testing.assert_array_equal(a, np.repeat(gray[..., None], 3, 2), err_msg=name)


def test_exif_orientation_is_applied(odd, face_rgb):
    a = load_image_array(os.path.join(odd[0], "exif_rot6.jpg"))
    assert a.shape == face_rgb.shape
    assert np.abs(a.astype(int) - face_rgb).mean() < 3  # JPEG round-off only


def test_alpha_is_composited_on_the_documented_background(odd, face_rgb):
    a = load_image_array(os.path.join(odd[0], "alpha.png"))
    assert (a[:40] == np.array(ALPHA_BACKGROUND, np.uint8)).all()
    np.testing.assert_array_equal(a[40:], face_rgb[40:])


def test_cmyk_and_palette_are_close_to_the_original(odd, face_rgb):
    for name in ("cmyk.jpg", "palette.png", "web.webp", "upper case.JPG"):
        a = load_image_array(os.path.join(odd[0], name)).astype(int)
        assert np.abs(a - face_rgb).mean() < 8, name


def test_sixteen_bit_rgb_and_32bit_and_float(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    p = str(tmp_path / "rgb16.png")
    cv2.imwrite(p, rgb16[..., ::-1])  # cv2 writes BGR
    a = load_image_array(p).astype(int)
    assert np.abs(a - (rgb16.astype(int) >> 8)).max() <= 1
    i32 = (np.arange(600, dtype=np.int32).reshape(20, 30) * 100)
    p = str(tmp_path / "int32.tif")
    Image.fromarray(i32, "I").save(p)
    assert Image.open(p).mode == "I"
    np.testing.assert_array_equal(load_image_array(p)[..., 0], np.round(np.clip(i32, 0, 65535) / 257).astype(np.uint8))
    f = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    p = str(tmp_path / "float.tif")
    Image.fromarray(f, "F").save(p)
    np.testing.assert_array_equal(load_image_array(p)[..., 1], np.round(f * 255).astype(np.uint8))


def test_palette_with_transparency_and_la(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.info["transparency"] = 1
    path = str(tmp_path / "ptrans.png")
    p.save(path, transparency=1)
    assert (load_image_array(path) == np.array(ALPHA_BACKGROUND)).all()
    la = Image.merge("LA", [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 0)])
    la.save(str(tmp_path / "la.png"))
    assert (load_image_array(str(tmp_path / "la.png")) == np.array(ALPHA_BACKGROUND)).all()


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    path = str(tmp_path / "big.png")
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 90 000 px > 2 x limit
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert e.value.reason == "too_large"


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageLoadError) as e:
        load_image(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "missing"
    os.mkdir(tmp_path / "dir.jpg")
    with pytest.raises(ImageLoadError) as e:
        load_image(str(tmp_path / "dir.jpg"))
    assert e.value.reason == "not_a_file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    p = tmp_path / "locked.jpg"
    Image.new("RGB", (30, 30)).save(p)
    os.chmod(p, 0)
    try:
        with pytest.raises(ImageLoadError) as e:
            load_image(str(p))
        assert e.value.reason == "permission_denied"
    finally:
        os.chmod(p, 0o644)


def test_extensions_any_case():
    for ext in IMAGE_EXTENSIONS:
        assert is_image_file("a" + ext) and is_image_file("a" + ext.upper())
    assert not is_image_file("a.txt") and not is_image_file("jpg")


def test_list_images_skips_outputs_hidden_and_follows_links(tmp_path):
    root = tmp_path / "photos"
    for rel in ("a.jpg", "B.PNG", "sub/c.webp", "sub/deeper/d.tif", "detections/x.jpg", "landmarks/y.png",
                "debug_vis/a.jpg", "sub/debug_vis/z.jpg", ".hidden/e.jpg", ".f.jpg", "notes.txt"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    os.symlink(root / "sub", root / "sub_link")  # same folder twice: listed once
    os.symlink(root, root / "sub" / "loop")  # cycle
    assert list_images(str(root)) == ["B.PNG", "a.jpg"]
    assert list_images(str(root), recursive=True) == ["B.PNG", "a.jpg", "sub/c.webp", "sub/deeper/d.tif"]
    with pytest.raises(NotADirectoryError):
        list_images(str(root / "a.jpg"))
