"""Mesh files besides the plain .obj: binary .ply, binary glTF (.glb), and textured variants.

Every format keeps the vertex order and per-vertex colours of :mod:`util.mesh_io`'s .obj (uint8,
the original's ``clip(255 c)`` truncation). The files are built here with numpy, not with
trimesh's exporters: a mesh's bytes are a header plus the arrays' own bytes, and the triangle
block (the same for every face of a run) is made once (:func:`mesh_settings`); why not trimesh:
docs/throughput.md, "Measurements behind the design". trimesh reads every file back in
``tests/test_mesh_formats.py``, which checks the numbers.

Layouts:

* ``.ply``: ``binary_little_endian 1.0``; vertex ``float x y z, uchar red green blue`` (and
  ``float s t`` with a texture, named by a ``comment TextureFile <png>`` line, MeshLab's and
  trimesh's convention); face ``list uchar int vertex_indices``.
* ``.glb``: glTF 2.0, one mesh, one triangle primitive: indices (uint16 when the mesh has fewer
  than 65536 vertices, else uint32), POSITION float32, COLOR_0 normalised uint8 RGB. With a
  texture: TEXCOORD_0 float32 (glTF's origin is the image's top-left: t = 1 - v) and a material
  whose base colour is the embedded PNG; COLOR_0 is then left out, since glTF multiplies it into
  the base colour (the texture already holds the colours).
* textured ``.obj``: ``mtllib <name>.mtl``, the ``v x y z r g b`` lines, ``vt u v`` lines, and
  ``f a/a b/b c/c`` (vertex and UV indices are the same); the .mtl's ``map_Kd`` names the PNG.

All files go through :func:`util.atomic_files.write_bytes_atomic`: complete or absent.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from util.atomic_files import write_bytes_atomic

HEADER_COMMENT = "written by Deep3DFaceRecon (modern reproduction)"
TEXTURE_SUFFIX = "_texture.png"


@dataclass(frozen=True)
class MeshSettings:
    """How a run writes its meshes (shared by every face; sent once to each writer process).

    Attributes:
        fmt: 'obj' | 'ply' | 'glb'.
        faces: (F, 3) int64 vertex indices, 0-based.
        uv: (N, 2) float32 texture layout in 0..1 (v up, as .obj and .ply store it) or None (no texture).
        face_block: the format's triangle bytes, made once.
        uv_block: the .obj's ``vt`` lines or the .glb's TEXCOORD_0 bytes (v flipped to glTF's down),
            b'' without ``uv``.
    """

    fmt: str
    faces: np.ndarray
    uv: np.ndarray | None = None
    face_block: bytes = b""
    uv_block: bytes = b""


def mesh_settings(fmt: str, faces: np.ndarray, uv: np.ndarray | None = None) -> MeshSettings:
    """:class:`MeshSettings` with the per-run blocks made.

    Args:
        fmt: 'obj', 'ply' or 'glb'.
        faces: (F, 3) integer vertex indices, 0-based (anything reshaping to it).
        uv: (N, 2) texture layout in 0..1, v up, or None for meshes with vertex colours only.

    Returns:
        The settings.

    Raises:
        ValueError: ``fmt`` is none of the three.
    """
    from util.mesh_io import _FixedColumn, _lines, face_lines

    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    uv_block = b""
    if fmt == "obj":
        if uv is None:
            block = face_lines(faces)
        else:
            f = faces + 1
            block = "".join(f"f {a}/{a} {b}/{b} {c}/{c}\n" for a, b, c in f.tolist()).encode()
            uv_block = _lines(b"vt", [_FixedColumn(uv[:, k], 6) for k in range(2)])
    elif fmt == "ply":
        rec = np.empty(len(faces), np.dtype([("n", "u1"), ("i", "<i4", 3)]))
        rec["n"], rec["i"] = 3, faces
        block = rec.tobytes()
    elif fmt == "glb":
        block = faces.astype("<u2" if faces.max(initial=0) < 65535 else "<u4").tobytes()
        if uv is not None:
            uv_block = np.stack([uv[:, 0], 1 - uv[:, 1]], 1).astype("<f4").tobytes()
    else:
        raise ValueError(f"unknown mesh format {fmt!r}; use one of obj, ply, glb")
    return MeshSettings(fmt, faces, None if uv is None else np.asarray(uv, np.float32), block, uv_block)


# --------------------------------------------------------------------------- formats
def _obj_chunks(s: MeshSettings, name: str, vertices: np.ndarray, colors: np.ndarray) -> list:
    from util.mesh_io import OBJ_HEADER, vertex_lines

    head = [OBJ_HEADER]
    if s.uv is not None:
        head.append(f"mtllib {name}.mtl\n".encode())
        return head + [vertex_lines(vertices, colors), s.uv_block, b"usemtl face\n", s.face_block]
    return head + [vertex_lines(vertices, colors), s.face_block]


def mtl_text(texture_file: str) -> bytes:
    """The .mtl of a textured .obj: one material ``face``, unlit white times the texture.

    Args:
        texture_file: the texture's file name, relative to the .mtl (``map_Kd``).

    Returns:
        The file's bytes (UTF-8 text).
    """
    return (f"# {HEADER_COMMENT}\nnewmtl face\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\n"
            f"map_Kd {texture_file}\n").encode()


def _ply_chunks(s: MeshSettings, name: str, vertices: np.ndarray, colors: np.ndarray) -> list:
    fields = [("p", "<f4", 3), ("c", "u1", 3)]
    props = ["float x", "float y", "float z", "uchar red", "uchar green", "uchar blue"]
    head = ["ply", "format binary_little_endian 1.0", f"comment {HEADER_COMMENT}"]
    if s.uv is not None:
        fields.append(("t", "<f4", 2))
        props += ["float s", "float t"]
        head.append(f"comment TextureFile {name}{TEXTURE_SUFFIX}")
    rec = np.empty(len(vertices), np.dtype(fields))
    rec["p"], rec["c"] = vertices, colors
    if s.uv is not None:
        rec["t"] = s.uv
    head += [f"element vertex {len(vertices)}", *(f"property {p}" for p in props),
             f"element face {len(s.faces)}", "property list uchar int vertex_indices", "end_header"]
    return [("\n".join(head) + "\n").encode(), rec.tobytes(), s.face_block]


def _pad4(b: bytes, fill: bytes = b"\0") -> bytes:
    return b + fill * (-len(b) % 4)


def glb_chunks(s: MeshSettings, vertices: np.ndarray, colors: np.ndarray | None, png: bytes | None = None) -> list:
    """A binary glTF 2.0 file (see the module's docstring) as byte chunks.

    Args:
        s: the settings (``fmt`` 'glb'; ``face_block`` and ``uv_block`` from :func:`mesh_settings`).
        vertices: (N, 3) world-space positions, stored as float32.
        colors: (N, 3) uint8 vertex colours (used when ``png`` is None).
        png: the texture's PNG bytes, or None for vertex colours.

    Returns:
        A list of bytes-like chunks whose concatenation is the .glb file.
    """
    v = np.ascontiguousarray(vertices, "<f4")
    columns = np.ascontiguousarray(v.T)  # min/max along rows of (N, 3) is ~20x slower than along columns
    n, n_idx = len(v), 3 * len(s.faces)
    blobs, views, accessors = [], [], []

    def add(data: bytes, accessor: dict | None = None, target: int | None = None) -> int:
        offset = sum(len(b) for b in blobs)
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data),
                      **({"target": target} if target else {})})
        blobs.append(_pad4(data))
        if accessor is not None:
            accessors.append({"bufferView": len(views) - 1, **accessor})
            return len(accessors) - 1
        return len(views) - 1

    index_type = 5123 if len(s.face_block) == 2 * n_idx else 5125
    prim: dict = {"indices": add(s.face_block, {"componentType": index_type, "count": n_idx, "type": "SCALAR"},
                                 34963), "mode": 4, "attributes": {}}
    box = {"min": columns.min(1).tolist(), "max": columns.max(1).tolist()}
    prim["attributes"]["POSITION"] = add(v.tobytes(), {"componentType": 5126, "count": n, "type": "VEC3", **box},
                                         34962)
    doc: dict = {"asset": {"version": "2.0", "generator": HEADER_COMMENT}, "scene": 0,
                 "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}], "meshes": [{"primitives": [prim]}]}
    if png is None:
        c = np.ascontiguousarray(colors, np.uint8)
        prim["attributes"]["COLOR_0"] = add(_pad_rgb(c), {"componentType": 5121, "normalized": True,
                                                         "count": n, "type": "VEC3"}, 34962)
        views[-1]["byteStride"] = 4
    else:
        prim["attributes"]["TEXCOORD_0"] = add(s.uv_block, {"componentType": 5126, "count": n, "type": "VEC2"},
                                               34962)
        doc["images"] = [{"bufferView": add(png), "mimeType": "image/png"}]
        doc["samplers"] = [{"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}]
        doc["textures"] = [{"source": 0, "sampler": 0}]
        doc["materials"] = [{"name": "face", "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0}, "metallicFactor": 0.0, "roughnessFactor": 1.0}}]
        prim["material"] = 0
    doc["bufferViews"], doc["accessors"] = views, accessors
    total_bin = sum(len(b) for b in blobs)
    doc["buffers"] = [{"byteLength": total_bin}]
    js = _pad4(json.dumps(doc, separators=(",", ":")).encode(), b" ")
    length = 12 + 8 + len(js) + 8 + total_bin
    return [struct.pack("<4sII", b"glTF", 2, length), struct.pack("<II", len(js), 0x4E4F534A), js,
            struct.pack("<II", total_bin, 0x004E4942), *blobs]


def _pad_rgb(c: np.ndarray) -> bytes:
    """(N, 3) uint8 -> RGB0 records of 4 bytes (glTF vertex attributes start on 4-byte boundaries)."""
    out = np.zeros((len(c), 4), np.uint8)
    out[:, :3] = c
    return out.tobytes()


def mesh_files(s: MeshSettings, name: str, vertices: np.ndarray, colors: np.ndarray,
               texture_png: list[bytes] | None = None) -> list[tuple[str, list]]:
    """The files of a face's mesh, made in memory.

    Args:
        s: the run's :class:`MeshSettings`.
        name: the face's file name without suffix or folder (what an .obj's ``mtllib`` names).
        vertices: (N, 3) world-space float positions.
        colors: (N, 3) uint8 vertex colours.
        texture_png: the texture's PNG chunks; needed when the settings carry a UV layout.

    Returns:
        [(suffix of the face's name, bytes-like chunks)]: ``.<fmt>`` first, then, when the settings
        carry a UV layout, the texture ``_texture.png`` and for .obj its ``.mtl``.

    Raises:
        ValueError: a textured mesh without ``texture_png``.
    """
    files: list[tuple[str, list]] = []
    if s.uv is not None:
        if texture_png is None:
            raise ValueError("a textured mesh needs its texture's PNG bytes")
        files.append((TEXTURE_SUFFIX, texture_png))
    if s.fmt == "obj":
        chunks = _obj_chunks(s, name, vertices, colors)
        if s.uv is not None:
            files.append((".mtl", [mtl_text(name + TEXTURE_SUFFIX)]))
    elif s.fmt == "ply":
        chunks = _ply_chunks(s, name, vertices, colors)
    else:
        chunks = glb_chunks(s, vertices, colors, None if s.uv is None else b"".join(texture_png))
    return [("." + s.fmt, chunks), *files]


def write_mesh(s: MeshSettings, base: str, vertices: np.ndarray, colors: np.ndarray,
               texture_png: list[bytes] | None = None) -> list[str]:
    """Write :func:`mesh_files` beside ``base`` (each complete or absent).

    Args:
        s: the run's :class:`MeshSettings`.
        base: the face's path without suffix (its folder must exist).
        vertices, colors, texture_png: as :func:`mesh_files`.

    Returns:
        The paths written, ``base + suffix``, in :func:`mesh_files`' order.

    Raises:
        ValueError: as :func:`mesh_files`.
        OSError: a file cannot be written (:func:`util.atomic_files.write_bytes_atomic`).
    """
    written = []
    for suffix, chunks in mesh_files(s, os.path.basename(base), vertices, colors, texture_png):
        write_bytes_atomic(base + suffix, chunks)
        written.append(base + suffix)
    return written


def mesh_suffixes(fmt: str, textured: bool) -> list[str]:
    """The files :func:`write_mesh` writes per face, as suffixes of the face's name.

    Args:
        fmt: 'obj', 'ply' or 'glb'.
        textured: whether the meshes carry a texture.

    Returns:
        E.g. ``['.obj', '_texture.png', '.mtl']``, in :func:`mesh_files`' order.
    """
    out = ["." + fmt]
    if textured:
        out.append(TEXTURE_SUFFIX)
        if fmt == "obj":
            out.append(".mtl")
    return out
