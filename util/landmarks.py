"""Facial landmark conventions shared by detection, alignment, losses and reports.

Two point sets are used:

- the 68 points of dlib / iBUG 300-W (0-based indices here; the original's code is 1-based);
- the 5 points of a detection file and of the alignment: left eye centre, right eye centre, nose
  tip, left mouth corner, right mouth corner, "left" meaning image-left for an upright face.

:func:`lm68_to_5` is the one 68 -> 5 mapping of the project (the original Deep3DFaceRecon's
``extract_5p``): eye centres are the means of the eye corners (1-based 37 & 40, 43 & 46), the
nose tip is point 31, the mouth corners points 49 and 55. It works on NumPy arrays and on torch
tensors alike (differentiable on tensors) and imports nothing heavy.

Coordinates: files and detectors use image pixels with y down (pixel centres at integers); the
alignment works with y up (``y_up = H - 1 - y_down``, :func:`flip_y`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

# 0-based indices into the 68 points (1-based 37 & 40, 43 & 46, 31, 49, 55)
LM68_LEFT_EYE = (36, 39)
LM68_RIGHT_EYE = (42, 45)
LM68_NOSE = 30
LM68_MOUTH_LEFT = 48
LM68_MOUTH_RIGHT = 54


def lm68_to_5(lm68: Any) -> Any:
    """The 5 detection points of 68 landmarks.

    Args:
        lm68: (..., 68, D) ``numpy.ndarray`` or ``torch.Tensor`` (D = 2 or 3; any leading batch
            dimensions), in any coordinate convention.

    Returns:
        (..., 5, D), same type, dtype and device: left eye centre, right eye centre, nose tip,
        left mouth corner, right mouth corner. Eye centres are ``(a + b) / 2`` of the corners.

    Raises:
        ValueError: ``lm68`` has fewer than 2 dimensions or not 68 points.
    """
    shape = getattr(lm68, "shape", None)
    if shape is None or len(shape) < 2 or shape[-2] != 68:
        got = tuple(shape) if shape is not None else type(lm68).__name__
        raise ValueError(f"lm68 must have shape (..., 68, D), got {got}")
    x = lm68
    parts = [(x[..., LM68_LEFT_EYE[0], :] + x[..., LM68_LEFT_EYE[1], :]) / 2,
             (x[..., LM68_RIGHT_EYE[0], :] + x[..., LM68_RIGHT_EYE[1], :]) / 2,
             x[..., LM68_NOSE, :], x[..., LM68_MOUTH_LEFT, :], x[..., LM68_MOUTH_RIGHT, :]]
    if isinstance(x, np.ndarray):
        return np.stack(parts, axis=-2)
    import torch  # a tensor was given: torch is loaded already

    return torch.stack(parts, dim=-2)


def flip_y(points: np.ndarray, height: int) -> np.ndarray:
    """Points between the y-down and y-up pixel conventions: ``y' = height - 1 - y``.

    Args:
        points: (..., 2) array-like ``x, y``.
        height: the image's height in pixels.

    Returns:
        a new (..., 2) array (same dtype) with y flipped; x unchanged.
    """
    out = np.array(points, copy=True)
    out[..., 1] = height - 1 - out[..., 1]
    return out


def scale_points(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Points of a resized copy of an image back in the original's pixels (pixel centres kept).

    Args:
        points: (..., 2) ``x, y`` in pixels of the copy, whose size is ``(sx * W, sy * H)``.
        sx, sy: the copy's size over the original's, per axis.

    Returns:
        (..., 2) float64 ``(p + 0.5) / s - 0.5``; a copy of ``points`` when ``sx == sy == 1``.
    """
    p = np.asarray(points, dtype=np.float64)
    if sx == 1.0 and sy == 1.0:
        return p.copy()
    return (p + 0.5) / np.array([sx, sy]) - 0.5
