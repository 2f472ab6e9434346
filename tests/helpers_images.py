"""Test helpers for process_images: bad/odd image files, a fake detector, hashing.

The fake detector finds synthetic "faces": solid squares of colour (0, 255, b) on any other
background; its score is b / 255 and its 5 points sit at fixed fractions of the square. It
subclasses detect.base.FaceDetector, so the downscaling of large images is exercised too.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(ROOT, "tests", "data", "faces")
SHARED_FACES = FACES  # the name of the folder before it moved into the repository
FAKE_LM = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])


def fake_detector_class(delay: float = 0.0):
    from detect.base import Detection, FaceDetector

    class FakeDetector(FaceDetector):
        name = "fake"
        default_min_score = 0.5

        def __init__(self, max_side: int | None = 1600, **kw):
            super().__init__(max_side)

        def _detect(self, image):
            from scipy import ndimage

            if delay:
                time.sleep(delay)
            im = image.astype(np.int16)
            mask = (im[..., 1] > 200) & (im[..., 0] < 60)
            labels, n = ndimage.label(mask)
            out = []
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                ys, xs = sl
                x0, y0, w, h = xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start
                if w < 4 or h < 4:
                    continue
                score = float(np.median(im[..., 2][labels == k])) / 255.0
                # pixel-centre box: the square covers pixels x0..x0+w-1
                box = np.array([x0 - 0.5, y0 - 0.5, w, h], dtype=np.float64)
                lm5 = box[:2] + FAKE_LM * box[2:]
                out.append(Detection(box=box, score=score, lm5=lm5))
            return out

    return FakeDetector


def register_fake(monkeypatch=None, delay: float = 0.0) -> None:
    """Add the fake backend as ``--detector fake`` (via monkeypatch when given)."""
    from detect import registry

    cls = fake_detector_class(delay)
    if monkeypatch is not None:
        monkeypatch.setitem(registry.DETECTORS, "fake", cls)
    else:
        registry.DETECTORS["fake"] = cls


def fake_main_subprocess_code(args: list[str], delay: float) -> str:
    """Python source running process_images.main(args) with the fake detector registered."""
    return (f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
            f"import helpers_images; helpers_images.register_fake(delay={delay})\n"
            f"import process_images; sys.exit(process_images.main({args!r}))\n")


def squares_image(size=(200, 160), squares=(), bg=(90, 90, 90)) -> Image.Image:
    """RGB image ``size`` (w, h) with squares ``(x, y, side, score)`` drawn as (0, 255, score*255)."""
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = bg
    for x, y, s, score in squares:
        a[y:y + s, x:x + s] = (0, 255, round(score * 255))
    return Image.fromarray(a)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(folder: str, skip=("detections", "landmarks", "debug_vis", "process_report.json")) -> dict:
    """{relative path: sha256 or 'link->target' or 'dir'} of the user's files (outputs skipped)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in skip]
        for d in dirs:
            p = os.path.join(root, d)
            out[os.path.normpath(os.path.join(rel_root, d))] = "link->" + os.readlink(p) if os.path.islink(p) else "dir"
        for f in files:
            rel = os.path.normpath(os.path.join(rel_root, f))
            if rel_root == "." and f in skip:
                continue
            p = os.path.join(root, f)
            if os.path.islink(p):
                out[rel] = "link->" + os.readlink(p)
            else:
                st = os.stat(p)
                out[rel] = (sha256(p), st.st_mtime_ns, st.st_mode)
    return out


def copy_faces(dst: str, names: list[str] | None = None) -> list[str]:
    """Copy the test photos ``names`` (default: all 28) into ``dst``; returns the names."""
    from util.image_io import list_images

    os.makedirs(dst, exist_ok=True)
    names = names or list_images(FACES)
    for n in names:
        shutil.copyfile(os.path.join(FACES, n), os.path.join(dst, n))
    return names


