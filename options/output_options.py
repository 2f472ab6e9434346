"""test.py's options for extra output formats: mesh file format, UV texture, HTML report.

A dataclass mixin of :mod:`options.base_options` fields (each becomes a ``--flag``);
:class:`options.test_options.TestOptions` inherits it; :func:`options.run_specs.output_spec` turns
the parsed options into the :class:`pipeline.settings.OutputSpec` that the library takes.
"""
from __future__ import annotations

from dataclasses import dataclass

from options.base_options import opt

MESH_FORMATS = ("obj", "ply", "glb")


@dataclass
class OutputFormatOptions:
    mesh_format: str = opt("obj", "mesh file format: obj (text, the original's) | ply (binary) | glb (binary "
                                  "glTF 2.0); all with per-vertex colours", choices=list(MESH_FORMATS), group="outputs")
    uv_texture: bool = opt(False, "also write <name>_texture.png, a UV texture sampled from the photo where the "
                                  "face is visible (the model's albedo elsewhere), and give the mesh UVs that "
                                  "use it (.obj + .mtl, .ply with TextureFile, .glb with the texture inside)", group="outputs")
    uv_texture_size: int = opt(512, "side of the UV texture in pixels", group="outputs")
    report: bool = opt(False, "write index.html in the results folder: thumbnails, per-face fit numbers, the "
                              "failures, and a 3D viewer (needs tools/vendor_viewer.sh run once)", group="outputs")
