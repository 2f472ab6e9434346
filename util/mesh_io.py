"""Mesh output: Wavefront .obj with per-vertex colours, written with vectorised numpy.

The layout is what trimesh writes for ``Trimesh(..., vertex_colors=uint8, process=False).export``
(the original's writer): ``v x y z r g b`` with colours as uint8/255, 8 decimals, then 1-based
``f a b c``; vertex order is preserved.
"""
from __future__ import annotations

import os

import numpy as np


def colors_to_uint8(color: np.ndarray) -> np.ndarray:
    """(N, 3) float colours in 0..1 -> uint8 as the original: clip(255*c, 0, 255) truncated."""
    return np.clip(255.0 * color, 0, 255).astype(np.uint8)


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray, colors_u8: np.ndarray | None = None) -> None:
    """Write an .obj: vertices (N,3) float, faces (F,3) 0-based int, colors_u8 (N,3) uint8 or None.

    Written to a temporary name and renamed, so an interrupted run leaves no half file.
    """
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3) + 1
    if colors_u8 is not None:
        v = np.concatenate([v, np.asarray(colors_u8, dtype=np.float64).reshape(-1, 3) / 255.0], axis=1)
    vfmt = "v" + " %.8f" * v.shape[1] + "\n"
    body = ["# written by Deep3DFaceRecon (modern reproduction)\n", (vfmt * len(v)) % tuple(v.ravel()),
            ("f %d %d %d\n" * len(f)) % tuple(f.ravel())]
    tmp = path + ".part"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.writelines(body)
    os.replace(tmp, path)
