"""Tests of models.renderer: the CPU rasterizer against analytic ray casting, and (on a GPU)
the nvdiffrast backends against the CPU one.

GPU tests are marked ``gpu`` and skip without CUDA; nvdiffrast tests also skip without it.
Run them on a GPU machine with ``python -m pytest -q -m gpu tests/test_renderer.py``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.renderer import (ClipProjection, CpuRasterizer, MeshRenderer, RenderOutput, create_renderer,
                             resolve_backend)
from models.renderer import nvdiffrast_backend

FOCAL, CENTER, NEAR, FAR = 1015.0, 112.0, 5.0, 15.0
HAS_CUDA = torch.cuda.is_available()
HAS_NVDIFFRAST = importlib.util.find_spec("nvdiffrast") is not None


# ---------------------------------------------------------------------------------------------
# independent numpy reference: cast the ray of every pixel centre at every triangle

def pixel_rays(focal: float, center: float) -> np.ndarray:
    """(S, S, 3) direction (x/z, y/z, 1) through pixel (row i, col j); row 0 at the top (y up)."""
    s = int(2 * center)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    return np.stack([(j + 0.5 - center) / focal, (center - 0.5 - i) / focal, np.ones((s, s))], axis=-1)


def ray_cast(vertex: np.ndarray, tri: np.ndarray, focal=FOCAL, center=CENTER, near=NEAR, far=FAR, eps=1e-4):
    """Reference render of one mesh (float64).

    Returns mask (S,S) bool, depth (S,S), face (S,S) int (-1 = none), bary (S,S,3) and
    ``unsure`` (S,S) bool: pixels within ``eps`` (in barycentric or relative-depth units) of an
    edge, of the near/far planes, or of a depth tie, where backends may legitimately differ.
    """
    d = pixel_rays(focal, center)
    s = d.shape[0]
    depth = np.full((s, s), np.inf)
    face = np.full((s, s), -1)
    bary = np.zeros((s, s, 3))
    unsure = np.zeros((s, s), bool)
    second = np.full((s, s), np.inf)
    for k, (a, b, c) in enumerate(vertex[tri]):
        nrm = np.cross(b - a, c - a)
        denom = d @ nrm
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (a @ nrm) / denom  # ray parameter = camera z, since d_z = 1
            p = d * z[..., None]
            area = nrm @ nrm
            w0 = np.cross(c - b, p - b) @ nrm / area
            w1 = np.cross(a - c, p - c) @ nrm / area
            w2 = 1.0 - w0 - w1
        w = np.stack([w0, w1, w2], axis=-1)
        ok = np.isfinite(z) & (np.abs(denom) > 1e-12)
        inside = ok & (w >= 0).all(-1) & (z >= near) & (z <= far)
        near_edge = ok & (np.abs(w) < eps).any(-1) & (w > -eps).all(-1)
        near_clip = ok & (w > -eps).all(-1) & ((np.abs(z - near) < eps * near) | (np.abs(z - far) < eps * far))
        unsure |= near_edge | near_clip
        closer = inside & (z < depth)
        second = np.where(closer, depth, np.where(inside, np.minimum(second, z), second))
        depth = np.where(closer, z, depth)
        face = np.where(closer, k, face)
        bary = np.where(closer[..., None], w, bary)
    with np.errstate(invalid="ignore"):
        unsure |= np.isfinite(second) & (np.abs(second - depth) < eps * np.abs(depth))
    mask = face >= 0
    return mask, np.where(mask, depth, 0.0), face, bary, unsure


def render(renderer, vertex, tri, feat=None):
    return renderer(torch.as_tensor(vertex)[None], torch.as_tensor(tri), None if feat is None
                    else torch.as_tensor(feat)[None])


def small_projection(size=32):
    """A camera with the default field of view and a small image (fast tests)."""
    center = size / 2
    return dict(focal=FOCAL * center / CENTER, center=center, z_near=NEAR, z_far=FAR)


def uv_sphere(n_lat=40, n_lon=80, radius=1.0, z=10.0):
    """Closed UV sphere: vertices (N,3) float64 centred at (0, 0, z), triangles (M,3) int64."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    vert = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * radius + [0, 0, z]
    tris = []
    idx = lambda r, c: 1 + r * n_lon + c % n_lon  # noqa: E731
    for c in range(n_lon):
        tris.append([0, idx(0, c + 1), idx(0, c)])
        tris.append([len(vert) - 1, idx(n_lat - 2, c), idx(n_lat - 2, c + 1)])
    for r in range(n_lat - 2):
        for c in range(n_lon):
            tris.append([idx(r, c), idx(r, c + 1), idx(r + 1, c)])
            tris.append([idx(r, c + 1), idx(r + 1, c + 1), idx(r + 1, c)])
    return vert, np.array(tris, dtype=np.int64)


