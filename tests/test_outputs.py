"""Output writers: .obj against trimesh's own exporter, landmark drawing against a plain loop."""
from __future__ import annotations

import numpy as np
import trimesh

from util.mesh_io import colors_to_uint8, format_fixed, write_obj
from util.visualize import BLUE, RED, compose_result, draw_landmarks


def test_obj_matches_trimesh_export(tmp_path):
    """Same numbers, order and colours as the original's trimesh export (columns may be padded)."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3)) * np.array([1, 10, 300])
    f = rng.integers(0, 50, size=(80, 3))
    c = colors_to_uint8(rng.uniform(-0.2, 1.2, size=(50, 3)))
    write_obj(str(tmp_path / "ours.obj"), v, f, c)
    trimesh.Trimesh(vertices=v, faces=f, vertex_colors=c, process=False).export(str(tmp_path / "ref.obj"))

    def rows(path):
        return [ln.split() for ln in open(path) if ln.strip() and not ln.startswith("#")]

    ours, ref = rows(tmp_path / "ours.obj"), rows(tmp_path / "ref.obj")
    assert [r[0] for r in ours] == [r[0] for r in ref] and len(ours) == 50 + 80
    assert sum(a == b for a, b in zip(ours, ref)) >= len(ref) - 1  # token for token (a rounding tie aside)
    np.testing.assert_allclose(np.array([r[1:] for r in ours[:50]], float),
                               np.array([r[1:] for r in ref[:50]], float), atol=1.01e-8, rtol=0)
    assert [r[1:] for r in ours[50:]] == [r[1:] for r in ref[50:]]
    back = trimesh.load(str(tmp_path / "ours.obj"), process=False)
    np.testing.assert_allclose(back.vertices, v, atol=1e-8)
    np.testing.assert_array_equal(back.faces, f)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], c)
    assert not list(tmp_path.glob("*.part"))


def test_format_fixed_is_printf():
    x = np.concatenate([np.random.default_rng(2).normal(size=2000) * 10.0 ** np.arange(-3, 5).repeat(250),
                        [0.0, -0.0, -4e-9, 0.5e-8, 99.999999996]])
    ours = [b.decode().strip() for b in format_fixed(x).view(f"S{format_fixed(x).shape[1]}").ravel()]
    ref = ["%.8f" % val for val in x]
    ref = [r[1:] if r.startswith("-") and float(r) == 0 else r for r in ref]  # we write 0 for -0
    assert sum(a != b for a, b in zip(ours, ref)) <= 2
    np.testing.assert_allclose([float(a) for a in ours], [float(b) for b in ref], atol=1.01e-8, rtol=0)


def test_colors_clip_and_truncate():
    np.testing.assert_array_equal(colors_to_uint8(np.array([[-1.0, 0.5, 2.0], [0.999, 1 / 255, 0.0]])),
                                  [[0, 127, 255], [254, 1, 0]])


def _draw_loop(img, lm, color, step=2):
    img = img.copy()
    _, h, w, _ = img.shape
    lm = lm.copy()
    lm[..., 1] = h - 1 - lm[..., 1]
    lm = np.round(lm).astype(np.int64)
    for b in range(img.shape[0]):
        for x, y in lm[b]:
            for j in range(-step, step):
                for k in range(-step, step):
                    img[b, np.clip(y + k, 0, h - 1), np.clip(x + j, 0, w - 1)] = color
    return img


def test_draw_landmarks_matches_loop():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, size=(2, 40, 30, 3)).astype(np.float32)
    lm = rng.uniform(-3, 42, size=(2, 7, 2))
    np.testing.assert_array_equal(draw_landmarks(img, lm, RED), _draw_loop(img, lm, RED))


def test_compose_result_panels():
    img = np.full((1, 8, 8, 3), 0.5, np.float32)
    render = np.zeros((1, 8, 8, 3), np.float32)
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[:, 2:6, 2:6] = 1
    vis = compose_result(img, render, mask, np.array([[[4.0, 4.0]]]), np.array([[[1.0, 1.0]]]))
    assert vis.shape == (1, 8, 24, 3) and vis.dtype == np.uint8
    assert (vis[0, 3, 11] == 0).all() and (vis[0, 0, 8] == 127).all()  # rendered black square; 0.5 -> 127
    assert (vis[0, 4, 20] == RED).all() and (vis[0, 6, 17] == BLUE).all()
