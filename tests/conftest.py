"""Shared fixtures: devices, a tiny synthetic face model, the stand-in model, example folders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
FACES = os.path.join(DATA, "faces")  # the 28 test photos (tests/data/faces/README.md)
SHARED_FACES = FACES  # the name of the folder before it moved into the repository
STANDIN_BFM = os.path.join(ROOT, "standin", "BFM")
STANDIN_CKPT = os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth")


def cuda_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    if request.param == "cuda" and not cuda_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[torch.float32, torch.float64])
def dtype(request) -> torch.dtype:
    return request.param


def tiny_face_model_dict(n_side: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic front-model dict (the keys of BFM_model_front.mat, 1-based indices) on a
    bumpy n_side x n_side grid: tens of vertices, full 80/64/80 bases."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.linspace(-1, 1, n_side), np.linspace(-1, 1, n_side))
    zs = 0.3 * np.cos(xs) * np.cos(ys)
    verts = np.stack([xs, ys, zs], -1).reshape(-1, 3) + 0.05  # not centred on purpose
    n = len(verts)
    tri = []
    for r in range(n_side - 1):
        for c in range(n_side - 1):
            a, b, d, e = r * n_side + c, r * n_side + c + 1, (r + 1) * n_side + c, (r + 1) * n_side + c + 1
            tri += [(a, b, e), (a, e, d)]
    tri = np.array(tri)
    point_buf = np.full((n, 8), len(tri))  # padding index = F (a zero normal)
    for v in range(n):
        faces = np.where((tri == v).any(1))[0][:8]
        point_buf[v, :len(faces)] = faces
    return {
        "meanshape": verts.reshape(1, -1).astype(np.float32),
        "meantex": rng.uniform(80, 200, (1, 3 * n)).astype(np.float32),
        "idBase": (0.01 * rng.normal(size=(3 * n, 80))).astype(np.float32),
        "exBase": (0.01 * rng.normal(size=(3 * n, 64))).astype(np.float32),
        "texBase": rng.normal(size=(3 * n, 80)).astype(np.float32),
        "tri": (tri + 1).astype(np.float32),
        "point_buf": (point_buf + 1).astype(np.float32),
        "tri_mask2": (tri[: len(tri) // 2] + 1).astype(np.float32),
        "keypoints": (rng.choice(n, 68) + 1).reshape(1, 68).astype(np.float32),
        "frontmask2_idx": (np.arange(n // 2) + 1).reshape(-1, 1).astype(np.float32),
        "skinmask": (rng.uniform(size=(1, n)) > 0.5).astype(np.float32),
    }


@pytest.fixture
def tiny_model_dict() -> dict[str, np.ndarray]:
    return tiny_face_model_dict()


@pytest.fixture(scope="session")
def standin() -> dict[str, str]:
    """The stand-in BFM and checkpoint (built once into the git-ignored standin/ and checkpoints/)."""
    if not (os.path.isfile(os.path.join(STANDIN_BFM, "01_MorphableModel.mat")) and os.path.isfile(STANDIN_CKPT)):
        subprocess.run([sys.executable, "-m", "tools.standin"], cwd=ROOT, check=True)
    return {"bfm_folder": STANDIN_BFM, "checkpoint": STANDIN_CKPT, "checkpoints_dir": os.path.dirname(
        os.path.dirname(STANDIN_CKPT)), "name": "standin"}


@pytest.fixture(scope="session")
def standin_face_model(standin):
    from models.bfm import ParametricFaceModel

    return ParametricFaceModel.from_folder(standin["bfm_folder"])


def golden_lm5() -> dict[str, list]:
    """MTCNN 5-point detections of tests/data/faces (first face of each photo), y down."""
    with open(os.path.join(DATA, "faces_lm5.json")) as f:
        return json.load(f)


def make_photo_folder(dst: str, names: list[str], with_detections: bool = True) -> str:
    """Copy photos from tests/data/faces (or examples/) into ``dst`` with their golden detections."""
    from util.detections_io import detection_path, write_points

    os.makedirs(dst, exist_ok=True)
    lm = golden_lm5()
    for name in names:
        src = os.path.join(FACES, name)
        if not os.path.isfile(src):
            src = os.path.join(ROOT, "examples", name)
        shutil.copyfile(src, os.path.join(dst, name))
        if with_detections:
            write_points(detection_path(dst, name), np.array(lm[name]))
    return dst


def wait_for_first_result(proc, out, timeout: float = 120) -> None:
    """Wait until the command ``proc`` (a Popen) has written a .mat into ``out`` (a pathlib
    folder); it must still be running then (a test interrupts it next)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(n.endswith(".mat") for n in os.listdir(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
