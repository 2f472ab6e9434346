"""The stand-in model's build (tools/standin.py): its bases are the same numbers as before the build
was made faster, and the command says what it costs and shows its progress."""
from __future__ import annotations

import json
import os

import numpy as np
from scipy.io import loadmat

from conftest import DATA
from tools import standin as build


def _smooth_basis_reference(points, n, rng, n_centres=24, width=0.35):
    """The construction as first written (a (V, n_centres, 3) temporary per component)."""
    out = np.empty((3 * points.shape[0], n))
    lo, hi = points.min(0), points.max(0)
    for k in range(n):
        centres = rng.uniform(lo, hi, size=(n_centres, 3))
        dirs = rng.normal(size=(n_centres, 3))
        w = width / (1 + 0.03 * k)
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        out[:, k] = (np.exp(-d2 / (2 * w * w)) @ dirs).reshape(-1)
    return np.linalg.qr(out)[0]


def test_smooth_basis_gives_the_same_bits_as_before():
    points = np.load(build.MEAN_SHAPE).astype(np.float64)[::97]  # 552 of the mean face's vertices
    new = build._smooth_basis(points, 15, np.random.default_rng(3), width=0.25)
    old = _smooth_basis_reference(points, 15, np.random.default_rng(3), width=0.25)
    assert new.shape == (3 * len(points), 15) and np.array_equal(new, old)
    np.testing.assert_allclose(new.T @ new, np.eye(15), atol=1e-12)  # orthonormal columns


def test_built_standin_is_pinned(standin):
    """Entries of the built files against those of the first version's build (seed 0), to float32
    precision: a change of construction that moves the stand-in's numbers fails here."""
    with open(os.path.join(DATA, "standin_pins.json")) as f:
        pins = json.load(f)
    r, c = pins["rows_step"], pins["cols_step"]
    bfm = loadmat(os.path.join(standin["bfm_folder"], "01_MorphableModel.mat"))
    for key in ("shapePC", "texPC"):
        np.testing.assert_allclose(bfm[key][::r, ::c], np.array(pins[key], np.float32), rtol=1e-5, atol=1e-8)
    for key in ("shapeMU", "texMU"):
        np.testing.assert_allclose(bfm[key].astype(np.float64).sum(), pins[f"{key}_sum"], rtol=1e-7)
    raw = np.fromfile(os.path.join(standin["bfm_folder"], "Exp_Pca.bin"), np.float32)
    exp_pc = raw[1 + 3 * build.N_VERT_EXP:].reshape(build.N_EXP, -1)  # after the count and the mean
    np.testing.assert_allclose(exp_pc[::c, ::r], np.array(pins["exp_pc"], np.float32), rtol=1e-5, atol=1e-8)


def test_build_prints_its_cost_and_progress(tmp_path, capsys, monkeypatch):
    """The command's lines, with the slow parts replaced by stubs that write nothing."""
    monkeypatch.setattr(build, "make_standin_bfm", lambda folder, seed, progress: [
        progress(s) for s in ("identity basis", "texture basis", "writing", "expression basis")])
    monkeypatch.setattr(build, "make_standin_checkpoint", lambda path, seed: None)
    assert build.main(["--bfm_folder", str(tmp_path / "BFM"), "--checkpoint", str(tmp_path / "e.pth")]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = build.BFM_MB + build.FIRST_RUN_MB + build.CHECKPOINT_MB
    assert lines[0].startswith(f"building the stand-in model: about {build.BUILD_SECONDS} s on 2 CPU cores; "
                               f"it needs ~{total} MB of disk")
    steps = [ln.split("]")[0].strip() for ln in lines[1:7]]
    assert steps == ["[1/6", "[2/6", "[3/6", "[4/6", "[5/6", "[6/6"]
    assert "writing the stand-in checkpoint" in lines[6] and lines[7].startswith("  built in ")
