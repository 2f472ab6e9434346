"""Mesh files (.obj/.ply/.glb, with and without a UV texture), the UV layout and the per-face texture."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from util.mesh_formats import TEXTURE_SUFFIX, mesh_settings, mesh_suffixes, write_mesh
from util.png import png_chunks
from util.uv_texture import (UV_FILE, boundary_loops, face_texture, fill_holes, load_uv_layout, mean_value_layout,
                             signed_areas, uv_raster)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grid(n: int = 9, hole: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An n x n grid on a bump, x and y in [-0.5, 0.5], counter-clockwise seen from +z; with
    ``hole`` the middle cell's two triangles are left out (a second boundary, like the mouth)."""
    xs, ys = np.meshgrid(np.linspace(-0.5, 0.5, n), np.linspace(-0.5, 0.5, n))
    v = np.stack([xs, ys, 0.2 * np.cos(2 * xs) * np.cos(2 * ys)], -1).reshape(-1, 3)
    tri = []
    for r in range(n - 1):
        for c in range(n - 1):
            if hole and r == c == (n - 1) // 2:
                continue
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            tri += [(a, b, e), (a, e, d)]
    return v, np.array(tri)


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
@pytest.mark.parametrize("textured", [False, True])
def test_mesh_files_read_back_with_trimesh(tmp_path, fmt, textured):
    trimesh = pytest.importorskip("trimesh")
    v, f = grid()
    colors = np.random.default_rng(0).integers(0, 256, (len(v), 3)).astype(np.uint8)
    uv = mean_value_layout(v, f).astype(np.float32) if textured else None
    texture = np.zeros((16, 32, 3), np.uint8)
    texture[:, :, 0] = 200
    base = str(tmp_path / "face")
    written = write_mesh(mesh_settings(fmt, f, uv), base, v, colors, png_chunks(texture) if textured else None)
    assert sorted(written) == sorted(base + s for s in mesh_suffixes(fmt, textured))
    assert sorted(os.listdir(tmp_path)) == sorted("face" + s for s in mesh_suffixes(fmt, textured))
    mesh = trimesh.load(base + "." + fmt, process=False, force="mesh")
    np.testing.assert_allclose(mesh.vertices, v, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, f)
    if textured:
        np.testing.assert_allclose(mesh.visual.uv, uv, atol=1e-6)
        material = mesh.visual.material
        image = getattr(material, "baseColorTexture", None) or material.image  # glTF's PBR material, or .mtl's
        image = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(image, texture)
    else:
        np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], colors)
    if fmt == "obj" and textured:  # vertex colours stay in the textured .obj
        first = next(line for line in open(base + ".obj") if line.startswith("v "))
        assert [round(float(x) * 255) for x in first.split()[4:]] == colors[0].tolist()


def test_glb_index_width_and_unknown_format():
    v, f = grid(3)
    assert len(mesh_settings("glb", f).face_block) == 2 * f.size  # uint16 indices below 65535 vertices
    assert len(mesh_settings("glb", f + 70000).face_block) == 4 * f.size
    with pytest.raises(ValueError, match="unknown mesh format 'stl'"):
        mesh_settings("stl", f)


def test_layout_closes_holes_and_folds_nothing():
    v, f = grid(9, hole=True)
    assert len(boundary_loops(f)) == 2
    v2, f2 = fill_holes(v, f)
    assert len(v2) == len(v) + 1 and len(boundary_loops(f2)) == 1
    uv = mean_value_layout(v, f, margin=0.02)
    assert uv.shape == (len(v), 2) and uv.min() >= 0.02 - 1e-9 and uv.max() <= 0.98 + 1e-9
    assert (signed_areas(uv, f) > 0).all()  # same winding as seen from +z: no fold, no mirror
    assert np.corrcoef(uv[:, 0], v[:, 0])[0, 1] > 0.9 and np.corrcoef(uv[:, 1], v[:, 1])[0, 1] > 0.9


def test_shipped_bfm_layout(standin_face_model):
    path = os.path.join(ROOT, "BFM", UV_FILE)
    assert os.path.getsize(path) < 1 << 20
    faces = standin_face_model.face_buf.numpy()
    uv = load_uv_layout(os.path.join(ROOT, "no-such-folder"), standin_face_model.n_vertex)  # falls back to BFM/
    assert uv.shape == (35709, 2) and uv.dtype == np.float32 and 0 <= uv.min() and uv.max() <= 1
    assert (signed_areas(uv, faces) > 0).all()
    with pytest.raises(ValueError, match="make one for it with python tools/make_bfm_uv.py"):
        load_uv_layout(os.path.join(ROOT, "BFM"), 100)


def test_face_texture_samples_photo_where_visible_and_albedo_elsewhere():
    v, f = grid(5)
    v[:, 2] = 10.0  # a flat square facing the camera at z = 10
    uv = (v[:, :2] + 0.5) * 0.8 + 0.1  # a known linear layout
    size, focal, center = 64, 200.0, 112.0
    raster = uv_raster(uv, f, size)
    rows, cols = np.mgrid[0:224, 0:224]
    photo = np.stack([cols, rows, np.full_like(cols, 100)], -1).astype(np.uint8)  # bilinear is exact on it
    albedo = np.tile(np.array([[10, 20, 30]], np.uint8), (len(v), 1))
    seen = face_texture(raster, v, albedo, np.full(len(v), 255, np.uint8), photo, focal, center).reshape(-1, 3)
    # independently: texel centre -> (u, v) -> point on the plane -> crop pixel
    ty, tx = np.divmod(raster.texel, size)
    x, y = ((tx + 0.5) / size - 0.1) / 0.8 - 0.5, ((1 - (ty + 0.5) / size) - 0.1) / 0.8 - 0.5
    want = np.stack([focal * x / 10 + center - 0.5, center - focal * y / 10 - 0.5], 1)
    np.testing.assert_allclose(seen[raster.texel, :2], want, atol=0.6)
    hidden = face_texture(raster, v, albedo, np.zeros(len(v), np.uint8), photo, focal, center).reshape(-1, 3)
    assert (hidden[raster.texel] == [10, 20, 30]).all()
    assert len(raster.texel) == pytest.approx((0.8 * size) ** 2, rel=0.1)  # the chart covers 0.8 x 0.8


def test_vertex_visibility_hides_the_far_cheek(standin_face_model):
    from models.coeffs import COEFFS
    from pipeline.extra_arrays import vertex_visibility
    from models.renderer import create_renderer

    coeffs = torch.zeros(2, COEFFS.total)
    coeffs[1, COEFFS.slices()["angle"]] = torch.tensor([0.0, 1.2, 0.0])  # yaw ~69 degrees
    face = standin_face_model(coeffs)
    out = create_renderer("cpu")(face.vertex, standin_face_model.face_buf)
    vis = vertex_visibility(standin_face_model, face, out.depth).numpy()
    x = standin_face_model.mean_shape.reshape(-1, 3)[:, 0].numpy()
    front, side = vis[0], vis[1]
    assert (front > 0).mean() > 0.8  # frontal: most of the face is seen
    left, right = x < np.percentile(x, 20), x > np.percentile(x, 80)
    assert min(side[left].mean(), side[right].mean()) < 0.1 * max(side[left].mean(), side[right].mean())