@pytest.fixture(scope="module")
def cpu_renderer():
    return create_renderer("cpu")


# a generic triangle (no pixel centre near its edges) and a tilted one (varying depth)
TRIANGLE = np.array([[-0.61, -0.43, 10.0], [0.73, -0.29, 10.0], [0.07, 0.81, 10.0]])
TILTED = np.array([[-0.83, -0.52, 9.1], [0.77, -0.61, 11.3], [0.12, 0.88, 10.4]])


# ---------------------------------------------------------------------------------------------
# projection and interface

def test_projection_matches_original_formula():
    proj = ClipProjection(FOCAL, CENTER, NEAR, FAR)
    # the original: ndc_projection(x, n, f) @ diag(1, -1, -1, 1) applied to (x, -y, z, 1)
    fov = 2 * np.arctan(CENTER / FOCAL) * 180 / np.pi
    x0 = np.tan(np.deg2rad(fov * 0.5)) * NEAR
    frustum = np.array([[NEAR / x0, 0, 0, 0], [0, NEAR / -x0, 0, 0],
                        [0, 0, -(FAR + NEAR) / (FAR - NEAR), -(2 * FAR * NEAR) / (FAR - NEAR)], [0, 0, -1, 0]])
    m = frustum @ np.diag([1.0, -1, -1, 1])
    np.testing.assert_allclose(proj.matrix().numpy(), m, rtol=1e-12)
    v = np.random.default_rng(0).normal(size=(5, 3)) + [0, 0, 10]
    expected = np.concatenate([v * [1, -1, 1], np.ones((5, 1))], 1) @ m.T
    clip = proj.to_clip(torch.tensor(v)[None])[0].numpy()
    np.testing.assert_allclose(clip, expected, rtol=1e-12, atol=1e-12)
    # worked out: (focal/center x, -focal/center y, ..., z)
    np.testing.assert_allclose(clip[:, 0], FOCAL / CENTER * v[:, 0], rtol=1e-12)
    np.testing.assert_allclose(clip[:, 1], -FOCAL / CENTER * v[:, 1], rtol=1e-12)
    np.testing.assert_allclose(clip[:, 3], v[:, 2], rtol=1e-12)
    ndc_z = (FAR + NEAR) / (FAR - NEAR) - 2 * FAR * NEAR / ((FAR - NEAR) * v[:, 2])
    np.testing.assert_allclose(clip[:, 2] / clip[:, 3], ndc_z)
    assert proj.image_size == 224


def test_output_types_shapes_and_dtype(cpu_renderer):
    v = torch.tensor(TRIANGLE)[None].repeat(3, 1, 1)
    out = cpu_renderer(v, torch.tensor([[0, 1, 2]]), feat=torch.rand(3, 3, 5, dtype=torch.float64))
    assert isinstance(out, RenderOutput)
    assert out.mask.shape == out.depth.shape == (3, 1, 224, 224)
    assert out.image.shape == (3, 5, 224, 224)
    assert out.mask.dtype == out.depth.dtype == out.image.dtype == torch.float64
    assert set(out.mask.unique().tolist()) == {0.0, 1.0}
    assert cpu_renderer(v.float(), torch.tensor([[0, 1, 2]])).image is None
    with pytest.raises(Exception):
        out.mask = None  # frozen


@pytest.mark.parametrize("bad", [
    dict(vertex=torch.zeros(4, 3)), dict(vertex=torch.zeros(1, 4, 2)), dict(tri=torch.zeros(1, 3)),
    dict(tri=torch.zeros(3, dtype=torch.long)), dict(feat=torch.zeros(1, 5, 3)), dict(feat=torch.zeros(2, 4, 3)),
])
def test_bad_inputs_raise(cpu_renderer, bad):
    args = dict(vertex=torch.zeros(1, 4, 3), tri=torch.tensor([[0, 1, 2]]), feat=None) | bad
    with pytest.raises(ValueError):
        cpu_renderer(args["vertex"], args["tri"], args["feat"])


