"""The Basel Face Model as used by Deep3DFaceRecon: file conversion and coefficients -> mesh.

Conversion (:func:`convert_bfm09`) turns the licensed ``01_MorphableModel.mat`` (BFM 2009) and
``Exp_Pca.bin`` (Guo et al.) into ``BFM_model_front.mat``: the 35709-vertex front crop with 80
identity, 64 expression and 80 texture bases, in decimetres, plus triangles and index tables from
``facemodel_info.mat``. It reproduces the original's ``transferBFM09`` key for key.

:class:`ParametricFaceModel` is an ``nn.Module`` whose bases are buffers. Coordinate conventions:
model space is x right, y up, z towards the camera; the camera sits at z = ``camera_distance``
looking down -z, and camera space has z' = camera_distance - z (positive in front). Projected
points are pixels of the 224x224 crop with **y up** (row = 223 - y); outputs that go to disk
flip them to y down.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.coeffs import COEFFS, CoeffLayout
from util.assets import BFM_HELP, error_line, require_file
from util.atomic_files import write_atomic
from util.checks import check_shape
from util.mat_cache import load_cached

log = logging.getLogger(__name__)

N_VERTEX_FULL = 53490  # vertices of BFM 2009
N_VERTEX_EXP = 53215  # vertices of the expression basis (BFM_exp_idx.mat trimIndex)
FRONT_MODEL_KEYS = ("meanshape", "meantex", "idBase", "exBase", "texBase", "tri", "point_buf",
                    "tri_mask2", "keypoints", "frontmask2_idx", "skinmask")
AUX_FILES = ("BFM_front_idx.mat", "BFM_exp_idx.mat", "facemodel_info.mat", "std_exp.txt")
FRONT_HELP = ("delete it to convert it again from 01_MorphableModel.mat and Exp_Pca.bin, or run "
              "`python -m tools.standin` for the stand-in model")


class FaceModelError(ValueError):
    """A face model file is damaged or not what it should be (unreadable, wrong shapes, indices
    out of range); the message names the file and what is wrong, in one line."""


def _loadmat(path: str, how: str) -> dict:
    """``scipy.io.loadmat(path)``; FaceModelError in one line for a file it cannot read
    (truncated, empty, text, another format)."""
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises many kinds for damaged files
        raise FaceModelError(f"cannot read {path} ({error_line(e)}); {how}") from None


def _numeric(arrays: dict, key: str, path: str, how: str) -> np.ndarray:
    a = arrays.get(key)
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf" or a.size == 0:
        raise FaceModelError(f"{path}: '{key}' is missing or not a numeric array; {how}")
    return a


def _check_shape(a: np.ndarray, key: str, want: tuple, path: str, how: str) -> None:
    """Raise :class:`FaceModelError` naming ``path`` and ``key`` unless ``a`` has shape ``want``
    (sizes, None for any; a 1-D want also accepts a row or column (1, n) / (n, 1))."""
    shown = a.reshape(-1) if len(want) == 1 and a.ndim == 2 and 1 in a.shape else a
    try:
        check_shape(shown, want, f"'{key}'")
    except ValueError:
        want_text = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
        raise FaceModelError(f"{path}: '{key}' has shape {a.shape}, expected {want_text}; {how}") from None


def _check_indices(a: np.ndarray, key: str, low: int, high: int, path: str, how: str) -> None:
    """Every entry of ``a`` an integer in [low, high] (1-based indices, as stored)."""
    if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
        raise FaceModelError(f"{path}: '{key}' holds non-integer indices; {how}")
    lo, hi = a.min(), a.max()
    if lo < low or hi > high:
        raise FaceModelError(f"{path}: '{key}' holds indices from {lo:.0f} to {hi:.0f}, outside {low}..{high}; {how}")


def check_front_model(model: dict, path: str, how: str = FRONT_HELP) -> None:
    """Check that a front face model's arrays fit together.

    Needed: N vertices (``meanshape`` of 3N finite values), ``meantex`` of 3N, bases of 3N rows,
    ``tri``/``tri_mask2`` (F, 3) vertex indices, ``point_buf`` (N, k) triangle indices up to F + 1
    (the padding), 68 ``keypoints``, ``frontmask2_idx`` vertex indices, ``skinmask`` of N.
    Indices are 1-based as stored. Checks shapes and ranges only (not the bases' finiteness:
    a model of NaNs gives NaN faces, which the run reports face by face).

    Args:
        model: the arrays of a BFM_model_front.mat (as ``scipy.io.loadmat`` or the cache gives them).
        path: the file they came from, for the message.
        how: what to do about a bad file, appended to the message.

    Raises:
        FaceModelError: a key is missing or not numeric, a shape is wrong or an index is out of
            range; one line naming ``path`` and the key.
    """
    missing = [k for k in FRONT_MODEL_KEYS if k not in model]
    if missing:
        raise FaceModelError(f"{path} is not a BFM_model_front.mat: keys {missing} are missing; {how}")
    a = {k: _numeric(model, k, path, how) for k in FRONT_MODEL_KEYS}
    n3 = a["meanshape"].size
    if n3 % 3 or not np.all(np.isfinite(a["meanshape"])):
        raise FaceModelError(f"{path}: 'meanshape' should be 3N finite numbers, found {n3} values; {how}")
    n = n3 // 3
    _check_shape(a["meanshape"], "meanshape", (n3,), path, how)
    _check_shape(a["meantex"], "meantex", (n3,), path, how)
    for key in ("idBase", "exBase", "texBase"):
        _check_shape(a[key], key, (n3, None), path, how)
    _check_shape(a["tri"], "tri", (None, 3), path, how)
    n_tri = a["tri"].shape[0]
    _check_indices(a["tri"], "tri", 1, n, path, how)
    _check_shape(a["point_buf"], "point_buf", (n, None), path, how)
    _check_indices(a["point_buf"], "point_buf", 1, n_tri + 1, path, how)
    _check_shape(a["tri_mask2"], "tri_mask2", (None, 3), path, how)
    _check_indices(a["tri_mask2"], "tri_mask2", 1, n, path, how)
    _check_shape(a["keypoints"], "keypoints", (68,), path, how)
    _check_indices(a["keypoints"], "keypoints", 1, n, path, how)
    _check_shape(a["frontmask2_idx"], "frontmask2_idx", (None,), path, how)
    _check_indices(a["frontmask2_idx"], "frontmask2_idx", 1, n, path, how)
    _check_shape(a["skinmask"], "skinmask", (n,), path, how)


# --------------------------------------------------------------------------- conversion
def load_exp_basis(bfm_folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``Exp_Pca.bin`` and ``std_exp.txt``.

    Args:
        bfm_folder: the folder holding both files.

    Returns:
        exp_pc: (3*53215, n_exp) float32, columns are components, xyz interleaved per vertex.
        exp_ev: (n_exp,) float64 standard deviations.

    Raises:
        MissingAssetError: either file is missing.
        FaceModelError: ``Exp_Pca.bin`` is truncated or has fewer than 64 components, or
            ``std_exp.txt`` is unreadable or does not hold one finite value per component.
    """
    path = require_file(os.path.join(bfm_folder, "Exp_Pca.bin"), "Expression basis Exp_Pca.bin",
                        BFM_HELP.format(folder=bfm_folder))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = np.fromfile(f, dtype=np.int32, count=1)
        n_exp = int(head[0]) if head.size else 0
        if not COEFFS.exp <= n_exp or 4 * (1 + 3 * N_VERTEX_EXP * (1 + n_exp)) > size:
            raise FaceModelError(f"{path} is truncated or not Exp_Pca.bin: {size} bytes, its header says {n_exp} "
                                 f"components (at least {COEFFS.exp} of {3 * N_VERTEX_EXP} floats); "
                                 + BFM_HELP.format(folder=bfm_folder))
        np.fromfile(f, dtype=np.float32, count=3 * N_VERTEX_EXP)  # mean expression, unused
        exp_pc = np.fromfile(f, dtype=np.float32, count=3 * N_VERTEX_EXP * n_exp)
    exp_pc = exp_pc.reshape(n_exp, -1).T
    how = "It ships with this project in BFM/; copy it into the BFM folder."
    std_path = require_file(os.path.join(bfm_folder, "std_exp.txt"), "std_exp.txt", how)
    try:
        exp_ev = np.loadtxt(std_path, ndmin=1)
    except ValueError as e:
        raise FaceModelError(f"cannot read {std_path} ({error_line(e)}); {how}") from None
    if exp_ev.shape != (n_exp,) or not np.all(np.isfinite(exp_ev)):
        bad = int(np.sum(~np.isfinite(exp_ev)))
        raise FaceModelError(f"{std_path}: expected {n_exp} finite standard deviations (one per Exp_Pca.bin "
                             f"component), found {exp_ev.size} value(s), {bad} not finite; {how}")
    return exp_pc, exp_ev


