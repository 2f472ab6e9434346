"""The run's outputs: which files a face gets and how the writers are configured."""
from __future__ import annotations

import numpy as np

from models.coeffs import COEFFS
from pipeline.runtime import SetupError


def output_config(opt, face_buf: np.ndarray, out_dir: str):
    """The :class:`util.results_io.OutputConfig` of a run (triangle lines formatted once here)."""
    from util.mesh_io import face_lines
    from util.results_io import OutputConfig

    return OutputConfig(out_dir=out_dir, save_png=opt.save_png, save_mesh=opt.save_mesh, save_mat=opt.save_mat,
                        coeff_slices=tuple((k, s.start, s.stop) for k, s in COEFFS.slices().items()),
                        face_lines=face_lines(face_buf) if opt.save_mesh else b"",
                        crop_size=int(2 * opt.center), camera_d=float(opt.camera_d),
                        extras=output_extras(opt, face_buf))


def output_extras(opt, face_buf: np.ndarray):
    """The run's :class:`util.output_extras.OutputExtras` (--mesh_format, --uv_texture, --report),
    or None for plain .obj/.png/.mat; raises SetupError when the UV layout file is missing."""
    from options.output_options import output_format_settings
    from util.output_extras import make_output_extras
    from util.uv_texture import load_uv_layout

    s = output_format_settings(opt)
    uv = None
    if s.uv_texture and not 16 <= s.uv_texture_size <= 8192:
        raise SetupError(f"--uv_texture_size {s.uv_texture_size}: give a side between 16 and 8192 pixels")
    if s.uv_texture:
        try:
            uv = load_uv_layout(opt.bfm_folder, int(face_buf.max()) + 1)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(str(e)) from None
    return make_output_extras(s.mesh_format, face_buf, opt.save_mesh, uv, s.uv_texture_size, s.report,
                              opt.focal, opt.center, (COEFFS.slices()["angle"].start, COEFFS.slices()["angle"].stop))


def output_suffixes(opt) -> list[str]:
    """The files test.py writes per face, as the save_* switches ask."""
    from options.output_options import output_format_settings
    from util.output_extras import extra_suffixes

    extra = output_format_settings(opt)
    return ([".png"] if opt.save_png else []) + extra_suffixes(extra.mesh_format, opt.save_mesh, extra.uv_texture) \
        + ([".mat"] if opt.save_mat else [])
