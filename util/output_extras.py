"""The optional outputs of a face, written beside the usual ones by the writer processes.

:func:`make_output_extras` turns the run's settings (mesh format, UV texture, report) into one
small frozen :class:`OutputExtras` that :class:`util.results_io.OutputConfig` carries (``None``
for a plain run: then results_io's own .obj writer runs, as before). The writers of the output
registry (:mod:`pipeline.outputs`) make one face's files: :func:`mesh_face_files` (its mesh in
its format, :mod:`util.mesh_formats`, with its UV texture, :mod:`util.uv_texture`),
:func:`texture_face_files` (the texture alone) and :func:`report_face_files` (:mod:`util.report`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from util.mesh_formats import TEXTURE_SUFFIX, MeshSettings, mesh_files, mesh_settings
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


def _texture_png(cfg, res) -> list:
    """The face's UV texture (:func:`util.uv_texture.face_texture`) as PNG chunks."""
    from util.png import png_chunks

    ex: OutputExtras = cfg.extras
    return png_chunks(face_texture(ex.raster, res.vertex, res.arrays["albedo"], res.arrays["visibility"],
                                   res.image.transpose(1, 2, 0), ex.focal, ex.center))


def mesh_face_files(cfg, res, base: str) -> list[tuple[str, list]]:
    """The face's mesh: ``<base>.obj`` as the original wrote it where ``cfg.extras`` is None, else
    ``<base>.<fmt>`` (:func:`util.mesh_formats.mesh_files`), with its UV texture ``<base>_texture.png``
    (and an .obj's .mtl) when the run makes textures. ``cfg``: the run's
    :class:`util.results_io.OutputConfig`; ``res``: the face's :class:`util.results_io.FaceResult`."""
    from util.results_io import obj_files, world_vertices

    ex: OutputExtras | None = cfg.extras
    if ex is None:
        return obj_files(cfg, res, base)
    if ex.mesh is None:
        return []
    png = None if ex.raster is None else _texture_png(cfg, res)
    return [(base + sfx, c) for sfx, c in mesh_files(ex.mesh, os.path.basename(base), world_vertices(cfg, res),
                                                     res.color, png)]


def texture_face_files(cfg, res, base: str) -> list[tuple[str, list]]:
    """``<base>_texture.png`` alone, for runs that make textures but no mesh (a mesh's own files
    hold its texture: :func:`mesh_face_files`)."""
    ex: OutputExtras | None = cfg.extras
    if ex is None or ex.raster is None or ex.mesh is not None:
        return []
    return [(base + TEXTURE_SUFFIX, _texture_png(cfg, res))]


def report_face_files(cfg, res, base: str) -> list[tuple[str, list]]:
    """The report's files of the face under ``<out_dir>/report/`` (:func:`util.report.face_report_files`)."""
    from util.report import face_report_files
    from util.results_io import world_vertices

    ex: OutputExtras = cfg.extras
    return face_report_files(cfg.out_dir, res, world_vertices(cfg, res), res.coeffs[ex.angle[0]:ex.angle[1]], ex.faces)
