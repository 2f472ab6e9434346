"""Alignment of a photo to the 224x224 crop the regressor expects (the original's ``align_img``).

The 5 detected points are fitted to the 5 standard 3D landmarks of ``similarity_Lm3D_all.mat`` by
least squares (a scaled orthographic camera, "POS"), giving a scale ``s`` and translation ``t``.
The photo is then resized by ``s`` with PIL bicubic and cropped to 224x224, with the original's
integer truncations, because the regressor's numbers hinge on exactly those pixels.

Coordinates: detections on disk are image pixels with y down. Like the original, the point
arrays inside alignment are y up (``y_up = H - 1 - y_down``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from util.assets import require_file

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0
# 1-based indices into the 68 landmarks: nose tip, eye corners (2+2), mouth corners
_LM68_TO_5 = np.array([31, 37, 40, 43, 46, 49, 55]) - 1


def extract_5p(lm68: np.ndarray) -> np.ndarray:
    """(68, D) landmarks -> (5, D): left eye centre, right eye centre, nose tip, mouth corners."""
    i = _LM68_TO_5
    five = np.stack([lm68[i[0]], lm68[i[[1, 2]]].mean(0), lm68[i[[3, 4]]].mean(0), lm68[i[5]], lm68[i[6]]], 0)
    return five[[1, 2, 0, 3, 4]]


def load_lm3d(bfm_folder: str) -> np.ndarray:
    """The 5 standard 3D landmarks (5, 3) float32 from ``bfm_folder/similarity_Lm3D_all.mat``."""
    from scipy.io import loadmat

    path = require_file(os.path.join(bfm_folder, "similarity_Lm3D_all.mat"), "Standard landmarks",
                        "It ships with this project in BFM/; point --bfm_folder at a folder holding it.")
    return extract_5p(loadmat(path)["lm"])


def pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares scaled orthographic fit of 3D points to 2D points.

    Args:
        xp: (2, n) image points (y up).  x: (3, n) model points.
    Returns:
        t: (2,) translation in image pixels; s: scale (mean norm of the two projection rows).
    """
    n = xp.shape[1]
    a = np.zeros([2 * n, 8])
    a[0::2, 0:3] = x.T
    a[0::2, 3] = 1
    a[1::2, 4:7] = x.T
    a[1::2, 7] = 1
    b = np.reshape(xp.T, [2 * n, 1])
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3, 0], k[7, 0]]), float(s)


@dataclass(frozen=True)
class AlignTransform:
    """How a photo of size (w0, h0) became the 224 crop: resize to (w, h), crop at (left, up).

    ``s`` is the original's scale and (tx, ty) its translation (``trans_params`` of the original
    are ``[w0, h0, s, tx, ty]``).
    """

    w0: int
    h0: int
    s: float
    tx: float
    ty: float
    w: int
    h: int
    left: int
    up: int

    @property
    def trans_params(self) -> np.ndarray:
        return np.array([self.w0, self.h0, self.s, self.tx, self.ty])

    def image_to_crop(self, pts_yup: np.ndarray, size: float = 224) -> np.ndarray:
        """(K, 2) photo points, y up -> crop points, y up: the mapping :func:`align_img` applies to
        the landmarks it is given (``size`` is its ``target_size``)."""
        pts = np.asarray(pts_yup, dtype=np.float64)
        p = np.stack([pts[:, 0] - self.tx + self.w0 / 2, pts[:, 1] - self.ty + self.h0 / 2], axis=1) * self.s
        return p - np.array([[self.w / 2 - size / 2, self.h / 2 - size / 2]])

    def crop_to_image(self, pts: np.ndarray) -> np.ndarray:
        """(..., 2) crop pixels, y down -> photo pixels, y down (inverse of PIL's resize + crop)."""
        pts = np.asarray(pts, dtype=np.float64)
        x = (pts[..., 0] + self.left + 0.5) * (self.w0 / self.w) - 0.5
        y = (pts[..., 1] + self.up + 0.5) * (self.h0 / self.h) - 0.5
        return np.stack([x, y], axis=-1)


def _int32(v) -> int:
    """numpy ``astype(np.int32)`` semantics (truncation toward zero), as the original uses."""
    return int(np.asarray(v, dtype=np.float64).astype(np.int32))