def _check_bfm09(bfm: dict, path: str, how: str) -> None:
    """FaceModelError unless ``bfm`` holds BFM 2009's arrays: means of 3 x 53490 values, bases
    of 3 x 53490 rows with at least the coefficients' components, one deviation per component."""
    for kind, n_min in (("shape", COEFFS.id), ("tex", COEFFS.tex)):
        mu, pc, ev = (_numeric(bfm, kind + k, path, how) for k in ("MU", "PC", "EV"))
        _check_shape(mu, kind + "MU", (3 * N_VERTEX_FULL,), path, how)
        _check_shape(pc, kind + "PC", (3 * N_VERTEX_FULL, None), path, how)
        if pc.shape[1] < n_min or ev.size != pc.shape[1]:
            raise FaceModelError(f"{path}: {kind}PC has {pc.shape[1]} components and {kind}EV {ev.size} values, "
                                 f"expected the same number, at least {n_min}; {how}")


def convert_bfm09(bfm_folder: str, out_name: str = "BFM_model_front.mat") -> str:
    """Write ``bfm_folder/out_name`` from the BFM 2009 files, exactly as the original does.

    Units: shape bases and mean are divided by 1e5 (micrometres -> decimetres); bases are scaled
    by their standard deviations; texture stays in 0..255.

    Args:
        bfm_folder: holds ``01_MorphableModel.mat``, ``Exp_Pca.bin`` and the auxiliary files of
            BFM/ (``BFM_front_idx.mat``, ``BFM_exp_idx.mat``, ``facemodel_info.mat``, ``std_exp.txt``).
        out_name: the file name to write in ``bfm_folder`` (written atomically).

    Returns:
        The written path, ``bfm_folder/out_name``.

    Raises:
        MissingAssetError: an input file is missing.
        FaceModelError: an input file is unreadable or its arrays have the wrong shapes or
            out-of-range indices, or the result would not pass :func:`check_front_model`.
    """
    from scipy.io import savemat

    help_ = BFM_HELP.format(folder=bfm_folder)
    for name in AUX_FILES:
        require_file(os.path.join(bfm_folder, name), f"BFM auxiliary file {name}",
                     "It ships with this project in BFM/; copy the BFM/ auxiliary files into that folder.")
    src = require_file(os.path.join(bfm_folder, "01_MorphableModel.mat"), "Basel Face Model 01_MorphableModel.mat",
                       help_)
    require_file(os.path.join(bfm_folder, "Exp_Pca.bin"), "Expression basis Exp_Pca.bin", help_)  # before the long read
    log.info("converting %s and Exp_Pca.bin to %s (once)", src, out_name)
    bfm = _loadmat(src, help_)
    _check_bfm09(bfm, src, help_)
    exp_pc, exp_ev = load_exp_basis(bfm_folder)

    n_id, n_exp, n_tex = COEFFS.id, COEFFS.exp, COEFFS.tex
    id_base = (bfm["shapePC"] * bfm["shapeEV"].reshape(1, -1) / 1e5)[:, :n_id]
    ex_base = (exp_pc * exp_ev.reshape(1, -1) / 1e5)[:, :n_exp]
    tex_base = (bfm["texPC"] * bfm["texEV"].reshape(1, -1))[:, :n_tex]

    # front crop: indices into the expression model's 53215 vertices, then into BFM's 53490
    aux_how = "It ships with this project in BFM/; copy the BFM/ auxiliary files into that folder."
    front_idx, exp_idx = (os.path.join(bfm_folder, f) for f in ("BFM_front_idx.mat", "BFM_exp_idx.mat"))
    index_exp = _numeric(_loadmat(front_idx, aux_how), "idx", front_idx, aux_how)
    _check_indices(index_exp, "idx", 1, N_VERTEX_EXP, front_idx, aux_how)
    index_shape = _numeric(_loadmat(exp_idx, aux_how), "trimIndex", exp_idx, aux_how)
    _check_indices(index_shape, "trimIndex", 1, N_VERTEX_FULL, exp_idx, aux_how)
    _check_shape(index_shape, "trimIndex", (N_VERTEX_EXP,), exp_idx, aux_how)
    index_exp, index_shape = index_exp.astype(np.int32) - 1, index_shape.astype(np.int32) - 1
    index_shape = index_shape[index_exp]  # (35709, 1, 1): kept as the original's fancy indexing

    def crop(basis: np.ndarray, index: np.ndarray) -> np.ndarray:
        k = basis.shape[1]
        return basis.reshape(-1, 3, k)[index.ravel()].reshape(-1, k)

    id_base, tex_base = crop(id_base, index_shape), crop(tex_base, index_shape)
    ex_base = crop(ex_base, index_exp)
    meanshape = (bfm["shapeMU"].reshape(-1, 3) / 1e5)[index_shape.ravel()].reshape(1, -1)
    meantex = bfm["texMU"].reshape(-1, 3)[index_shape.ravel()].reshape(1, -1)

    info_path = os.path.join(bfm_folder, "facemodel_info.mat")
    info = _loadmat(info_path, aux_how)
    missing = [k for k in FRONT_MODEL_KEYS[5:] if k not in info]
    if missing:
        raise FaceModelError(f"{info_path}: keys {missing} are missing; {aux_how}")
    out = os.path.join(bfm_folder, out_name)
    front = {"meanshape": meanshape, "meantex": meantex, "idBase": id_base, "exBase": ex_base, "texBase": tex_base,
             **{k: info[k] for k in FRONT_MODEL_KEYS[5:]}}
    check_front_model(front, out, f"the files it is made from in {bfm_folder} do not fit together")
    write_atomic(out, lambda f: savemat(f, front))
    return out