def test_index_out_of_range_raises(cpu_renderer):
    with pytest.raises(IndexError, match="0-based"):
        cpu_renderer(torch.zeros(1, 3, 3), torch.tensor([[1, 2, 3]]))


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("cpu", "cpu") == "cpu"
    assert resolve_backend("auto", None) in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown renderer backend"):
        resolve_backend("vulkan")
    for backend in ("cuda", "opengl"):
        with pytest.raises(RuntimeError, match="--device cpu"):
            resolve_backend(backend, "cpu")
    if not (HAS_CUDA and HAS_NVDIFFRAST):
        with pytest.raises(RuntimeError, match="--device cpu"):
            create_renderer("cuda")
    r = create_renderer("cpu", focal=500.0, center=64.0)
    assert isinstance(r, MeshRenderer) and r.backend == "cpu" and r.image_size == 128


# ---------------------------------------------------------------------------------------------
# CPU backend against the analytic reference

@pytest.mark.parametrize("vert", [TRIANGLE, TILTED], ids=["flat", "tilted"])
def test_coverage_equals_analytic_projection(cpu_renderer, vert):
    # pixel centre inside the 2D triangle of the projected vertices (pixel-centre units)
    col = FOCAL * vert[:, 0] / vert[:, 2] + CENTER - 0.5
    row = CENTER - FOCAL * vert[:, 1] / vert[:, 2] - 0.5
    i, j = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    edges = []
    for a, b in ((0, 1), (1, 2), (2, 0)):
        edges.append((col[b] - col[a]) * (i - row[a]) - (row[b] - row[a]) * (j - col[a]))
    edges = np.stack(edges)
    expected = (edges >= 0).all(0) | (edges <= 0).all(0)
    assert np.abs(edges).min() > 1e-3  # no pixel centre on an edge: the sets are unambiguous
    out = render(cpu_renderer, vert, [[0, 1, 2]])
    np.testing.assert_array_equal(out.mask[0, 0].numpy() > 0, expected)
    assert expected.sum() > 1000


def test_constant_linear_features_and_depth(cpu_renderer):
    out = render(cpu_renderer, TILTED, [[0, 1, 2]], np.concatenate([np.full((3, 1), 0.3), TILTED], 1))
    mask, depth, face, _, unsure = ray_cast(TILTED, np.array([[0, 1, 2]]))
    assert (out.mask[0, 0].numpy() > 0)[~unsure].tolist() == mask[~unsure].tolist()
    m = mask & ~unsure
    img = out.image[0].numpy()
    np.testing.assert_allclose(img[0][m], 0.3, atol=1e-12)
    # perspective-correct interpolation of a linear function of the position is exact
    hit = pixel_rays(FOCAL, CENTER) * depth[..., None]
    np.testing.assert_allclose(np.moveaxis(img[1:], 0, -1)[m], hit[m], atol=1e-9)
    np.testing.assert_allclose(out.depth[0, 0].numpy()[m], depth[m], atol=1e-9)
    assert (img[:, ~mask] == 0).all() and (out.depth[0, 0].numpy()[~mask] == 0).all()


def test_fronto_parallel_depth_is_plane_z(cpu_renderer):
    out = render(cpu_renderer, TRIANGLE.astype(np.float32), [[0, 1, 2]])
    d = out.depth[0, 0][out.mask[0, 0] > 0]
    assert out.depth.dtype == torch.float32
    torch.testing.assert_close(d, torch.full_like(d, 10.0))