def align_params(img_size: tuple[int, int], lm: np.ndarray, lm3d: np.ndarray, target_size: float = TARGET_SIZE,
                 rescale_factor: float = RESCALE_FACTOR) -> tuple[AlignTransform, np.ndarray]:
    """The alignment of a (W0, H0) photo with landmarks ``lm`` (as :func:`align_img`) without
    making the crop: (transform, ``lm`` in crop pixels, y up). The crop is the photo resized to
    (transform.w, transform.h), PIL bicubic, then cropped at (left, up) to target_size."""
    w0, h0 = img_size
    lm5 = lm if lm.shape[0] == 5 else extract_5p(lm)
    t, s = pos(lm5.T, lm3d.T)
    s = rescale_factor / s
    w, h = _int32(w0 * s), _int32(h0 * s)
    if w < 1 or h < 1:
        raise ValueError(f"alignment scale {s:.4g} shrinks the {w0}x{h0} photo to nothing; "
                         "are the landmarks those of a face?")
    left = _int32(w / 2 - target_size / 2 + (t[0] - w0 / 2) * s)
    up = _int32(h / 2 - target_size / 2 + (h0 / 2 - t[1]) * s)
    transform = AlignTransform(w0, h0, float(s), float(t[0]), float(t[1]), w, h, left, up)
    return transform, transform.image_to_crop(lm, target_size)


def crop_box(transform: AlignTransform, target_size: float = TARGET_SIZE) -> tuple[int, int, int, int]:
    """The crop's box in the resized photo: (left, up, right, low)."""
    size = int(target_size)
    return transform.left, transform.up, transform.left + size, transform.up + size


def align_img(img: Image.Image, lm: np.ndarray, lm3d: np.ndarray, target_size: float = TARGET_SIZE,
              rescale_factor: float = RESCALE_FACTOR) -> tuple[AlignTransform, Image.Image, np.ndarray]:
    """Align a photo to the standard face crop.

    Args:
        img: RGB PIL image (W0 x H0).
        lm: (5, 2) or (68, 2) landmarks in photo pixels, **y up** (``H0 - 1 - y_down``).
        lm3d: (5, 3) standard landmarks from :func:`load_lm3d`.
    Returns:
        transform, the (target_size x target_size) RGB crop, and ``lm`` in crop pixels, y up.
    """
    transform, lm_new = align_params(img.size, lm, lm3d, target_size, rescale_factor)
    crop = resize_crop(img, (transform.w, transform.h), crop_box(transform, target_size))
    return transform, crop, lm_new


def _source_range(n0: int, n: int, first: int, last: int) -> tuple[int, int]:
    """Input pixels [a, b) that PIL's bicubic resize of a length-``n0`` axis to ``n`` reads for
    output pixels ``first..last`` (inclusive), plus a margin of 2 each side.

    PIL (Resample.c ``precompute_coeffs``) gives output pixel x the inputs within
    ``support = 2 * max(n0 / n, 1)`` of ``center = (x + 0.5) * n0 / n``."""
    scale = n0 / n
    support = 2.0 * max(scale, 1.0)
    a = math.floor((first + 0.5) * scale - support) - 2
    b = math.ceil((last + 0.5) * scale + support) + 2
    return max(0, a), min(n0, b)


def pil_vertical_first(w0: int, h0: int, w: int, h: int) -> bool | None:
    """Whether the installed Pillow resizes (w0, h0) -> (w, h) vertical pass first; None if unknown.

    Pillow <= 12.1 always runs the horizontal pass first (Resample.c since Pillow 3.3). Pillow 13
    runs the vertical pass first "if height is being scaled down more than twice the amount the
    width is" (pull request 9549). 12.2-12.x kept the C order and added a Python-level vertical
    first step only for photos more than 100 times taller than wide (pull request 9524): those
    return None here, every other photo False. Versions whose rule is not known here return None
    (the caller then resizes the whole photo, which is exact whatever the order, but slower)."""
    import PIL

    major, minor = (int(p) for p in PIL.__version__.split(".")[:2])
    if major < 12 or (major == 12 and minor <= 1):
        return False
    if major == 12:
        return None if h0 > 100 * w0 else False
    if major == 13:
        return (h0 - h) > 0 and (h0 - h) > (w0 - w) * 2
    return None


