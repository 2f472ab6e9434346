"""The result picture: input | render overlay | overlay with landmarks (the original's layout)."""
from __future__ import annotations

import numpy as np

RED = np.array([255.0, 0, 0], dtype=np.float32)
BLUE = np.array([0, 0, 255.0], dtype=np.float32)


def draw_landmarks(img: np.ndarray, landmark: np.ndarray, color: np.ndarray, step: int = 2) -> np.ndarray:
    """Draw (B, K, 2) landmarks (pixels, **y up**) as 2*step-wide squares on (B, H, W, 3) images.

    Same squares as the original: rows/cols ``round(p) + [-step, step)``, clipped to the image.
    Returns a new array.
    """
    img = img.copy()
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
    return img


def compose_result(image: np.ndarray, render: np.ndarray, mask: np.ndarray, lm_pred: np.ndarray,
                   lm_gt: np.ndarray | None = None) -> np.ndarray:
    """Build the result picture(s).

    Args:
        image, render: (B, H, W, 3) float in 0..1; mask: (B, H, W, 1) in {0, 1};
        lm_pred: (B, 68, 2), lm_gt: (B, K, 2) crop pixels, y up (gt in blue, prediction in red).
    Returns:
        (B, H, 3W, 3) uint8 (2W wide without ``lm_gt``), converted like the original's tensor2im.
    """
    inp = np.float32(255.0) * image.astype(np.float32)
    overlay = np.float32(255.0) * (render * mask + (1 - mask) * image).astype(np.float32)
    panels = [inp, overlay]
    if lm_gt is not None:
        drawn = draw_landmarks(overlay, lm_gt, BLUE)
        panels.append(draw_landmarks(drawn, lm_pred, RED))
    vis = np.concatenate(panels, axis=2) / np.float32(255.0)
    return (np.clip(vis, 0, 1) * np.float32(255.0)).astype(np.uint8)