def load_front_model(bfm_folder: str, name: str = "BFM_model_front.mat", cache: bool = True) -> dict[str, np.ndarray]:
    """Load ``bfm_folder/name``, converting it from the BFM 2009 files on first use.

    With ``cache``, the arrays are also kept in ``<name without .mat>.cache.npz`` beside it
    (:mod:`util.mat_cache`), which loads faster than the .mat and without scipy.

    Args:
        bfm_folder: the face model's folder.
        name: the .mat's file name; a missing file is converted from the BFM 2009 files (for a name
            other than ``BFM_model_front.mat``, only when ``01_MorphableModel.mat`` is there).
        cache: read and write the .npz cache.

    Returns:
        The arrays by key (``meanshape`` of 3N values, ``idBase`` (3N, 80), ``tri`` (F, 3) 1-based, ...;
        see :func:`check_front_model`), with the dtypes they were stored in.

    Raises:
        MissingAssetError: the model and the files to convert it from are missing.
        FaceModelError: a file is unreadable or its arrays do not fit (:func:`check_front_model`).
    """
    path = os.path.join(bfm_folder, name)
    if not os.path.isfile(path):
        if name != "BFM_model_front.mat" and not os.path.isfile(os.path.join(bfm_folder, "01_MorphableModel.mat")):
            require_file(path, "Face model", BFM_HELP.format(folder=bfm_folder))
        convert_bfm09(bfm_folder, name)
    return load_cached(path, lambda p: _loadmat(p, FRONT_HELP), lambda m: check_front_model(m, path), cache)