def resize_crop(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """``img.resize(size, BICUBIC).crop(box)``, pixel for pixel, without resizing the whole photo.

    PIL resizes in two passes (horizontal and vertical; which one first depends on the sizes and
    the Pillow version), each rounding to 8 bits, and the coefficients of a pass depend only on
    its input and output lengths. Resizing just a *box* of the photo would not do: PIL takes the
    box as float32 and its filter positions move, so 0.01-10% of the pixels change by 1-4 levels
    (checked on the test photos). Instead each pass is run by PIL itself, with the full-size
    coefficients, on only the pixels the crop depends on (horizontal first shown; vertical first
    is the same with rows and columns swapped):

    1. the source rows the crop needs (an integer crop: rows are independent in a horizontal
       pass), resized to the full width ``w`` at their own height (PIL skips the vertical pass);
    2. the crop's columns of that, placed at their rows in a black image of the photo's full
       height (rows the crop never reads), resized to the full height ``h`` at their own width
       (PIL skips the horizontal pass);
    3. the crop's rows of that; parts of ``box`` outside the resized photo stay black, as PIL's
       ``crop`` pads.

    The work shrinks from about (H0 + h) * w pixel-taps to (rows needed) * w + h * (box width):
    2x on the test photos, 3.6x on a 3913x1901 one. tests/test_throughput.py checks the identity
    on every test photo and on thousands of synthetic cases covering both pass orders.
    """
    w, h = size
    w0, h0 = img.size
    left, up, right, low = box
    vertical_first = pil_vertical_first(w0, h0, w, h)
    bicubic = Image.Resampling.BICUBIC
    if vertical_first is None:
        return img.resize((w, h), resample=bicubic).crop(box)
    out = Image.new(img.mode, (right - left, low - up))
    x0, x1 = max(left, 0), min(right, w)  # the part of the box inside the resized photo
    y0, y1 = max(up, 0), min(low, h)
    if x0 >= x1 or y0 >= y1:
        return out
    if not vertical_first:
        r0, r1 = _source_range(h0, h, y0, y1 - 1)
        rows = img.crop((0, r0, w0, r1)).resize((w, r1 - r0), bicubic, box=(0, 0, w0, r1 - r0))
        tall = Image.new(img.mode, (x1 - x0, h0))
        tall.paste(rows.crop((x0, 0, x1, r1 - r0)), (0, r0))
        part = tall.resize((x1 - x0, h), bicubic, box=(0, 0, x1 - x0, h0)).crop((0, y0, x1 - x0, y1))
    else:
        c0, c1 = _source_range(w0, w, x0, x1 - 1)
        cols = img.crop((c0, 0, c1, h0)).resize((c1 - c0, h), bicubic, box=(0, 0, c1 - c0, h0))
        wide = Image.new(img.mode, (w0, y1 - y0))
        wide.paste(cols.crop((0, y0, c1 - c0, y1)), (c0, 0))
        part = wide.resize((w, y1 - y0), bicubic, box=(0, 0, w0, y1 - y0)).crop((x0, 0, x1, y1 - y0))
    out.paste(part, (x0 - left, y0 - up))
    return out


def flip_y(points: np.ndarray, height: int) -> np.ndarray:
    """Convert (..., 2) points between y-down and y-up pixel conventions: y' = height - 1 - y."""
    out = np.array(points, copy=True)
    out[..., 1] = height - 1 - out[..., 1]
    return out


def image_to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32 in 0..1, computed as the original (float64 / 255, then float32)."""
    return (np.asarray(img, dtype=np.uint8) / 255.0).astype(np.float32).transpose(2, 0, 1).copy()


def unit_float_table() -> np.ndarray:
    """(256,) float32: byte k -> the value :func:`image_to_array` gives it (float64 k / 255, then
    float32). ``unit_float_table()[u8]`` converts a uint8 crop exactly as the original does."""
    return (np.arange(256, dtype=np.uint8) / 255.0).astype(np.float32)
