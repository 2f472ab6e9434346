"""Face model: BFM conversion, coefficients -> mesh against numpy, pose/projection/SH conventions."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from scipy.io import loadmat

from models.bfm import FRONT_MODEL_KEYS, ParametricFaceModel, convert_bfm09, gather_vertices, load_front_model
from models.coeffs import COEFFS
from util.assets import MissingAssetError


# ----------------------------------------------------------------------------- numpy reference
def np_rotation(angles):
    """Independent: R = Rz(c) Ry(b) Rx(a) acting on column vectors (a, b, c = angles)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def np_reconstruct(m: dict, coeff: np.ndarray, camera_d=10.0, focal=1015.0, center=112.0):
    """Float64 numpy version of the paper's face model for ONE coefficient vector."""
    s = {k: coeff[sl] for k, sl in COEFFS.slices().items()}
    mean = m["meanshape"].reshape(-1, 3).astype(np.float64)
    mean = mean - mean.mean(0)
    shape = (mean.reshape(-1) + m["idBase"] @ s["id"] + m["exBase"] @ s["exp"]).reshape(-1, 3)
    tex = ((m["meantex"].reshape(-1) + m["texBase"] @ s["tex"]) / 255.0).reshape(-1, 3)
    r = np_rotation(s["angle"])
    posed = shape @ r.T + s["trans"]
    cam = posed.copy()
    cam[:, 2] = camera_d - posed[:, 2]
    kp = m["keypoints"].ravel().astype(int) - 1
    lm = focal * cam[kp, :2] / cam[kp, 2:] + center
    tri = m["tri"].astype(int) - 1
    fn = np.cross(shape[tri[:, 0]] - shape[tri[:, 1]], shape[tri[:, 1]] - shape[tri[:, 2]])
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    normals = np.zeros_like(shape)
    for f, t in enumerate(tri):  # accumulate each face normal on its vertices (point_buf listed)
        for v in t:
            normals[v] += fn[f]
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    n = normals @ r.T
    g = s["gamma"].reshape(3, 9) + np.array([0.8, 0, 0, 0, 0, 0, 0, 0, 0])
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    # SH basis times Lambertian factors with the constants of the paper's code (Deep3DFaceRecon):
    # a = (pi, 2pi/sqrt(3), 2pi/sqrt(8)), c = (1/sqrt(4pi), sqrt(3)/sqrt(4pi), 3sqrt(5)/sqrt(12pi))
    k0 = math.pi / math.sqrt(4 * math.pi)  # a0*c0
    k1 = 2 * math.pi / math.sqrt(3) * math.sqrt(3) / math.sqrt(4 * math.pi)  # a1*c1 = sqrt(pi)
    k2 = 2 * math.pi / math.sqrt(8) * 3 * math.sqrt(5) / math.sqrt(12 * math.pi)  # a2*c2
    basis = np.stack([k0 * np.ones_like(x), -k1 * y, k1 * z, -k1 * x,
                      k2 * x * y, -k2 * y * z, k2 / (2 * math.sqrt(3)) * (3 * z * z - 1), -k2 * x * z,
                      k2 / 2 * (x * x - y * y)], 1)
    color = (basis @ g.T) * tex
    return cam, tex, color, lm, normals


@pytest.fixture
def tiny(tiny_model_dict):
    return ParametricFaceModel(tiny_model_dict)


