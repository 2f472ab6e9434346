"""Alignment of a photo to the 224x224 crop the regressor expects (the original's ``align_img``).

The 5 detected points are fitted to the 5 standard 3D landmarks of ``similarity_Lm3D_all.mat`` by
least squares (a scaled orthographic camera, "POS"), giving a scale ``s`` and translation ``t``.
The photo is then resized by ``s`` with PIL bicubic and cropped to 224x224, with the original's
integer truncations, because the regressor's numbers hinge on exactly those pixels.

Coordinates: detections on disk are image pixels with y down. Like the original, the point
arrays inside alignment are y up (``y_up = H - 1 - y_down``, :func:`util.landmarks.flip_y`); the
68 -> 5 point mapping is :func:`util.landmarks.lm68_to_5`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from util.assets import error_line, require_file
from util.landmarks import lm68_to_5
from util.mat_cache import load_cached

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0
MIN_POINT_SPREAD = 2.0  # pixels: 5 points closer together than this are no face's
MAX_ALIGNED_SIDE = 1 << 20  # pixels: the photo resized for the crop may not be larger (int32-safe)
_REDO = "re-run ./process_images.sh on the folder"


class AlignmentError(ValueError):
    """The landmarks of a face cannot be aligned (not finite, all at one place, off the photo);
    the message says why, in one line."""


def load_lm3d(bfm_folder: str) -> np.ndarray:
    """The 5 standard 3D landmarks the alignment fits detections to.

    Args:
        bfm_folder: the folder holding ``similarity_Lm3D_all.mat`` (68 3D points, key ``lm``).

    Returns:
        (5, 3) float32: the 68 points reduced to 5 (:func:`util.landmarks.lm68_to_5`).

    Raises:
        MissingAssetError: the file is missing.
        ValueError: it cannot be read, or ``lm`` is not 68 finite 3D float points.
    """
    how = "It ships with this project in BFM/; point --bfm_folder at a folder holding it."
    path = require_file(os.path.join(bfm_folder, "similarity_Lm3D_all.mat"), "Standard landmarks", how)

    def read(p: str) -> dict:
        from scipy.io import loadmat

        try:
            return {"lm": np.asarray(loadmat(p)["lm"])}  # its own dtype (float32): the original's numbers
        except Exception as e:  # noqa: BLE001 - truncated, not a .mat, no 'lm': one line, below
            raise ValueError(f"cannot read the standard landmarks {p} ({error_line(e)}); {how}") from None

    def check(arrays: dict) -> None:
        lm = np.asarray(arrays.get("lm", np.zeros(0)))
        if lm.shape != (68, 3) or lm.dtype.kind != "f" or not np.all(np.isfinite(lm)):
            raise ValueError(f"{path}: 'lm' should be 68 finite 3D points, found shape {lm.shape}; {how}")

    # cached beside it (util.mat_cache): a run's start-up then needs no scipy
    return lm68_to_5(load_cached(path, read, check)["lm"])


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

    Attributes:
        w0, h0: the photo's size in pixels.
        s: the scale, resized pixels per photo pixel.
        tx, ty: the fitted translation (:func:`pos`) in photo pixels, y up.
        w, h: the resized photo's size (``int(w0 * s)``, ``int(h0 * s)``).
        left, up: the crop's top-left corner in the resized photo, pixels, y down (may be negative).
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
        """(5,) float64 ``[w0, h0, s, tx, ty]``, the original's ``trans_params``."""
        return np.array([self.w0, self.h0, self.s, self.tx, self.ty])

    def image_to_crop(self, pts_yup: np.ndarray, size: float = 224) -> np.ndarray:
        """Photo points -> crop points: the mapping :func:`align_img` applies to the landmarks it is
        given.

        Args:
            pts_yup: (K, 2) photo pixels, y up.
            size: the crop's side (:func:`align_img`'s ``target_size``).

        Returns:
            (K, 2) float64 crop pixels, y up.
        """
        pts = np.asarray(pts_yup, dtype=np.float64)
        p = np.stack([pts[:, 0] - self.tx + self.w0 / 2, pts[:, 1] - self.ty + self.h0 / 2], axis=1) * self.s
        return p - np.array([[self.w / 2 - size / 2, self.h / 2 - size / 2]])

    def crop_to_image(self, pts: np.ndarray) -> np.ndarray:
        """Crop pixels -> photo pixels (inverse of PIL's resize + crop, pixel centres at integers).

        Args:
            pts: (..., 2) crop pixels, y down.

        Returns:
            (..., 2) float64 photo pixels, y down.
        """
        pts = np.asarray(pts, dtype=np.float64)
        x = (pts[..., 0] + self.left + 0.5) * (self.w0 / self.w) - 0.5
        y = (pts[..., 1] + self.up + 0.5) * (self.h0 / self.h) - 0.5
        return np.stack([x, y], axis=-1)