# --------------------------------------------------------------------------- face model
SH_A = (np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0))
SH_C = (1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi))
INIT_LIGHT = (0.8, 0, 0, 0, 0, 0, 0, 0, 0)  # added to each colour's 9 SH coefficients


def gather_vertices(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) per-vertex values, integer ``index`` of any shape S -> (B, *S, C).

    The same numbers and gradients as ``points[:, index]``, but through ``index_select``, whose
    gradient is an ``index_add_`` rather than advanced indexing's sort and accumulation (why:
    docs/training.md, "What the runs show").

    Args:
        points: (B, N, C) per-vertex values.
        index: integer indices into N, any shape S.

    Returns:
        (B, *S, C) the picked values.
    """
    picked = points.index_select(1, index.reshape(-1))
    return picked.reshape(points.shape[0], *index.shape, points.shape[-1])


@dataclass(frozen=True)
class FaceOutput:
    """Result of :meth:`ParametricFaceModel.forward` for B faces of N vertices.

    All tensors are on the coefficients' device, in their dtype.

    Attributes:
        vertex: (B, N, 3) camera space (z = distance in front of the camera), for rendering.
        texture: (B, N, 3) albedo in 0..1.
        color: (B, N, 3) SH-lit vertex colours (albedo times irradiance), not clipped.
        landmark: (B, 68, 2) projected landmarks, pixels of the crop, y up.
        shape: (B, N, 3) model-space shape before pose (identity + expression).
        rotation: (B, 3, 3) row-vector rotation: posed = shape @ rotation + trans.
    """

    vertex: torch.Tensor
    texture: torch.Tensor
    color: torch.Tensor
    landmark: torch.Tensor
    shape: torch.Tensor
    rotation: torch.Tensor


class ParametricFaceModel(nn.Module):
    """Coefficients (B, 257) -> posed, lit, projected face mesh (see module docstring).

    Args:
        model: the dict of :func:`load_front_model` (or a small synthetic one with the same keys).
        recenter: subtract the mean shape's centroid (the original always does).
        camera_distance, focal, center: the pinhole camera (defaults: 10 dm, 1015 px, 112 px).
        layout: the coefficient layout; the bases must have its id/exp/tex sizes.

    Raises:
        ValueError: a basis has another number of components than ``layout`` says.
        KeyError: ``model`` lacks a key (``meanshape``, ``idBase``, ``tri``, ...).
    """

    def __init__(self, model: dict[str, np.ndarray], recenter: bool = True, camera_distance: float = 10.0,
                 focal: float = 1015.0, center: float = 112.0, layout: CoeffLayout = COEFFS):
        super().__init__()
        self.layout = layout
        self.camera_distance = float(camera_distance)
        self.focal, self.center = float(focal), float(center)
        mean_shape = np.asarray(model["meanshape"], np.float32).reshape(-1, 3)
        if recenter:
            mean_shape = mean_shape - mean_shape.mean(axis=0, keepdims=True)

        def f32(key):
            return torch.from_numpy(np.ascontiguousarray(model[key], dtype=np.float32))

        def idx(key):
            return torch.from_numpy(np.asarray(model[key]).astype(np.int64) - 1)

        self.register_buffer("mean_shape", torch.from_numpy(mean_shape.reshape(-1)))  # (3N,)
        self.register_buffer("id_base", f32("idBase"))  # (3N, 80)
        self.register_buffer("exp_base", f32("exBase"))  # (3N, 64)
        self.register_buffer("mean_tex", f32("meantex").reshape(-1))  # (3N,) 0..255
        self.register_buffer("tex_base", f32("texBase"))  # (3N, 80)
        self.register_buffer("face_buf", idx("tri"))  # (F, 3) 0-based
        self.register_buffer("point_buf", idx("point_buf"))  # (N, 8) triangle ids, F = padding
        self.register_buffer("keypoints", idx("keypoints").reshape(-1))  # (68,)
        self.register_buffer("front_mask", idx("frontmask2_idx").reshape(-1))
        self.register_buffer("front_face_buf", idx("tri_mask2"))
        self.register_buffer("skin_mask", torch.from_numpy(np.asarray(model["skinmask"], np.float32).reshape(-1)))
        self.register_buffer("init_lit", torch.tensor(INIT_LIGHT, dtype=torch.float32).reshape(1, 1, 9))
        for key, n in (("id_base", layout.id), ("exp_base", layout.exp), ("tex_base", layout.tex)):
            if getattr(self, key).shape[1] != n:
                raise ValueError(f"face model {key} has {getattr(self, key).shape[1]} components, expected {n}")

    @classmethod
    def from_folder(cls, bfm_folder: str, bfm_model: str = "BFM_model_front.mat", **kw) -> "ParametricFaceModel":
        """The face model of ``bfm_folder`` (:func:`load_front_model`; converted from the BFM files on
        first use); ``kw``: camera settings of the constructor.

        Raises:
            MissingAssetError, FaceModelError: as :func:`load_front_model`.
        """
        return cls(load_front_model(bfm_folder, bfm_model), **kw)

    @property
    def n_vertex(self) -> int:
        """N, the number of vertices of the mesh (35709 for the BFM front model)."""
        return self.mean_shape.shape[0] // 3

    # -- geometry ------------------------------------------------------------------------
    def compute_shape(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """Identity and expression -> model-space shape (mean + bases, before pose).

        Args:
            id_coeff: (B, 80).
            exp_coeff: (B, 64).

        Returns:
            (B, N, 3) model-space points (x right, y up, z towards the camera; decimetres).
        """
        shape = id_coeff @ self.id_base.T + exp_coeff @ self.exp_base.T + self.mean_shape
        return shape.reshape(id_coeff.shape[0], -1, 3)

    def compute_texture(self, tex_coeff: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Texture coefficients -> per-vertex albedo.

        Args:
            tex_coeff: (B, 80).
            normalize: divide by 255.

        Returns:
            (B, N, 3) RGB albedo, in 0..1 when ``normalize`` (else 0..255); not clipped.
        """
        tex = tex_coeff @ self.tex_base.T + self.mean_tex
        if normalize:
            tex = tex / 255.0
        return tex.reshape(tex_coeff.shape[0], -1, 3)

    def compute_norm(self, shape: torch.Tensor) -> torch.Tensor:
        """Unit vertex normals: the normalised sum of the unit normals of the (up to 8) triangles
        around each vertex, triangle normal = (v1-v2) x (v2-v3).

        Args:
            shape: (B, N, 3) vertices (model space, or any space the normals should be in).

        Returns:
            (B, N, 3) unit normals.
        """
        v1, v2, v3 = gather_vertices(shape, self.face_buf).unbind(dim=2)
        face_norm = F.normalize(torch.cross(v1 - v2, v2 - v3, dim=-1), dim=-1, p=2)
        face_norm = torch.cat([face_norm, face_norm.new_zeros(face_norm.shape[0], 1, 3)], dim=1)
        return F.normalize(gather_vertices(face_norm, self.point_buf).sum(dim=2), dim=-1, p=2)

    @staticmethod
    def compute_rotation(angles: torch.Tensor) -> torch.Tensor:
        """Euler angles -> rotation matrices for row vectors.

        Args:
            angles: (B, 3) rotations about x, y, z in radians.

        Returns:
            (B, 3, 3) R^T with R = Rz @ Ry @ Rx, to be applied to row vectors (``points @ rot``).
        """
        x, y, z = angles.unbind(dim=1)
        one, zero = torch.ones_like(x), torch.zeros_like(x)
        rot_x = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1)
        rot_y = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1)
        rot_z = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1)
        rot = rot_z.view(-1, 3, 3) @ rot_y.view(-1, 3, 3) @ rot_x.view(-1, 3, 3)
        return rot.transpose(1, 2)

    def compute_color(self, texture: torch.Tensor, normal: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Lambertian lighting with second-order spherical harmonics.

        Args:
            texture: (B, N, 3) albedo (0..1).
            normal: (B, N, 3) posed unit normals.
            gamma: (B, 27), read as 3 colours x 9 SH coefficients, plus ``INIT_LIGHT`` (0.8 ambient).

        Returns:
            (B, N, 3) lit colours, albedo times irradiance (not clipped).
        """
        b = gamma.shape[0]
        gamma = (gamma.reshape(b, 3, 9) + self.init_lit.to(gamma.dtype)).permute(0, 2, 1)  # (B, 9, 3)
        a, c = SH_A, SH_C
        nx, ny, nz = normal[..., 0:1], normal[..., 1:2], normal[..., 2:3]
        sh = torch.cat([
            a[0] * c[0] * torch.ones_like(nx),
            -a[1] * c[1] * ny,
            a[1] * c[1] * nz,
            -a[1] * c[1] * nx,
            a[2] * c[2] * nx * ny,
            -a[2] * c[2] * ny * nz,
            0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * nz ** 2 - 1),
            -a[2] * c[2] * nx * nz,
            0.5 * a[2] * c[2] * (nx ** 2 - ny ** 2),
        ], dim=-1)  # (B, N, 9)
        return (sh @ gamma) * texture

    def to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Model/world space -> camera space: z' = camera_distance - z, x and y unchanged.

        Args:
            points: (..., 3) posed points (usually (B, N, 3)).

        Returns:
            (..., 3) a new tensor; z' > 0 in front of the camera.
        """
        return torch.cat([points[..., :2], self.camera_distance - points[..., 2:]], dim=-1)

    def project(self, vertex: torch.Tensor) -> torch.Tensor:
        """Pinhole projection: (focal*x/z + center, focal*y/z + center).

        Evaluated as the original does, ((focal*x + center*z) / z), to keep its float32 rounding.

        Args:
            vertex: (..., 3) camera space (usually (B, N, 3)), z > 0.

        Returns:
            (..., 2) pixels of the crop, y up (row = 223 - y for the 224 crop); inf/NaN where z = 0.
        """
        z = vertex[..., 2:]
        return (self.focal * vertex[..., :2] + self.center * z) / z

    def landmarks(self, coeffs: torch.Tensor) -> torch.Tensor:
        """The projected 68 landmarks alone: the same numbers as ``forward(coeffs).landmark`` for a
        fraction of the work (only the 68 keypoints are computed).

        Args:
            coeffs: (B, 257).

        Returns:
            (B, 68, 2) pixels, y up.
        """
        c = self.layout.split(coeffs)
        rows = (self.keypoints[:, None] * 3 + torch.arange(3, device=coeffs.device)).reshape(-1)
        shape = c["id"] @ self.id_base[rows].T + c["exp"] @ self.exp_base[rows].T + self.mean_shape[rows]
        shape = shape.reshape(coeffs.shape[0], -1, 3)
        vertex = self.to_camera(shape @ self.compute_rotation(c["angle"]) + c["trans"].unsqueeze(1))
        return self.project(vertex)

    def forward(self, coeffs: torch.Tensor) -> FaceOutput:
        """Mesh, colours and landmarks of coefficients.

        Args:
            coeffs: (B, 257) (:data:`models.coeffs.COEFFS`).

        Returns:
            :class:`FaceOutput` (shapes in its docstring).

        Raises:
            ValueError: ``coeffs`` is not (B, 257).
        """
        c = self.layout.split(coeffs)
        shape = self.compute_shape(c["id"], c["exp"])
        rotation = self.compute_rotation(c["angle"])
        vertex = self.to_camera(shape @ rotation + c["trans"].unsqueeze(1))
        landmark = self.project(gather_vertices(vertex, self.keypoints))
        texture = self.compute_texture(c["tex"])
        normal = self.compute_norm(shape) @ rotation
        color = self.compute_color(texture, normal, c["gamma"])
        return FaceOutput(vertex=vertex, texture=texture, color=color, landmark=landmark, shape=shape,
                          rotation=rotation)
