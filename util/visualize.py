"""The result picture: input | render overlay | overlay with landmarks (the original's layout).

The original builds it in floats (``255 * image``, ``255 * (render * mask + (1 - mask) * image)``,
then its tensor2im: ``/ 255``, clip to [0, 1], ``* 255``, truncate to uint8). That whole float
round trip, in float32, is a monotone step function of each value ``x``: it gives the byte
``n`` exactly when ``levels[n] <= x < levels[n + 1]``, ``levels = float32(k / 255)``
(:func:`util.preprocess.unit_float_table`; checked on every float32 in [-2, 2] and beyond it by
monotonicity). So a picture is built from bytes: each float becomes its byte once
(:func:`unit_to_uint8`; the same on the device, batched: ``pipeline.render.overlay_uint8``),
and the panels are copies of uint8 arrays; the landmark colours (0 and 255) survive the round
trip unchanged, and a uint8 crop comes back as itself.
"""
from __future__ import annotations

import functools

import numpy as np

RED = np.array([255.0, 0, 0], dtype=np.float32)
BLUE = np.array([0, 0, 255.0], dtype=np.float32)


@functools.cache
def uint8_steps() -> np.ndarray:
    """(257,) float32: ``steps[n]`` (n = 1..255) is the smallest float that tensor2im makes byte n
    or more, ``float32(n / 255)``; ``steps[0] = -inf`` and ``steps[256] = NaN`` (no comparison
    holds), so that ``steps[k]`` and ``steps[k + 1]`` exist for every k in 0..255."""
    from util.preprocess import unit_float_table

    return np.concatenate([[-np.inf], unit_float_table()[1:], [np.nan]]).astype(np.float32)


def unit_to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in 0..1 (any shape, any float32 value) -> uint8, exactly as the original's tensor2im
    round trip ``trunc(clip(255 * x / 255, 0, 1) * 255)`` in float32: the n with
    ``steps[n] <= x < steps[n + 1]`` (:func:`uint8_steps`). ``trunc(255 * x)`` is within one of
    it, so two comparisons correct it (no arithmetic whose rounding matters). NaN gives 0.

    Args:
        x: floats, any shape (cast to float32; values outside 0..1 clip to 0 or 255).

    Returns:
        uint8 of ``x``'s shape.
    """
    x = np.asarray(x, dtype=np.float32)
    flat, steps = x.reshape(-1), uint8_steps()
    with np.errstate(invalid="ignore"):  # NaN
        k = np.clip(flat * np.float32(255.0), 0, 255).astype(np.intp)
    np.clip(k, 0, 255, out=k)  # NaN's integer
    k += flat >= steps[k + 1]
    k -= flat < steps[k]
    return k.astype(np.uint8).reshape(x.shape)


def overlay_uint8(image: np.ndarray, render: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The middle panel as bytes (what :func:`compose_result` draws for those inputs).

    Args:
        image: (B, H, W, 3) uint8 crops.
        render: (B, H, W, 3) float render in 0..1.
        mask: (B, H, W, 1) in {0, 1}.

    Returns:
        (B, H, W, 3) uint8: the render's bytes (:func:`unit_to_uint8`) where the mask is set, the
        crop elsewhere.
    """
    return np.where(np.asarray(mask) != 0, unit_to_uint8(render), image)


def draw_landmarks(img: np.ndarray, landmark: np.ndarray, color: np.ndarray, step: int = 2) -> np.ndarray:
    """Draw (B, K, 2) landmarks (pixels, **y up**) as 2*step-wide squares on (B, H, W, 3) images.

    Same squares as the original: rows/cols ``round(p) + [-step, step)``, clipped to the image
    (row = H - 1 - y).

    Args:
        img: (B, H, W, 3) images (not changed).
        landmark: (B, K, 2) landmarks, pixels, **y up**.
        color: (3,) the squares' colour, in ``img``'s value range.
        step: half the squares' side in pixels.

    Returns:
        A new array, ``img`` with the squares drawn.
    """
    img = img.copy()
    _draw_landmarks_into(img, landmark, color, step)
    return img


def _draw_landmarks_into(img: np.ndarray, landmark: np.ndarray, color: np.ndarray, step: int = 2) -> None:
    b, h, w, _ = img.shape
    lm = np.array(landmark, dtype=np.float64, copy=True)
    lm[..., 1] = h - 1 - lm[..., 1]
    lm = np.round(lm).astype(np.int64)
    off = np.arange(-step, step)
    u = np.clip(lm[..., 0, None, None] + off[:, None], 0, w - 1)  # (B, K, 2s, 1)
    v = np.clip(lm[..., 1, None, None] + off[None, :], 0, h - 1)  # (B, K, 1, 2s)
    u, v = np.broadcast_arrays(u, v)
    bi = np.broadcast_to(np.arange(b)[:, None, None, None], u.shape)
    img[bi, v, u] = color


def compose_picture(image: np.ndarray, overlay: np.ndarray, lm_pred: np.ndarray,
                    lm_gt: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Build the result picture(s) from bytes.

    Args:
        image: (B, H, W, 3) uint8 input crops (a (B, 3, H, W) view transposed is fine);
        overlay: (B, H, W, 3) uint8 middle panels (:func:`overlay_uint8`);
        lm_pred: (B, 68, 2), lm_gt: (B, K, 2) crop pixels, y up (gt in blue, prediction in red);
        out: optional (B, H, 3W, 3) uint8 array (any strides) to fill instead of a new one.
    Returns:
        (B, H, 3W, 3) uint8 (2W wide without ``lm_gt``): input | overlay | overlay with landmarks.
    """
    b, h, w, _ = overlay.shape
    n = 2 if lm_gt is None else 3
    if out is None:
        out = np.empty((b, h, n * w, 3), np.uint8)
    image = np.asarray(image)
    if image.strides[-1] > image.strides[-2]:  # planar crops (a transposed (B, 3, H, W)): plane by plane, 4x faster
        for c in range(3):
            out[:, :, :w, c] = image[..., c]
    else:
        out[:, :, :w] = image
    out[:, :, w:2 * w] = overlay
    if lm_gt is not None:
        third = out[:, :, 2 * w:]
        third[...] = overlay
        _draw_landmarks_into(third, lm_gt, BLUE)
        _draw_landmarks_into(third, lm_pred, RED)
    return out


def compose_result(image: np.ndarray, render: np.ndarray, mask: np.ndarray, lm_pred: np.ndarray,
                   lm_gt: np.ndarray | None = None) -> np.ndarray:
    """Build the result picture(s) from floats (the original's inputs and pixels).

    Args:
        image, render: (B, H, W, 3) float in 0..1; mask: (B, H, W, 1) in {0, 1};
        lm_pred: (B, 68, 2), lm_gt: (B, K, 2) crop pixels, y up (gt in blue, prediction in red).
    Returns:
        (B, H, 3W, 3) uint8 (2W wide without ``lm_gt``), converted like the original's tensor2im.
    """
    blend = (render * mask + (1 - mask) * image).astype(np.float32)  # the original's overlay, any mask
    return compose_picture(unit_to_uint8(image), unit_to_uint8(blend), lm_pred, lm_gt)