def check_landmarks(lm: np.ndarray, img_size: tuple[int, int]) -> None:
    """Raise :class:`AlignmentError` unless ``lm`` (K, 2) can be a face's landmarks in a photo of
    ``img_size`` (W0, H0): finite, spread over at least :data:`MIN_POINT_SPREAD` pixels, their
    centre inside the photo and every point within one photo size of it (a face may reach out of
    the frame a little; coordinates like 1e30 or all negative are no face of this photo).

    Args:
        lm: (5, 2) or (68, 2) photo pixels (y up, as :func:`align_params` passes them).
        img_size: the photo's (W0, H0).

    Raises:
        AlignmentError: a check fails; the message says which and to re-run the detection.
    """
    w0, h0 = img_size
    lm = np.asarray(lm, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in (5, 68):
        raise AlignmentError(f"landmarks of shape {tuple(lm.shape)}, expected (5, 2) or (68, 2)")
    if not np.all(np.isfinite(lm)):
        raise AlignmentError(f"non-finite landmark coordinates; {_REDO}")
    spread = float(np.max(lm.max(axis=0) - lm.min(axis=0)))
    if spread < MIN_POINT_SPREAD:
        raise AlignmentError(f"degenerate detection: the {len(lm)} points lie within {spread:.3g} pixel(s) of each "
                             f"other (all at one place), no face can be aligned to them; {_REDO}")
    cx, cy = lm.mean(axis=0)
    if not (-0.5 <= cx <= w0 - 0.5 and -0.5 <= cy <= h0 - 0.5):
        raise AlignmentError(f"the landmarks' centre ({cx:.4g}, {cy:.4g}) is outside the {w0}x{h0} photo; {_REDO}")
    if np.any(lm < -np.array([w0, h0])) or np.any(lm > 2 * np.array([w0, h0])):
        raise AlignmentError(f"landmarks lie far outside the {w0}x{h0} photo (x from {lm[:, 0].min():.4g} to "
                             f"{lm[:, 0].max():.4g}, y from {lm[:, 1].min():.4g} to {lm[:, 1].max():.4g}); {_REDO}")


def _int32(v) -> int:
    """numpy ``astype(np.int32)`` semantics (truncation toward zero), as the original uses."""
    return int(np.asarray(v, dtype=np.float64).astype(np.int32))


def align_params(img_size: tuple[int, int], lm: np.ndarray, lm3d: np.ndarray, target_size: float = TARGET_SIZE,
                 rescale_factor: float = RESCALE_FACTOR) -> tuple[AlignTransform, np.ndarray]:
    """The alignment of a photo (as :func:`align_img`) without making the crop. The crop is the
    photo resized to (transform.w, transform.h), PIL bicubic, then cropped at (left, up) to target_size.

    Args:
        img_size: the photo's (W0, H0).
        lm: (5, 2) or (68, 2) landmarks in photo pixels, **y up**.
        lm3d: (5, 3) standard landmarks (:func:`load_lm3d`).
        target_size: the crop's side in pixels (224).
        rescale_factor: the original's scale constant (102).

    Returns:
        (the :class:`AlignTransform`, ``lm`` as (K, 2) float64 crop pixels, y up).

    Raises:
        AlignmentError: the landmarks fail :func:`check_landmarks`, or the scale would make the
            resized photo larger than :data:`MAX_ALIGNED_SIDE` or smaller than a pixel.
    """
    w0, h0 = img_size
    check_landmarks(lm, img_size)
    lm5 = lm if lm.shape[0] == 5 else lm68_to_5(lm)
    t, s = pos(lm5.T, lm3d.T)
    s = rescale_factor / s if s > 0 else float("inf")
    big = max(w0, h0) * s
    if not big <= MAX_ALIGNED_SIDE:  # also inf and nan
        raise AlignmentError(f"alignment scale {s:.4g} would enlarge the {w0}x{h0} photo to {big:.4g} pixels on a side "
                             f"(at most {MAX_ALIGNED_SIDE}): the points are far too close together for a face; {_REDO}")
    w, h = _int32(w0 * s), _int32(h0 * s)
    if w < 1 or h < 1:
        raise AlignmentError(f"alignment scale {s:.4g} shrinks the {w0}x{h0} photo to nothing ({w}x{h} pixels): the "
                             f"points are far too spread out for a face; {_REDO}")
    left = _int32(w / 2 - target_size / 2 + (t[0] - w0 / 2) * s)
    up = _int32(h / 2 - target_size / 2 + (h0 / 2 - t[1]) * s)
    transform = AlignTransform(w0, h0, float(s), float(t[0]), float(t[1]), w, h, left, up)
    return transform, transform.image_to_crop(lm, target_size)


def crop_box(transform: AlignTransform, target_size: float = TARGET_SIZE) -> tuple[int, int, int, int]:
    """The crop's box in the resized photo.

    Args:
        transform: the alignment.
        target_size: the crop's side in pixels.

    Returns:
        (left, up, right, low) in resized-photo pixels, y down, right and low excluded (PIL's box).
    """
    size = int(target_size)
    return transform.left, transform.up, transform.left + size, transform.up + size


def align_img(img: Image.Image, lm: np.ndarray, lm3d: np.ndarray, target_size: float = TARGET_SIZE,
              rescale_factor: float = RESCALE_FACTOR) -> tuple[AlignTransform, Image.Image, np.ndarray]:
    """Align a photo to the standard face crop.

    Args:
        img: RGB PIL image (W0 x H0).
        lm: (5, 2) or (68, 2) landmarks in photo pixels, **y up** (``H0 - 1 - y_down``).
        lm3d: (5, 3) standard landmarks from :func:`load_lm3d`.
        target_size: the crop's side in pixels (224).
        rescale_factor: the original's scale constant (102).

    Returns:
        transform, the (target_size x target_size) RGB crop (black where it leaves the photo), and
        ``lm`` as (K, 2) float64 crop pixels, y up.

    Raises:
        AlignmentError: as :func:`align_params`.
    """
    transform, lm_new = align_params(img.size, lm, lm3d, target_size, rescale_factor)
    crop = resize_crop(img, (transform.w, transform.h), crop_box(transform, target_size))
    return transform, crop, lm_new


def pil_vertical_first(w0: int, h0: int, w: int, h: int) -> bool | None:
    """Whether the installed Pillow resizes (w0, h0) -> (w, h) vertical pass first; None if unknown.

    Pillow <= 12.1 always runs the horizontal pass first (Resample.c since Pillow 3.3). Pillow 13
    runs the vertical pass first "if height is being scaled down more than twice the amount the
    width is" (pull request 9549). 12.2-12.x kept the C order and added a Python-level vertical
    first step only for photos more than 100 times taller than wide (pull request 9524): those
    return None here, every other photo False. Versions whose rule is not known here return None
    (the caller then resizes the whole photo, which is exact whatever the order, but slower).

    Args:
        w0, h0: the photo's size.
        w, h: the resized size.

    Returns:
        True (vertical first), False (horizontal first) or None (not known for this Pillow).
    """
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
    """``img.resize(size, BICUBIC).crop(box)``, pixel for pixel, computing only the crop's pixels.

    PIL resizes in two passes (horizontal and vertical; which one first depends on the sizes and
    the Pillow version), each rounding to 8 bits, with fixed-point coefficients that depend only
    on the pass's input and output lengths. Resizing just a *box* of the photo would not do: PIL
    takes the box as float32 and its filter positions move, so 0.01-10% of the pixels change by
    1-4 levels (checked on the test photos). Instead :func:`util.pil_resample.resize_crop_array`
    computes the crop's pixels from the full-size coefficients with Pillow's integer arithmetic,
    exact by construction (integer sums), with less work than resizing through PIL the rows and
    columns the crop needs (figures: docs/throughput.md). tests/test_throughput.py and
    tests/test_pil_resample.py check it against Pillow on every test photo and hundreds of
    synthetic cases of both orders. An RGB photo whose pass order is not known for the installed
    Pillow (:func:`pil_vertical_first`), or another mode, is resized whole by PIL (exact whatever
    the order, but slower).

    Args:
        img: the photo (PIL image).
        size: the resized (w, h).
        box: (left, up, right, low) of the crop in the resized photo, pixels, y down, right and low
            excluded; may reach outside (black there).

    Returns:
        The crop as a PIL image of ``img``'s mode, (right - left) x (low - up).
    """
    from util.pil_resample import plan_resize_crop, resize_crop_array

    vertical_first = pil_vertical_first(*img.size, *size)
    if vertical_first is None or img.mode != "RGB":
        return img.resize(size, resample=Image.Resampling.BICUBIC).crop(box)
    return Image.fromarray(resize_crop_array(img, plan_resize_crop(img.size, size, box, vertical_first)))


def image_to_array(img: Image.Image) -> np.ndarray:
    """An image as the network's input, computed as the original (float64 / 255, then float32).

    Args:
        img: RGB PIL image (or anything ``np.asarray`` makes (H, W, 3) uint8).

    Returns:
        (3, H, W) float32 in 0..1, a contiguous copy.
    """
    return (np.asarray(img, dtype=np.uint8) / 255.0).astype(np.float32).transpose(2, 0, 1).copy()


def unit_float_table() -> np.ndarray:
    """(256,) float32: byte k -> the value :func:`image_to_array` gives it (float64 k / 255, then
    float32). ``unit_float_table()[u8]`` converts a uint8 crop exactly as the original does."""
    return (np.arange(256, dtype=np.uint8) / 255.0).astype(np.float32)
