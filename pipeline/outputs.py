"""The run's outputs: which files a face gets and how the writers are configured."""
from __future__ import annotations

import numpy as np

from models.coeffs import COEFFS
from pipeline.runtime import SetupError
from pipeline.settings import ModelSpec, OutputSpec


def output_config(spec: OutputSpec, model: ModelSpec, face_buf: np.ndarray, out_dir: str):
    """The :class:`util.results_io.OutputConfig` of a run (triangle lines formatted once here)."""
    from util.mesh_io import face_lines
    from util.results_io import OutputConfig

    return OutputConfig(out_dir=out_dir, save_png=spec.save_png, save_mesh=spec.save_mesh, save_mat=spec.save_mat,
                        coeff_slices=tuple((k, s.start, s.stop) for k, s in COEFFS.slices().items()),
                        face_lines=face_lines(face_buf) if spec.save_mesh else b"",
                        crop_size=int(2 * model.center), camera_d=float(model.camera_d),
                        extras=output_extras(spec, model, face_buf))


def output_extras(spec: OutputSpec, model: ModelSpec, face_buf: np.ndarray):
    """The run's :class:`util.output_extras.OutputExtras` (--mesh_format, --uv_texture, --report),
    or None for plain .obj/.png/.mat; raises SetupError when the UV layout file is missing."""
    from util.output_extras import make_output_extras
    from util.uv_texture import load_uv_layout

    s = spec
    uv = None
    if s.uv_texture and not 16 <= s.uv_texture_size <= 8192:
        raise SetupError(f"--uv_texture_size {s.uv_texture_size}: give a side between 16 and 8192 pixels")
    if s.uv_texture:
        try:
            uv = load_uv_layout(model.bfm_folder, int(face_buf.max()) + 1)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(str(e)) from None
    return make_output_extras(s.mesh_format, face_buf, s.save_mesh, uv, s.uv_texture_size, s.report,
                              model.focal, model.center, (COEFFS.slices()["angle"].start, COEFFS.slices()["angle"].stop))


def output_suffixes(spec: OutputSpec) -> list[str]:
    """The files test.py writes per face, as the save_* switches ask."""
    from util.output_extras import extra_suffixes

    return ([".png"] if spec.save_png else []) + extra_suffixes(spec.mesh_format, spec.save_mesh, spec.uv_texture) \
        + ([".mat"] if spec.save_mat else [])