def test_nearer_triangle_wins_regardless_of_order(cpu_renderer):
    far_tri = TRIANGLE * [1.0, 1.0, 1.2]  # same footprint, further away
    near_tri = TRIANGLE[[1, 2, 0]] * [0.6, 0.6, 1.0] + [0.1, 0.05, -1.0]
    vert = np.concatenate([far_tri, near_tri])
    colour = np.repeat([[1.0, 0.0], [0.0, 1.0]], 3, axis=0)
    for tri in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        out = render(cpu_renderer, vert, tri, colour)
        mask, depth, face, _, unsure = ray_cast(vert, np.array(tri))
        front = face[~unsure] == tri.index([3, 4, 5])
        ok = mask[~unsure]
        np.testing.assert_allclose(out.image[0, 1].numpy()[~unsure][ok], front[ok].astype(float), atol=1e-12)
        np.testing.assert_allclose(out.depth[0, 0].numpy()[~unsure], depth[~unsure], atol=1e-9)
        assert front.sum() > 100 and (~front & ok).sum() > 100


def test_random_soup_matches_ray_casting():
    """Interpenetrating random triangles, some crossing the near/far planes, vs the reference."""
    rng = np.random.default_rng(1)
    proj = small_projection(32)
    renderer = create_renderer("cpu", **proj)
    centres = rng.uniform([-0.8, -0.8, 6.0], [0.8, 0.8, 14.0], size=(25, 1, 3))
    vert = (centres + rng.normal(scale=[0.5, 0.5, 2.0], size=(25, 3, 3))).reshape(-1, 3)
    tri = np.arange(75).reshape(25, 3)
    out = render(renderer, vert, tri, vert)
    mask, depth, face, _, unsure = ray_cast(vert, tri, proj["focal"], proj["center"], eps=1e-6)
    sure = ~unsure
    np.testing.assert_array_equal(out.mask[0, 0].numpy()[sure] > 0, mask[sure])
    np.testing.assert_allclose(out.depth[0, 0].numpy()[sure], depth[sure], atol=1e-8)
    assert mask.sum() > 200 and sure.mean() > 0.95


def test_batch_renders_each_mesh_independently(cpu_renderer):
    verts = np.stack([TRIANGLE, TILTED])
    feats = np.random.default_rng(2).uniform(size=(2, 3, 4))
    batch = cpu_renderer(torch.tensor(verts), torch.tensor([[0, 1, 2]]), torch.tensor(feats))
    for k in range(2):
        single = render(cpu_renderer, verts[k], [[0, 1, 2]], feats[k])
        torch.testing.assert_close(batch.mask[k], single.mask[0], rtol=0, atol=0)
        torch.testing.assert_close(batch.depth[k], single.depth[0], rtol=0, atol=0)
        torch.testing.assert_close(batch.image[k], single.image[0], rtol=0, atol=0)
    assert not torch.equal(batch.mask[0], batch.mask[1])


def test_both_windings_render_the_same(cpu_renderer):
    feat = np.eye(3)
    a = render(cpu_renderer, TILTED, [[0, 1, 2]], feat)
    b = render(cpu_renderer, TILTED, [[0, 2, 1]], feat)
    assert a.mask.sum() > 1000
    torch.testing.assert_close(a.mask, b.mask, rtol=0, atol=0)
    torch.testing.assert_close(a.image, b.image)
    torch.testing.assert_close(a.depth, b.depth)


def test_clipping_behind_camera_and_beyond_far(cpu_renderer):
    cases = {
        "behind camera": np.array([[-0.5, -0.4, 10.0], [0.6, -0.3, 10.0], [0.1, 0.2, -4.0]]),
        "through near plane": np.array([[-0.5, -0.4, 9.0], [0.6, -0.3, 9.0], [0.05, 0.2, 1.0]]),
        "beyond far": np.array([[-0.5, -0.4, 12.0], [0.6, -0.3, 12.0], [0.1, 0.45, 22.0]]),
        "all behind": np.array([[-0.5, -0.4, -1.0], [0.6, -0.3, -2.0], [0.1, 0.45, -3.0]]),
        "all too far": np.array([[-0.5, -0.4, 16.0], [0.6, -0.3, 17.0], [0.1, 0.45, 18.0]]),
    }
    for name, vert in cases.items():
        out = render(cpu_renderer, vert, [[0, 1, 2]], vert)
        mask, depth, _, _, unsure = ray_cast(vert, np.array([[0, 1, 2]]))
        got = out.mask[0, 0].numpy() > 0
        assert torch.isfinite(out.image).all() and torch.isfinite(out.depth).all(), name
        np.testing.assert_array_equal(got[~unsure], mask[~unsure], err_msg=name)
        np.testing.assert_allclose(out.depth[0, 0].numpy()[~unsure], depth[~unsure], atol=1e-8, err_msg=name)
        d = out.depth[0, 0][out.mask[0, 0] > 0]
        assert ((d >= NEAR - 1e-9) & (d <= FAR + 1e-9)).all(), name
        assert (mask.sum() > 0) == (name not in ("all behind", "all too far")), name