def random_coeffs(b, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(b, COEFFS.total, generator=g, dtype=torch.float64) * 0.5
    parts = COEFFS.split(c)
    parts["angle"].mul_(0.3)
    parts["gamma"].mul_(0.2)
    parts["trans"].mul_(0.5)
    return c.to(dtype)


def test_face_model_matches_numpy(tiny, tiny_model_dict, dtype):
    coeffs = random_coeffs(3, dtype=dtype)
    out = tiny.to(dtype)(coeffs)
    # only the network output should set precision: buffers were cast with the module
    assert out.vertex.dtype == dtype and out.vertex.shape == (3, 36, 3)
    tol = 1e-4 if dtype == torch.float32 else 1e-6  # model data are stored in float32, like the original
    for b in range(3):
        cam, tex, color, lm, _ = np_reconstruct(tiny_model_dict, coeffs[b].double().numpy())
        np.testing.assert_allclose(out.vertex[b].double().numpy(), cam, atol=tol, rtol=tol)
        np.testing.assert_allclose(out.texture[b].double().numpy(), tex, atol=tol, rtol=tol)
        np.testing.assert_allclose(out.color[b].double().numpy(), color, atol=tol, rtol=tol)
        np.testing.assert_allclose(out.landmark[b].double().numpy(), lm, atol=100 * tol, rtol=tol)


def test_batch_equals_single(tiny):
    coeffs = random_coeffs(4)
    full = tiny(coeffs)
    for b in range(4):
        one = tiny(coeffs[b:b + 1])
        torch.testing.assert_close(one.vertex[0], full.vertex[b])
        torch.testing.assert_close(one.color[0], full.color[b])


def test_landmarks_shortcut_equals_full_model(tiny):
    coeffs = random_coeffs(3)
    torch.testing.assert_close(tiny.landmarks(coeffs), tiny(coeffs).landmark, rtol=1e-6, atol=1e-4)


def test_rotation_convention():
    """Yaw (angle y) of +90 degrees turns the model's +x axis (its left cheek) to -z."""
    rot = ParametricFaceModel.compute_rotation(torch.tensor([[0.0, math.pi / 2, 0.0]], dtype=torch.float64))
    p = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64) @ rot[0]
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64))
    # order: R = Rz @ Ry @ Rx, applied to row vectors as p @ R^T
    ang = torch.tensor([[0.3, -0.7, 1.1]], dtype=torch.float64)
    torch.testing.assert_close(ParametricFaceModel.compute_rotation(ang)[0],
                               torch.from_numpy(np_rotation(ang[0].numpy()).T))
    # pitch (x) of +90 degrees turns +y (up) into +z (towards the camera)
    rot = ParametricFaceModel.compute_rotation(torch.tensor([[math.pi / 2, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64) @ rot[0],
                               torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))


def test_projection_and_camera(tiny):
    """A point 1 dm right and 0.5 dm up at the origin of the model is at camera depth 10 and
    projects to (112 + 1015*1/10, 112 + 1015*0.5/10), y up."""
    cam = tiny.to_camera(torch.tensor([[[1.0, 0.5, 0.0]]]))
    torch.testing.assert_close(cam, torch.tensor([[[1.0, 0.5, 10.0]]]))
    torch.testing.assert_close(tiny.project(cam), torch.tensor([[[112 + 101.5, 112 + 50.75]]]))


def test_sh_constants(tiny):
    """With gamma = 0 only the initial ambient light (0.8) acts: colour = albedo * 0.8*pi/sqrt(4pi)."""
    n = torch.nn.functional.normalize(torch.randn(1, 5, 3), dim=-1)
    tex = torch.rand(1, 5, 3)
    col = tiny.compute_color(tex, n, torch.zeros(1, 27))
    torch.testing.assert_close(col, tex * 0.8 * math.pi / math.sqrt(4 * math.pi))
    # the z band: gamma 2 (red's third coefficient), normal +z -> red gains sqrt(pi) (a1*c1)
    g = torch.zeros(1, 27)
    g[0, 2] = 1.0
    col = tiny.compute_color(torch.ones(1, 1, 3), torch.tensor([[[0.0, 0.0, 1.0]]]), g)
    amb = 0.8 * math.pi / math.sqrt(4 * math.pi)
    torch.testing.assert_close(col[0, 0], torch.tensor([amb + math.sqrt(math.pi), amb, amb]))


def test_normals_are_unit(tiny):
    out = tiny(torch.zeros(1, COEFFS.total))
    n = tiny.compute_norm(out.shape)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(1, 36))


def test_gradients_reach_coefficients(tiny):
    c = random_coeffs(2).requires_grad_(True)
    out = tiny(c)
    (out.color.sum() + out.landmark.sum()).backward()
    assert torch.isfinite(c.grad).all() and (c.grad.abs().sum(0) > 0).sum() > 200


