"""UV texture maps of the face mesh: the layout (made once), its rasterisation, and per-face textures.

The BFM has no UV layout. :func:`mean_value_layout` makes one for a disc-like triangle mesh by
Floater's mean-value embedding (M. S. Floater, "Mean value coordinates", CAGD 20, 2003; a Tutte
embedding with better weights): the outline is fixed on an ellipse, every inner vertex is the
weighted mean of its neighbours, one sparse linear solve. The front mesh has one more boundary,
the open mouth, which is closed by a fan of triangles around a virtual vertex first (then it
is an inner hole of the layout, not a second outline). Positive weights and a convex outline
guarantee that no triangle folds over, so the layout is one chart without seams. u grows to
the face's right (camera x) and v up. ``tools/make_bfm_uv.py`` runs it once on the mean shape
and writes ``BFM/bfm_front_uv.npy`` ((35709, 2) float32, 280 KB). (A least-squares conformal
map, tried first, shrinks the nose and mouth to a small region and blows the cheeks up.)

Per face (:func:`face_texture`), every texel of the chart knows its triangle and barycentric
coordinates (:class:`UvRaster`, made once per run); its 3-D point is projected into the aligned
crop, and the texel takes the photo's colour where the surface is visible (its vertices'
visibility from the render's depth, and facing the camera), the model's albedo elsewhere,
blended over the visibility's edge. Texels just outside the chart copy their nearest chart texel
so that filtering never mixes in the background; the rest take the chart's mean colour.

Imports numpy (and scipy for the one-off layout and the raster), so writer processes stay light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

UV_FILE = "bfm_front_uv.npy"  # in the repository's BFM/ folder
PAD_TEXELS = 4  # texels this close to the chart copy the nearest chart texel; farther ones its mean colour


# --------------------------------------------------------------------------- the layout (once)
def _mean_value_weights(vertices: np.ndarray, faces: np.ndarray, n: int):
    """(n, n) sparse W: Floater's mean-value weights ``w_ij = (tan(a/2) + tan(b/2)) / |v_i - v_j|``
    (a, b: the angles at v_i of the two triangles beside edge ij), all positive."""
    import scipy.sparse as sp

    rows, cols, vals = [], [], []
    for k in range(3):
        i, j, l = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        e1, e2 = vertices[j] - vertices[i], vertices[l] - vertices[i]
        l1, l2 = np.linalg.norm(e1, axis=1), np.linalg.norm(e2, axis=1)
        cos = np.clip((e1 * e2).sum(1) / (l1 * l2), -1, 1)
        t = np.tan(np.arccos(cos) / 2)
        rows += [i, i]
        cols += [j, l]
        vals += [t / l1, t / l2]
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def _boundary_on_ellipse(vertices: np.ndarray, loop: np.ndarray) -> np.ndarray:
    """(K, 2): the outline's vertices (``loop[:, 0]``, in order) spread by 3-D arc length over an
    ellipse with the front view's (x, y) aspect, going round in the front view's sense and
    starting at the first vertex's front-view angle."""
    idx = loop[:, 0]
    p = vertices[idx]
    xy = p[:, :2] - p[:, :2].mean(0)
    seg = np.linalg.norm(p - np.roll(p, -1, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)[:-1]]) / seg.sum()
    sense = np.sign(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
    half = np.ptp(vertices[:, :2], axis=0) / 2
    phi = np.arctan2(xy[0, 1] / half[1], xy[0, 0] / half[0]) + sense * 2 * np.pi * s
    return np.stack([half[0] * np.cos(phi), half[1] * np.sin(phi)], axis=1)


def mean_value_layout(vertices: np.ndarray, faces: np.ndarray, margin: float = 0.01) -> np.ndarray:
    """UV layout of a disc-like mesh (holes are closed first, :func:`fill_holes`) by Floater's
    mean-value embedding: the outline is fixed on an ellipse (:func:`_boundary_on_ellipse`) and
    every inner vertex is the weighted mean of its neighbours (:func:`_mean_value_weights`), one
    sparse linear solve. The weights are positive and the outline convex, so by Tutte's and
    Floater's theorems no triangle folds over.

    Args:
        vertices: (N, 3) float, the face looking along +z, y up.
        faces: (F, 3) int, 0-based, consistently oriented.
        margin: the empty border of the unit square on each side.

    Returns:
        (N, 2) float64 UV in [margin, 1 - margin], u growing with x and v with y (OBJ / OpenGL
        convention: v = 0 at the texture image's bottom), aspect kept.
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    vertices = np.asarray(vertices, np.float64)
    n_in = len(vertices)
    loops = boundary_loops(np.asarray(faces, np.int64))
    vertices, faces = fill_holes(vertices, np.asarray(faces, np.int64))
    n = len(vertices)
    outline = loops[0][:, 0]
    w = _mean_value_weights(vertices, faces, n)
    lap = sp.diags(np.asarray(w.sum(1)).ravel()) - w  # rows: sum_j w_ij (x_i - x_j) = 0
    inner = np.setdiff1d(np.arange(n), outline)
    fixed = _boundary_on_ellipse(vertices, loops[0])
    a = lap[inner][:, inner].tocsc()
    rhs = -(lap[inner][:, outline] @ fixed)
    uv = np.empty((n, 2))
    uv[outline] = fixed
    solve = spla.splu(a)
    uv[inner] = np.stack([solve.solve(rhs[:, k]) for k in range(2)], axis=1)
    uv = uv[:n_in]
    lo, hi = uv.min(0), uv.max(0)
    scale = (1 - 2 * margin) / (hi - lo).max()
    return (uv - lo) * scale + margin + (1 - 2 * margin - (hi - lo) * scale) / 2


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """The mesh's boundary loops. A boundary edge belongs to exactly one triangle.

    Args:
        faces: (F, 3) integer vertex indices, 0-based, of a manifold mesh (one successor per
            boundary vertex).

    Returns:
        The loops, each as (K, 2) int64 directed edges (a, b) in the order the triangles hold them,
        longest loop first; empty for a closed mesh.
    """
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, inv, cnt = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True, return_counts=True)
    edges = e[cnt[inv.ravel()] == 1]
    nxt = dict(zip(edges[:, 0].tolist(), edges[:, 1].tolist()))
    loops, seen = [], set()
    for start in nxt:
        if start in seen:
            continue
        loop, a = [], start
        while a not in seen:
            seen.add(a)
            loop.append((a, nxt[a]))
            a = nxt[a]
        loops.append(np.array(loop, np.int64))
    return sorted(loops, key=len, reverse=True)


def fill_holes(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Close every boundary loop but the longest (the outline) with a fan of triangles around
    a new vertex at the loop's centroid, wound like the mesh: the BFM front mesh's open mouth
    would otherwise be a free boundary that the conformal map shrinks to a point.

    Args:
        vertices: (N, 3) float positions.
        faces: (F, 3) integer vertex indices, 0-based.

    Returns:
        ((N + H, 3) vertices, (F + added, 3) faces): one new vertex per closed hole, after the old
        ones (drop them from the layout), and the fans' triangles after the old ones.
    """
    loops = boundary_loops(faces)[1:]
    new_v, new_f = [vertices], [faces]
    n = len(vertices)
    for k, loop in enumerate(loops):
        centre = n + k
        new_v.append(vertices[loop[:, 0]].mean(0, keepdims=True))
        new_f.append(np.stack([loop[:, 1], loop[:, 0], np.full(len(loop), centre)], axis=1))
    return np.concatenate(new_v), np.concatenate(new_f)


def signed_areas(uv: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Signed areas of the triangles in the layout.

    Args:
        uv: (N, 2) layout (u right, v up).
        faces: (F, 3) integer vertex indices, 0-based.

    Returns:
        (F,) signed areas in UV units (positive: counter-clockwise in UV).
    """
    a, b, c = (uv[faces[:, k]] for k in range(3))
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


# --------------------------------------------------------------------------- per run: the raster
@dataclass(frozen=True)
class UvRaster:
    """Where each texel of a ``size`` x ``size`` texture lies on the mesh (made once per run).

    Attributes:
        size: the texture's side in texels.
        texel: (T,) int32 flat indices (row-major, row 0 = the image's top = v near 1) of the texels
            whose centre lies in a triangle of the layout.
        weights: (T, N) sparse CSR float32, each row the texel centre's barycentric coordinates on
            its triangle's three vertices (so that ``weights @ per_vertex`` interpolates any
            per-vertex values, one sparse product for all).
        nearest: (size * size,) int32 for every texel the index (into ``texel``) of the nearest chart
            texel within :data:`PAD_TEXELS` (itself inside the chart), ``T`` (one past the end: the
            chart's mean colour) farther away.
    """

    size: int
    texel: np.ndarray
    weights: object
    nearest: np.ndarray


def uv_raster(uv: np.ndarray, faces: np.ndarray, size: int = 512) -> UvRaster:
    """Rasterise a layout into a ``size``-texel square: texel centres tested against every
    triangle's bounding box, vectorised over triangles.

    Args:
        uv: (N, 2) layout in 0..1, v up (texel row 0 is v = 1).
        faces: (F, 3) integer vertex indices, 0-based.
        size: the texture's side in texels.

    Returns:
        The :class:`UvRaster` (its ``weights`` have max(faces) + 1 columns).
    """
    import scipy.sparse as sp
    from scipy.ndimage import distance_transform_edt

    faces = np.asarray(faces, np.int64)
    p = np.stack([uv[:, 0] * size - 0.5, (1 - uv[:, 1]) * size - 0.5], axis=1)[faces]  # (F, 3, 2) texel units
    lo = np.floor(p.min(1)).astype(np.int64) + 1
    hi = np.floor(p.max(1)).astype(np.int64)
    span = hi - lo + 1
    (ax, ay), (bx, by), (cx, cy) = (p[:, k].T for k in range(3))
    det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
    ok = np.abs(det) > 1e-12
    texels, tris, barys = [], [], []
    for dy in range(int(span[:, 1].max(initial=0))):
        for dx in range(int(span[:, 0].max(initial=0))):
            t = np.nonzero(ok & (dx < span[:, 0]) & (dy < span[:, 1]))[0]
            x, y = lo[t, 0] + dx, lo[t, 1] + dy
            l0 = ((by[t] - cy[t]) * (x - cx[t]) + (cx[t] - bx[t]) * (y - cy[t])) / det[t]
            l1 = ((cy[t] - ay[t]) * (x - cx[t]) + (ax[t] - cx[t]) * (y - cy[t])) / det[t]
            l2 = 1 - l0 - l1
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0) & (x >= 0) & (y >= 0) & (x < size) & (y < size)
            texels.append((y * size + x)[inside])
            tris.append(t[inside])
            barys.append(np.stack([l0, l1, l2], 1)[inside])
    texel, first = np.unique(np.concatenate(texels), return_index=True)  # a texel on an edge: one triangle
    tri, bary = np.concatenate(tris)[first].astype(np.int32), np.concatenate(barys)[first].astype(np.float32)
    chart = np.zeros(size * size, bool)
    chart[texel] = True
    dist, (iy, ix) = distance_transform_edt(~chart.reshape(size, size), return_indices=True)
    slot = np.full(size * size + 1, -1, np.int64)
    slot[texel] = np.arange(len(texel))
    slot[-1] = len(texel)  # the chart's mean colour (face_texture appends it)
    nearest = np.where(dist.ravel() <= PAD_TEXELS, iy.ravel() * size + ix.ravel(), size * size)
    weights = sp.csr_matrix((bary.ravel(), (np.repeat(np.arange(len(texel)), 3), faces[tri].ravel())),
                            shape=(len(texel), int(faces.max()) + 1))
    return UvRaster(size, texel.astype(np.int32), weights, slot[nearest].astype(np.int32))


REPO_BFM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BFM")


def load_uv_layout(bfm_folder: str, n_vertex: int) -> np.ndarray:
    """The UV layout of the front mesh: ``<bfm_folder>/bfm_front_uv.npy``, else the copy that
    ships in the repository's BFM/ folder.

    Args:
        bfm_folder: the face model's folder, looked in first.
        n_vertex: the face model's number of vertices N.

    Returns:
        (N, 2) float32 UV in 0..1, v up.

    Raises:
        FileNotFoundError: neither file exists; the message says how to restore or make it.
        ValueError: the layout is not (N, 2); the message says how to make one for this model.
    """
    paths = [os.path.join(bfm_folder, UV_FILE), os.path.join(REPO_BFM, UV_FILE)]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"{paths[-1]} is missing: it ships in the repository's BFM/ folder (git checkout "
                                "BFM/bfm_front_uv.npy), or make it with python tools/make_bfm_uv.py")
    uv = np.load(path)
    if uv.shape != (n_vertex, 2):
        raise ValueError(f"{path} holds a layout of shape {uv.shape}, the face model has {n_vertex} vertices; "
                         f"make one for it with python tools/make_bfm_uv.py --bfm_folder {bfm_folder} "
                         f"--out {paths[0]}")
    return uv.astype(np.float32)


# --------------------------------------------------------------------------- per face
def _bilinear(image: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """(T, 3) float32 colours of the (H, W, 3) uint8 ``image`` at pixel-centre coordinates (clamped)."""
    h, w = image.shape[:2]
    col, row = np.clip(col, 0, w - 1), np.clip(row, 0, h - 1)
    c0, r0 = np.minimum(col.astype(np.int32), w - 2), np.minimum(row.astype(np.int32), h - 2)
    fc, fr = (col - c0)[:, None], (row - r0)[:, None]
    flat = image.reshape(-1, 3).astype(np.float32)
    i = r0 * w + c0
    p00, p01, p10, p11 = (np.take(flat, i + k, axis=0) for k in (0, 1, w, w + 1))
    top = p00 + (p01 - p00) * fc
    return top + (p10 + (p11 - p10) * fc - top) * fr


def face_texture(raster: UvRaster, vertex: np.ndarray, albedo: np.ndarray, visibility: np.ndarray,
                 image: np.ndarray, focal: float, center: float) -> np.ndarray:
    """One face's texture: the photo where the camera saw the surface, the albedo elsewhere,
    blended by visibility.

    Args:
        raster: the run's :class:`UvRaster`.
        vertex: (N, 3) camera space (x right, y up, z > 0 in front).
        albedo: (N, 3) uint8.
        visibility: (N,) uint8, 255 = seen by the camera, 0 = hidden
            (:func:`pipeline.extra_arrays.vertex_visibility`: the render's depth and the normal's angle).
        image: (H, W, 3) uint8, the aligned crop that the vertices project into
            (``col = focal x / z + center - 0.5``, ``row = center - focal y / z - 0.5``, the renderer's
            pixel centres; row 0 at the top).
        focal, center: the camera in pixels.

    Returns:
        (size, size, 3) uint8 RGB texture, row 0 at the top (v = 1).
    """
    per_vertex = np.concatenate([vertex, visibility[:, None], albedo], axis=1, dtype=np.float32)
    x, y, z, w, r, g, b = (raster.weights @ per_vertex).T  # (T,) each, interpolated at the texel centres
    photo = _bilinear(image, focal * x / z + center - 0.5, center - focal * y / z - 0.5)
    w = (w / 255.0)[:, None]
    colour = np.clip(w * photo + (1 - w) * np.stack([r, g, b], 1) + 0.5, 0, 255).astype(np.uint8)
    colour = np.concatenate([colour, colour.mean(0, keepdims=True).astype(np.uint8)])
    return colour[raster.nearest].reshape(raster.size, raster.size, 3)