def _exif_orientation(value: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex.tobytes()


# Every odd case of issue 4, section 2, as (file name, expected status, expected reason); files
# derived from a face photo keep its face so that a real detector must find it.
def make_odd_files(dst: str, face: str = "000002.jpg") -> dict[str, tuple[str, str]]:
    """Write odd/bad files into ``dst``; returns {relative path: (status, reason)}."""
    os.makedirs(dst, exist_ok=True)
    src = Image.open(os.path.join(FACES, face)).convert("RGB")
    rgb = np.asarray(src)
    exp: dict[str, tuple[str, str]] = {}

    def save(name, im, status="ok", reason="", **kw):
        im.save(os.path.join(dst, name), **kw)
        exp[name] = (status, reason)

    save("upper case.JPG", src, quality=92)
    save("ext_jpeg.JPEG", src, format="JPEG", quality=92)
    save("mixed.Png", src, format="PNG")
    save("bitmap.bmp", src)
    save("web.webp", src, quality=90)
    save("tiff_upper.TIF", src, compression="tiff_lzw")
    save("tiff_long.tiff", src)
    save("gray.png", src.convert("L"))
    # 1-bit: loads fine, but thresholding wipes the face out for MTCNN (a real "no face" case)
    save("bilevel.png", src.convert("L").point(lambda v: 255 if v > 110 else 0).convert("1"), "skipped", "no_face")
    grad = np.tile(np.linspace(0, 255, 400).astype(np.uint8), (300, 1))
    save("no_face.png", Image.fromarray(grad), "skipped", "no_face")
    save("palette.png", src.convert("P", palette=Image.Palette.ADAPTIVE, colors=128))
    rgba = src.convert("RGBA")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:40] = 0  # transparent band at the top (no face there)
    rgba.putalpha(Image.fromarray(alpha))
    save("alpha.png", rgba)
    save("cmyk.jpg", src.convert("CMYK"), quality=92)
    g16 = (np.asarray(src.convert("L"), np.uint16) * 257)
    save("gray16.png", Image.fromarray(g16))
    save("gray16_tiff.tif", Image.fromarray(g16))
    # EXIF-rotated: pixels stored turned 90 deg counter-clockwise, orientation 6 ("turn 90 deg
    # clockwise to display"): the loader must give the upright photo (same detections).
    stored = src.transpose(Image.Transpose.ROTATE_90)
    save("exif_rot6.jpg", stored, quality=95, exif=_exif_orientation(6))
    save("naïve café 写真.png", src)
    save("with space.jpg", src, quality=92)
    # large: 5x the face photo (> --max_side), detections must come back in original pixels
    big = src.resize((src.width * 5, src.height * 5), Image.BICUBIC)
    save("large.jpg", big, quality=85)
    # bad files
    good_jpeg = io.BytesIO()
    src.save(good_jpeg, format="JPEG", quality=92)
    data = good_jpeg.getvalue()
    with open(os.path.join(dst, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    exp["truncated.jpg"] = ("skipped", "truncated")
    png = io.BytesIO()
    src.save(png, format="PNG")
    d = bytearray(png.getvalue())
    d[200:1200] = os.urandom(1000)  # garbage inside the compressed data
    with open(os.path.join(dst, "corrupt.png"), "wb") as f:
        f.write(bytes(d))
    exp["corrupt.png"] = ("skipped", "corrupt")
    open(os.path.join(dst, "empty.jpg"), "wb").close()
    exp["empty.jpg"] = ("skipped", "empty_file")
    with open(os.path.join(dst, "text.png"), "w") as f:
        f.write("not an image, just text\n" * 20)
    exp["text.png"] = ("skipped", "not_an_image")
    with open(os.path.join(dst, "postscript.jpeg"), "wb") as f:
        f.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" + struct.pack("<I", 0) * 10)
    exp["postscript.jpeg"] = ("skipped", "not_an_image")
    save("tiny.png", src.resize((12, 16)), "skipped", "too_small")
    os.mkdir(os.path.join(dst, "folder.jpg"))  # a folder named like a photo: searched with --recursive
    # symbolic links: to a photo elsewhere (followed), and broken
    outside = os.path.join(os.path.dirname(os.path.abspath(dst)), "outside_" + os.path.basename(dst))
    os.makedirs(outside, exist_ok=True)
    shutil.copyfile(os.path.join(FACES, "000006.jpg"), os.path.join(outside, "linked.jpg"))
    os.symlink(os.path.join(outside, "linked.jpg"), os.path.join(dst, "link.jpg"))
    exp["link.jpg"] = ("ok", "")
    os.symlink(os.path.join(outside, "nowhere.jpg"), os.path.join(dst, "broken_link.jpg"))
    exp["broken_link.jpg"] = ("skipped", "missing")
    # ignored: hidden files and non-image extensions
    src.save(os.path.join(dst, ".hidden.jpg"))
    with open(os.path.join(dst, "notes.txt"), "w") as f:
        f.write("x")
    return exp