def test_gather_vertices_matches_advanced_indexing(device):
    """Values and gradients equal those of ``points[:, index]`` (whose CUDA backward is slow)."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(3, 50, 3, generator=g).to(device)
    index = torch.randint(0, 50, (40, 8), generator=g).to(device)  # repeats: gradients accumulate
    weight = torch.randn(3, 40, 8, 3, generator=g).to(device)
    a, b = points.clone().requires_grad_(True), points.clone().requires_grad_(True)
    picked = gather_vertices(a, index)
    reference = b[:, index]
    assert picked.shape == (3, 40, 8, 3)
    assert torch.equal(picked, reference)
    (picked * weight).sum().backward()
    (reference * weight).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_model_follows_device(tiny, device):
    m = tiny.to(device)
    out = m(random_coeffs(2).to(device))
    assert out.vertex.device.type == device.type


# ----------------------------------------------------------------------------- conversion
def test_conversion_of_standin(standin, tmp_path):
    folder = standin["bfm_folder"]
    model = load_front_model(folder)  # converts on first use
    assert set(FRONT_MODEL_KEYS) <= set(model)
    n = 35709
    assert model["meanshape"].shape == (1, 3 * n) and model["meantex"].shape == (1, 3 * n)
    assert model["idBase"].shape == (3 * n, 80) and model["exBase"].shape == (3 * n, 64)
    assert model["texBase"].shape == (3 * n, 80)
    assert model["tri"].shape == (70789, 3) and model["tri"].min() == 1 and model["tri"].max() == n
    assert model["point_buf"].shape == (n, 8) and model["point_buf"].max() == 70789 + 1
    assert model["keypoints"].size == 68 and 1 <= model["keypoints"].min() and model["keypoints"].max() <= n
    # independent check of the crop and units on a few vertices, straight from the raw files
    raw = loadmat(os.path.join(folder, "01_MorphableModel.mat"))
    front = loadmat(os.path.join(folder, "BFM_front_idx.mat"))["idx"].ravel().astype(int) - 1
    trim = loadmat(os.path.join(folder, "BFM_exp_idx.mat"))["trimIndex"].ravel().astype(int) - 1
    for v in (0, 1234, n - 1):
        full = trim[front[v]]
        np.testing.assert_allclose(model["meanshape"].reshape(-1, 3)[v], raw["shapeMU"].reshape(-1, 3)[full] / 1e5,
                                   rtol=1e-6)
        np.testing.assert_allclose(model["idBase"].reshape(-1, 3, 80)[v, :, 5],
                                   raw["shapePC"].reshape(-1, 3, 199)[full, :, 5] * raw["shapeEV"][5, 0] / 1e5,
                                   rtol=1e-5)
        np.testing.assert_allclose(model["texBase"].reshape(-1, 3, 80)[v, :, 7],
                                   raw["texPC"].reshape(-1, 3, 199)[full, :, 7] * raw["texEV"][7, 0], rtol=1e-5)
    # expression basis: row v of the crop is expression vertex front[v]
    with open(os.path.join(folder, "Exp_Pca.bin"), "rb") as f:
        k = int(np.fromfile(f, np.int32, 1)[0])
        f.seek(4 + 4 * 3 * 53215)
        pc = np.fromfile(f, np.float32).reshape(k, -1)
    ev = np.loadtxt(os.path.join(folder, "std_exp.txt"))
    v = 777
    np.testing.assert_allclose(model["exBase"].reshape(-1, 3, 64)[v, :, 3],
                               pc[3].reshape(-1, 3)[front[v]] * ev[3] / 1e5, rtol=1e-5)


def test_standin_face_is_a_face(standin_face_model):
    """Mean face, frontal, at the default distance: landmarks land inside the 224 crop, the face is
    about 150 px wide, and the nose (landmark 31) is nearer the camera than the eyes."""
    out = standin_face_model(torch.zeros(1, COEFFS.total))
    lm = out.landmark[0]
    assert ((lm > 10) & (lm < 214)).all()
    width = lm[16, 0] - lm[0, 0]
    assert 100 < width < 200
    z = out.vertex[0, standin_face_model.keypoints, 2]
    assert z[30] < z[36] and z[30] < z[45]


def test_missing_bfm_files_say_what_to_do(tmp_path):
    for name in ("BFM_front_idx.mat", "BFM_exp_idx.mat", "facemodel_info.mat", "std_exp.txt"):
        shutil.copyfile(os.path.join(os.path.dirname(os.path.dirname(__file__)), "BFM", name), tmp_path / name)
    with pytest.raises(MissingAssetError) as e:
        convert_bfm09(str(tmp_path))
    msg = str(e.value)
    assert "01_MorphableModel.mat" in msg and str(tmp_path) in msg and "standin" in msg
    assert "\n" not in msg


def test_truncated_exp_basis(standin, tmp_path):
    for f in os.listdir(standin["bfm_folder"]):
        if f != "BFM_model_front.mat":
            os.symlink(os.path.join(standin["bfm_folder"], f), tmp_path / f)
    os.remove(tmp_path / "Exp_Pca.bin")
    with open(os.path.join(standin["bfm_folder"], "Exp_Pca.bin"), "rb") as src, open(tmp_path / "Exp_Pca.bin", "wb") as dst:
        dst.write(src.read(1000))
    with pytest.raises(ValueError, match="truncated"):
        convert_bfm09(str(tmp_path))


def test_matches_the_original_implementation(tiny):
    """Golden outputs of the original Deep3DFaceRecon_pytorch ParametricFaceModel (its code run
    once on the tiny synthetic model, tests/data); on the stand-in BFM the two agreed bit for bit."""
    gold = np.load(os.path.join(os.path.dirname(__file__), "data", "facemodel_golden_tiny.npz"))
    out = tiny(torch.from_numpy(gold["coeffs"]))
    np.testing.assert_allclose(out.vertex.numpy(), gold["vertex"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.color.numpy(), gold["color"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.landmark.numpy(), gold["landmark"], rtol=0, atol=1e-4)
