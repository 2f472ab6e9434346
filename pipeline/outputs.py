"""The output registry: each file a face can get is one :class:`Output` entry.

An entry says which setting turns it on (``enabled``, read from the run's
:class:`pipeline.settings.OutputSpec`), which files it writes (``suffixes`` of the face's name,
what ``--skip_existing`` looks for), what it needs of the face (``needs``: the mesh, the render),
how its per-face arrays are made on the device (``make``, optional) and how its files are made
and written (``files``, run by the writer processes, all of a face's files together, all or
none). Everything else reads the registry: :func:`output_suffixes`, :func:`output_config` (the
writers' :class:`util.results_io.OutputConfig`), :func:`pipeline.render.batch_results` (what
each face's payload holds) and :func:`util.results_io.write_face_result`. docs/outputs.md shows
how to add one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from models.coeffs import COEFFS
from pipeline.runtime import SetupError
from pipeline.settings import ModelSpec, OutputSpec
from util.mesh_formats import TEXTURE_SUFFIX, mesh_suffixes
from util.output_extras import mesh_face_files, report_face_files, texture_face_files
from util.report import REPORT_DIR, REPORT_SUFFIXES
from util.results_io import mat_files, png_files

NEEDS = ("mesh", "render")  # what an entry may need: vertices and colours; the crop, render overlay and landmarks


@dataclass(frozen=True)
class Output:
    """One output of a face.

    Attributes:
        name: its key in :data:`OUTPUTS`.
        enabled: ``enabled(spec)``: whether the run's :class:`OutputSpec` asks for it.
        suffixes: ``suffixes(spec)``: the files it writes per face, as suffixes of the face's name
            (``--skip_existing`` leaves a face out when all the enabled entries' files are there).
        files: ``files(cfg, res, base) -> [(path, bytes-like chunks)]``: the face's files, made in a
            writer process from its :class:`util.results_io.FaceResult` ``res`` (``base``:
            ``<results>/<rel_dir>/<name>``); a module-level function that imports no torch.
        needs: of :data:`NEEDS`: ``mesh`` fills the payload's ``vertex`` (N, 3) float32 camera
            space and ``color`` (N, 3) uint8; ``render`` its ``image`` (3, H, W) uint8 crop,
            ``overlay`` (H, W, 3) uint8 and ``lm_gt`` (K, 2). ``coeffs`` (257,) and ``lm68``
            (68, 2) are always there.
        make: ``make(model, face, render, images_u8) -> {key: (B, ...) tensor}``, run on the device
            per batch (``face``: :class:`models.bfm.FaceOutput`, ``render``: the renderer's output,
            ``images_u8``: (B, 3, H, W) uint8 crops); face i's slices arrive in ``res.arrays[key]``.
        flag: the command-line flag that turns it on (for messages and docs).
        folder: the sub-folder of the results folder its files go in ("": beside the face's other
            files): ``suffixes`` then name ``<results>/<folder>/<rel_dir>/<name><suffix>``.
    """

    name: str
    enabled: Callable[[OutputSpec], bool]
    suffixes: Callable[[OutputSpec], tuple[str, ...]]
    files: Callable
    needs: frozenset[str] = frozenset()
    make: Callable | None = None
    flag: str = ""
    folder: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"output {self.name!r} needs {sorted(unknown)}; an output may need {list(NEEDS)}")
        if self.make is not None and "render" not in self.needs:
            raise ValueError(f"output {self.name!r} makes arrays from the render: its needs must include 'render'")


OUTPUTS: dict[str, Output] = {}  # in the order a face's files are made


def register(output: Output) -> Output:
    """Add ``output`` to :data:`OUTPUTS` (after the others); returns it. Raises ValueError when
    its name is taken."""
    if output.name in OUTPUTS:
        raise ValueError(f"an output named {output.name!r} is registered already")
    OUTPUTS[output.name] = output
    return output


def unregister(name: str) -> None:
    """Remove the entry ``name`` (tests that register their own)."""
    OUTPUTS.pop(name, None)


def _texture_extras_arrays(model, face, render, images_u8):
    from pipeline.extra_arrays import texture_arrays

    return texture_arrays(model, face, render, images_u8)


def _report_extras_arrays(model, face, render, images_u8):
    from pipeline.extra_arrays import report_arrays

    return report_arrays(model, face, render, images_u8)


register(Output("png", lambda s: s.save_png, lambda s: (".png",), png_files, frozenset({"render"}),
                flag="--save_png"))
register(Output("mesh", lambda s: s.save_mesh, lambda s: tuple(mesh_suffixes(s.mesh_format, s.uv_texture)),
                mesh_face_files, frozenset({"mesh"}), flag="--save_mesh, --mesh_format"))
register(Output("mat", lambda s: s.save_mat, lambda s: (".mat",), mat_files, flag="--save_mat"))
register(Output("texture", lambda s: s.uv_texture, lambda s: () if s.save_mesh else (TEXTURE_SUFFIX,),
                texture_face_files, frozenset({"mesh", "render"}), _texture_extras_arrays, flag="--uv_texture"))
register(Output("report", lambda s: s.report, lambda s: REPORT_SUFFIXES, report_face_files,
                frozenset({"mesh", "render"}), _report_extras_arrays, flag="--report", folder=REPORT_DIR))


def enabled_outputs(spec: OutputSpec) -> list[Output]:
    """The registered outputs that ``spec`` asks for, in registry order."""
    return [o for o in OUTPUTS.values() if o.enabled(spec)]


def output_suffixes(spec: OutputSpec) -> list[str]:
    """The files a face gets beside each other with ``spec``, as suffixes of its name (those of
    entries with a ``folder``, the report's, aside: :func:`output_files`)."""
    return [sfx for o in enabled_outputs(spec) if not o.folder for sfx in o.suffixes(spec)]


def output_files(spec: OutputSpec) -> list[tuple[str, str]]:
    """Every file a face gets with ``spec``, as (folder, suffix): the file is
    ``<results>/<folder>/<rel_dir>/<name><suffix>`` (folder "": beside the face's other files).
    What ``--skip_existing`` looks for (:func:`pipeline.scan.without_finished`)."""
    return [(o.folder, sfx) for o in enabled_outputs(spec) for sfx in o.suffixes(spec)]


def output_needs(spec: OutputSpec) -> tuple[frozenset[str], list[Callable]]:
    """(what the enabled outputs need, of :data:`NEEDS`; their ``make`` functions, in order)."""
    outs = enabled_outputs(spec)
    return frozenset().union(*(o.needs for o in outs)), [o.make for o in outs if o.make is not None]


def output_config(spec: OutputSpec, model: ModelSpec, face_buf: np.ndarray, out_dir: str):
    """The writers' :class:`util.results_io.OutputConfig` of a run.

    Args:
        spec: the outputs asked for. model: the camera (``focal``, ``center``, ``camera_d``) and
            the face model's folder (its UV layout, for textures).
        face_buf: (F, 3) int64 triangles (the .obj's lines are formatted once here).
        out_dir: the results folder.

    Raises:
        SetupError: a UV texture size out of range, or a missing or bad UV layout file.
    """
    from util.mesh_io import face_lines
    from util.results_io import OutputConfig

    return OutputConfig(out_dir=out_dir, files=tuple(o.files for o in enabled_outputs(spec)),
                        coeff_slices=tuple((k, s.start, s.stop) for k, s in COEFFS.slices().items()),
                        face_lines=face_lines(face_buf) if spec.save_mesh else b"",
                        crop_size=int(2 * model.center), camera_d=float(model.camera_d),
                        extras=output_extras(spec, model, face_buf))


def output_extras(spec: OutputSpec, model: ModelSpec, face_buf: np.ndarray):
    """The run's :class:`util.output_extras.OutputExtras` (mesh format, UV texture, report), or
    None for the plain .obj/.png/.mat; raises SetupError as :func:`output_config`."""
    from util.output_extras import make_output_extras
    from util.uv_texture import load_uv_layout

    uv = None
    if spec.uv_texture and not 16 <= spec.uv_texture_size <= 8192:
        raise SetupError(f"--uv_texture_size {spec.uv_texture_size}: give a side between 16 and 8192 pixels")
    if spec.uv_texture:
        try:
            uv = load_uv_layout(model.bfm_folder, int(face_buf.max()) + 1)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(str(e)) from None
    angle = COEFFS.slices()["angle"]
    return make_output_extras(spec.mesh_format, face_buf, spec.save_mesh, uv, spec.uv_texture_size, spec.report,
                              model.focal, model.center, (angle.start, angle.stop))