def test_degenerate_offscreen_and_nan_triangles_are_skipped(cpu_renderer):
    good = TILTED
    junk = np.array([[0.0, 0.0, 10.0], [0.1, 0.1, 10.0], [0.2, 0.2, 10.0],  # collinear
                     [0.3, 0.3, 10.0], [0.3, 0.3, 10.0], [0.3, 0.3, 10.0],  # a point
                     [5.0, 5.0, 10.0], [6.0, 5.0, 10.0], [5.0, 6.0, 10.0],  # off-screen
                     [0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0],  # at the camera centre
                     [np.nan, 0.0, 10.0], [0.1, 0.0, 10.0], [0.0, 0.1, 10.0]])  # NaN vertex
    vert = np.concatenate([good, junk])
    tri = np.arange(len(vert)).reshape(-1, 3)
    feat = np.ones((len(vert), 2))
    ref = render(cpu_renderer, good, [[0, 1, 2]], feat[:3])
    out = render(cpu_renderer, vert, tri, feat)
    torch.testing.assert_close(out.mask, ref.mask, rtol=0, atol=0)
    torch.testing.assert_close(out.image, ref.image)
    empty = render(cpu_renderer, junk, tri[1:] - 3, feat[3:])
    assert empty.mask.sum() == 0 and empty.depth.abs().sum() == 0


def test_closed_mesh_is_watertight_and_chunking_is_invisible():
    vert, tri = uv_sphere(24, 48)
    proj = small_projection(96)
    default = create_renderer("cpu", **proj)
    out = render(default, vert.astype(np.float32), tri, vert.astype(np.float32))
    # every pixel whose ray meets the inscribed sphere's silhouette disc well inside is covered
    rays = pixel_rays(proj["focal"], proj["center"])
    angle = np.arctan(np.hypot(rays[..., 0], rays[..., 1]))
    inner = angle < math.asin(0.99 / 10.0) - 1.5 / proj["focal"]
    assert inner.sum() > 4000
    assert (out.mask[0, 0].numpy() > 0)[inner].all()
    chunked = MeshRenderer(CpuRasterizer(max_pairs=97, max_triangles=len(tri)), default.projection)
    batch = (torch.tensor(vert, dtype=torch.float32)[None] + torch.tensor([[[0.0, 0.0, 0.0]], [[0.2, 0.1, 1.0]]]))
    args = (batch, torch.tensor(tri), batch)
    small, whole = chunked(*args), default(*args)  # one image per group, many pair chunks / one of each
    torch.testing.assert_close(small.mask, whole.mask, rtol=0, atol=0)
    torch.testing.assert_close(small.image, whole.image, rtol=0, atol=0)
    torch.testing.assert_close(small.mask[:1], out.mask, rtol=0, atol=0)


def test_gradients_flow_to_vertices_and_features(cpu_renderer):
    v = torch.tensor(TILTED, requires_grad=True)
    f = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    out = cpu_renderer(v[None], torch.tensor([[0, 1, 2]]), f[None])
    (out.image.sum() + out.depth.sum()).backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert torch.isfinite(f.grad).all() and (f.grad > 0).all()
    assert not out.mask.requires_grad
    f.grad = None
    far_away = v[None] + torch.tensor([0.0, 0.0, 50.0], dtype=torch.float64)
    hidden = cpu_renderer(far_away, torch.tensor([[0, 1, 2]]), f[None])
    hidden.image.sum().backward()  # nothing visible: still differentiable, with zero gradient
    assert hidden.mask.sum() == 0 and (f.grad == 0).all()


