"""The optional outputs of a face, written beside the usual ones by the writer processes.

:func:`make_output_extras` turns the run's settings (mesh format, UV texture, report) into one
small frozen :class:`OutputExtras` that :class:`util.results_io.OutputConfig` carries (``None``
for a plain run: then results_io's own .obj writer runs, as before); :func:`extra_files` makes
one face's mesh in its format (:mod:`util.mesh_formats`), its UV texture (:mod:`util.uv_texture`)
and its report files (:mod:`util.report`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from util.mesh_formats import TEXTURE_SUFFIX, MeshSettings, mesh_files, mesh_settings, mesh_suffixes
from util.uv_texture import UvRaster, face_texture, uv_raster


@dataclass(frozen=True)
class OutputExtras:
    """mesh: how meshes are written (None: no mesh file); raster: the UV texture's texel table
    (None: no texture); focal, center: the camera (crop pixels), for projecting texels; report:
    write the report's per-face files; angle: (start, stop) of the pose angles in the 257 coefficients."""

    mesh: MeshSettings | None = None
    raster: UvRaster | None = None
    focal: float = 1015.0
    center: float = 112.0
    report: bool = False
    angle: tuple[int, int] = (224, 227)
    faces: np.ndarray | None = None  # (F, 3) int64, for the report's viewer


def make_output_extras(fmt: str, faces: np.ndarray, save_mesh: bool, uv: np.ndarray | None, texture_size: int,
                       report: bool, focal: float, center: float, angle: tuple[int, int]) -> OutputExtras | None:
    """The run's :class:`OutputExtras`; None when nothing beyond the plain .obj is asked for.
    ``uv``: the (N, 2) layout when a texture is wanted (:func:`util.uv_texture.load_uv_layout`)."""
    if fmt == "obj" and uv is None and not report:
        return None
    return OutputExtras(mesh=mesh_settings(fmt, faces, uv) if save_mesh else None,
                        raster=None if uv is None else uv_raster(uv, faces, texture_size),
                        focal=float(focal), center=float(center), report=report, angle=tuple(angle),
                        faces=np.asarray(faces, np.int64) if report else None)


def extra_suffixes(fmt: str, save_mesh: bool, uv_texture: bool) -> list[str]:
    """The mesh and texture files a face gets (suffixes of its name; the report's files aside)."""
    if save_mesh:
        return mesh_suffixes(fmt, uv_texture)
    return [TEXTURE_SUFFIX] if uv_texture else []


def extra_files(cfg, res, base: str) -> list[tuple[str, list]]:
    """The face ``res``'s mesh (``<base>.<fmt>``), texture and report files that ``cfg.extras``
    asks for, as (path, bytes-like chunks) (``cfg``: the run's :class:`util.results_io.OutputConfig`);
    results_io writes them together with the face's other files, all or none."""
    from util.results_io import png_chunks

    ex: OutputExtras = cfg.extras
    world = res.vertex.copy()
    world[:, 2] = cfg.camera_d - world[:, 2]  # camera space -> world space
    png = None
    if ex.raster is not None:
        tex = face_texture(ex.raster, res.vertex, res.albedo, res.visibility, res.image.transpose(1, 2, 0),
                           ex.focal, ex.center)
        png = png_chunks(tex)
    files: list[tuple[str, list]] = []
    if ex.mesh is not None:
        files += [(base + sfx, c) for sfx, c in mesh_files(ex.mesh, os.path.basename(base), world, res.color, png)]
    elif png is not None:
        files.append((base + TEXTURE_SUFFIX, png))
    if ex.report:
        from util.report import face_report_files

        files += face_report_files(cfg.out_dir, res, world, res.coeffs[ex.angle[0]:ex.angle[1]], ex.faces)
    return files