def test_gradcheck_float64():
    proj = small_projection(12)
    renderer = create_renderer("cpu", **proj)
    vert = torch.tensor([[-0.7, -0.53, 9.63], [0.67, -0.64, 10.92], [0.12, 0.79, 10.16], [0.77, 0.54, 9.8]],
                        dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    feat = torch.rand(1, 4, 2, dtype=torch.float64)
    _, _, _, _, unsure = ray_cast(vert.numpy(), tri.numpy(), proj["focal"], proj["center"], eps=2e-3)
    assert not unsure.any()  # no pixel centre near an edge: coverage is constant under the probes

    def fn(v, f):
        out = renderer(v[None], tri, f)
        return out.image, out.depth

    assert torch.autograd.gradcheck(fn, (vert.clone().requires_grad_(), feat.requires_grad_()), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# nvdiffrast plugin loading (runs anywhere: the package is faked)

def test_missing_nvdiffrast_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    with pytest.raises(RuntimeError, match=r"pip install diffrp-nvdiffrast==0\.3\.3\.1"):
        nvdiffrast_backend._import_nvdiffrast()


def test_plugin_import_failure_adds_build_folder_and_retries(monkeypatch, tmp_path):
    name = "nvdiffrast_plugin_0_3_3_1_torch2_x"
    build = tmp_path / "py311_cu121" / name
    build.mkdir(parents=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    gl_build = tmp_path / "py311_cu121" / (name + "_gl")
    gl_build.mkdir()
    calls = []

    def render_first_time():  # the OpenGL plugin loads first (context), then the CUDA one (interpolate)
        calls.append(1)
        for plugin, folder in ((name + "_gl", gl_build), (name, build)):
            if str(folder) not in sys.path:
                raise ModuleNotFoundError(f"No module named '{plugin}'", name=plugin)
        return "rendered"

    assert nvdiffrast_backend._with_plugin_path_retry(render_first_time, "test") == "rendered"
    assert len(calls) == 3 and str(build) in sys.path and str(gl_build) in sys.path

    def always_fails():
        raise ModuleNotFoundError(f"No module named '{name}_x'", name=name + "_x")

    with pytest.raises(RuntimeError, match="--device cpu"):
        nvdiffrast_backend._with_plugin_path_retry(always_fails, "test")

    def other_module():
        raise ModuleNotFoundError("No module named 'ninja'", name="ninja")

    with pytest.raises(ModuleNotFoundError, match="ninja"):
        nvdiffrast_backend._with_plugin_path_retry(other_module, "test")


def test_first_render_announces_the_plugin_build(monkeypatch, tmp_path, caplog):
    """A plugin not built yet for this torch is announced (a warning, shown by default: the first
    render then pauses about 25 s), and its expected failed import after the build is logged
    quietly; a built plugin, or an nvdiffrast version whose naming is unknown, is not announced."""
    import types

    from torch.utils import cpp_extension

    monkeypatch.setitem(sys.modules, "nvdiffrast", types.SimpleNamespace(__version__="0.3.3.1"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(nvdiffrast_backend, "_BUILT_HERE", set())
    name = nvdiffrast_backend.plugin_module_name("0.3.3.1", torch.__version__, gl=False)
    assert nvdiffrast_backend.plugins_to_build("cuda") == [name]
    assert nvdiffrast_backend.plugins_to_build("opengl") == [name, name + "_gl"]
    with caplog.at_level(logging.INFO, logger=nvdiffrast_backend.logger.name):
        assert nvdiffrast_backend.announce_build("cuda") == [name]
        warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings_) == 1 and "building its cuda plugin" in warnings_[0].getMessage()
        assert "tools.build_nvdiffrast" in warnings_[0].getMessage() and str(tmp_path) in warnings_[0].getMessage()
        caplog.clear()
        tries = []

        def built_then_imported():
            tries.append(1)
            if len(tries) == 1:
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)
            return "rendered"

        assert nvdiffrast_backend._with_plugin_path_retry(built_then_imported, "test") == "rendered"
        assert [r.levelno for r in caplog.records] == [logging.INFO]  # expected after our own build
    build = os.path.join(cpp_extension._get_build_directory(name, False), name + cpp_extension.LIB_EXT)
    open(build, "wb").close()
    assert nvdiffrast_backend.plugins_to_build("cuda") == []
    monkeypatch.setitem(sys.modules, "nvdiffrast", types.SimpleNamespace(__version__="0.4.0"))
    assert nvdiffrast_backend.plugins_to_build("cuda") == []


def test_build_tool_without_cuda_is_a_one_line_error(capsys):
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    from tools.build_nvdiffrast import main

    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sees no CUDA device" in err


def test_nvdiffrast_backend_rejects_cpu_tensors():
    r = MeshRenderer(nvdiffrast_backend.NvdiffrastRasterizer("cuda"))
    with pytest.raises(ValueError, match="cpu"):
        r(torch.tensor(TRIANGLE)[None], torch.tensor([[0, 1, 2]]))


# ---------------------------------------------------------------------------------------------
# GPU: nvdiffrast backends against the CPU backend

needs_nvdiffrast = pytest.mark.skipif(not HAS_NVDIFFRAST, reason="nvdiffrast not installed "
                                      "(pip install diffrp-nvdiffrast==0.3.3.1)")


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def _gpu_renderer(backend, device):
    renderer = create_renderer(backend, device=device)
    try:
        renderer(torch.tensor(TRIANGLE, dtype=torch.float32, device=device)[None],
                 torch.tensor([[0, 1, 2]], device=device))
    except RuntimeError as exc:
        if backend == "opengl" and "use_opengl" in str(exc):
            pytest.skip(f"OpenGL/EGL unavailable: {exc}")
        raise
    return renderer


def _sphere_batch(device):
    vert, tri = uv_sphere(40, 80)  # 6240 triangles
    vs = [vert, vert * [1.0, 0.8, 1.0] + [0.3, -0.1, 0.5]]
    colour = [0.5 + 0.5 * np.sin(3 * v + [0.0, 1.0, 2.0]) for v in vs]
    as_t = lambda x: torch.tensor(np.stack(x), dtype=torch.float32, device=device)  # noqa: E731
    return as_t(vs), torch.tensor(tri, device=device), as_t(colour)


def _edge_band(mask, width=1):
    dil = F.max_pool2d(mask, 2 * width + 1, stride=1, padding=width)
    ero = -F.max_pool2d(-mask, 2 * width + 1, stride=1, padding=width)
    return (dil - ero) > 0


@pytest.mark.gpu
@needs_nvdiffrast
@pytest.mark.parametrize("backend", ["cuda", "opengl"])
def test_nvdiffrast_matches_cpu(backend, cuda_device):
    renderer = _gpu_renderer(backend, cuda_device)
    assert renderer.backend == backend
    vert, tri, colour = _sphere_batch(cuda_device)
    gpu = renderer(vert, tri, colour)
    cpu = create_renderer("cpu")(vert.cpu(), tri.cpu(), colour.cpu())
    gm, cm = gpu.mask.cpu(), cpu.mask
    differ = gm != cm
    assert not (differ & ~_edge_band(cm)).any(), "masks differ away from the silhouette"
    assert differ.float().mean() < 0.01
    both = (gm * cm)[:, 0] > 0
    close = ((gpu.image.cpu() - cpu.image).abs().amax(1) <= 1 / 255)[both]
    assert close.float().mean() >= 0.99, close.float().mean()
    depth_close = ((gpu.depth.cpu() - cpu.depth).abs()[:, 0] <= 1e-3)[both]
    assert depth_close.float().mean() >= 0.99
    assert gpu.image.device.type == "cuda" and gpu.image.dtype == torch.float32


@pytest.mark.gpu
@needs_nvdiffrast
@pytest.mark.parametrize("backend", ["cuda", "opengl"])
def test_nvdiffrast_batch_consistency_and_gradients(backend, cuda_device):
    renderer = _gpu_renderer(backend, cuda_device)
    vert, tri, colour = _sphere_batch(cuda_device)
    vert.requires_grad_()
    colour.requires_grad_()
    batch = renderer(vert, tri, colour)
    for k in range(2):
        single = renderer(vert[k:k + 1], tri, colour[k:k + 1])
        torch.testing.assert_close(batch.mask[k], single.mask[0], rtol=0, atol=0)
        torch.testing.assert_close(batch.image[k], single.image[0])
        torch.testing.assert_close(batch.depth[k], single.depth[0])
    (batch.image.sum() + batch.depth.sum()).backward()
    assert torch.isfinite(vert.grad).all() and vert.grad.abs().sum() > 0
    assert torch.isfinite(colour.grad).all() and colour.grad.abs().sum() > 0
