"""Build the stand-in model for demos and tests: ``python -m tools.standin``.

Writes, into git-ignored places,
  standin/BFM/01_MorphableModel.mat + Exp_Pca.bin   stand-ins in the licensed files' exact formats
                                                    (plus the project's auxiliary BFM files), and
  checkpoints/standin/epoch_20.pth                  a deterministic, untrained regressor.

What it shows: the whole pipeline (file conversion, alignment, network, face model, rendering and
every output file) runs end to end. What it does not: a real reconstruction. The mean face is the
real BFM mean shape (``BFM/standin_mean_shape_53490_dm.npy``), but the identity, expression and
texture bases are smooth random fields, and the network was never trained, so every face comes
out as a plausible but arbitrary variation of the mean face. Real results need the real BFM and a
trained checkpoint (see README).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEAN_SHAPE = os.path.join(ROOT, "BFM", "standin_mean_shape_53490_dm.npy")
AUX = ("BFM_front_idx.mat", "BFM_exp_idx.mat", "facemodel_info.mat", "select_vertex_id.mat",
       "similarity_Lm3D_all.mat", "std_exp.txt")
N_SHAPE, N_EXP, N_VERT_EXP = 199, 79, 53215
# what a build costs, measured on a 2-core CPU (README, Quick start): seconds, and megabytes it writes;
# the first test.py run adds the converted BFM_model_front.mat and its cache beside them
BUILD_SECONDS = 20  # 15.5 s on the idle 2-core CPU, 18.5-19.7 s on a 16-core GPU host; ~70 s on a busy 2-core one
BFM_MB, CHECKPOINT_MB, FIRST_RUN_MB = 310, 97, 255


def _smooth_basis(points: np.ndarray, n: int, rng: np.random.Generator, n_centres: int = 24,
                  width: float = 0.35) -> np.ndarray:
    """(V,3) points -> (3V, n) orthonormal columns: each a sum of Gaussian bumps moving vertices
    (or colours) along random directions; smooth over the face like a real PCA basis."""
    v = points.shape[0]
    out = np.empty((3 * v, n), dtype=np.float64)
    lo, hi = points.min(0), points.max(0)
    coords = [np.ascontiguousarray(points[:, j:j + 1]) for j in range(3)]  # (V, 1) each
    for k in range(n):
        centres = rng.uniform(lo, hi, size=(n_centres, 3))
        dirs = rng.normal(size=(n_centres, 3))
        w = width / (1 + 0.03 * k)  # later components vary faster, as PCA bases do
        # squared distances (V, n_centres), summed x, y, z in that order: the same bits as
        # ((points[:, None] - centres) ** 2).sum(-1), without its (V, n_centres, 3) temporary
        d2 = (coords[0] - centres[:, 0]) ** 2
        d2 += (coords[1] - centres[:, 1]) ** 2
        d2 += (coords[2] - centres[:, 2]) ** 2
        out[:, k] = (np.exp(-d2 / (2 * w * w)) @ dirs).reshape(-1)
    q, _ = np.linalg.qr(out)
    return q


def make_standin_bfm(out_dir: str, seed: int = 0, progress: Callable[[str], None] | None = None) -> None:
    """Write stand-in ``01_MorphableModel.mat`` and ``Exp_Pca.bin`` (exact formats) + aux files.

    ``progress(step)`` is called before each of the build's steps (bases, files)."""
    from scipy.io import loadmat, savemat

    step = progress or (lambda what: None)
    os.makedirs(out_dir, exist_ok=True)
    for name in AUX:
        shutil.copyfile(os.path.join(ROOT, "BFM", name), os.path.join(out_dir, name))
    rng = np.random.default_rng(seed)
    mean = np.load(MEAN_SHAPE).astype(np.float64)  # (53490, 3) decimetres
    # BFM stores micrometres and is not centred: the converter and face model must cope
    shape_mu = (mean + np.array([0.02, 0.15, -0.3])) * 1e5
    step(f"identity basis ({N_SHAPE} components over {mean.shape[0]} vertices)")
    shape_pc = _smooth_basis(mean, N_SHAPE, rng)
    shape_ev = 8e5 / np.arange(1, N_SHAPE + 1) ** 0.75
    skin = np.array([200.0, 155.0, 130.0])
    tex_mu = np.tile(skin, (mean.shape[0], 1)) * (1 - 0.15 * np.clip(mean[:, 2:3] - 0.3, -1, 1))
    step(f"texture basis ({N_SHAPE} components)")
    tex_pc = _smooth_basis(mean, N_SHAPE, rng, width=0.25)
    tex_ev = 2000.0 / np.arange(1, N_SHAPE + 1) ** 0.6
    step("writing 01_MorphableModel.mat")
    savemat(os.path.join(out_dir, "01_MorphableModel.mat"), {
        "shapeMU": shape_mu.reshape(-1, 1).astype(np.float32), "shapePC": shape_pc.astype(np.float32),
        "shapeEV": shape_ev.reshape(-1, 1).astype(np.float32), "texMU": tex_mu.reshape(-1, 1).astype(np.float32),
        "texPC": tex_pc.astype(np.float32), "texEV": tex_ev.reshape(-1, 1).astype(np.float32)})
    trim = loadmat(os.path.join(ROOT, "BFM", "BFM_exp_idx.mat"))["trimIndex"].ravel().astype(np.int64) - 1
    step(f"expression basis ({N_EXP} components)")
    exp_pc = _smooth_basis(mean[trim], N_EXP, rng, width=0.2)  # (3*53215, 79)
    with open(os.path.join(out_dir, "Exp_Pca.bin"), "wb") as f:
        np.array([N_EXP], np.int32).tofile(f)
        np.zeros(3 * N_VERT_EXP, np.float32).tofile(f)  # mean expression (unused)
        exp_pc.T.astype(np.float32).tofile(f)  # row-major (n_exp, 3*53215)


# head output scales of the stand-in regressor: id, exp, tex, angle, gamma, txy, tz
HEAD_STD = (0.4, 0.3, 0.2, 0.05, 0.03, 0.05, 0.0)


def _calibration_images() -> "torch.Tensor":
    """(2K, 3, 224, 224): the bundled example photos, centre-cropped and resized, and their mirrors."""
    import torch
    from PIL import Image

    from util.image_io import is_image_file, load_image

    folder = os.path.join(ROOT, "examples")
    imgs = []
    for name in sorted(f for f in os.listdir(folder) if is_image_file(f)):
        im = load_image(os.path.join(folder, name))
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((224, 224), Image.Resampling.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
    x = torch.stack(imgs)
    return torch.cat([x, x.flip(-1)])


def make_standin_checkpoint(path: str, seed: int = 0) -> None:
    """Write a deterministic untrained ResNet-50 regressor in the original checkpoint format.

    Backbone: seeded Kaiming init, its batch-norm statistics set from the bundled example photos
    (so activations stay in range on real photos). Heads: seeded random weights scaled so that
    coefficients vary from photo to photo with roughly ``HEAD_STD`` around zero (the mean face,
    frontal, centred).
    """
    import torch

    from models.networks import ReconNet

    torch.manual_seed(seed)
    net = ReconNet("resnet50")
    calib = _calibration_images()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        net.train()
        net.backbone(calib)
        net.eval()
        feat = net.backbone(calib).flatten(1)  # (2K, 2048)
        mu, sd = feat.mean(0), feat.std(0).mean().clamp_min(1e-6)
        gen = torch.Generator().manual_seed(seed + 1)
        for head, std in zip(net.final_layers, HEAD_STD):
            w = torch.randn(head.out_channels, feat.shape[1], generator=gen) / feat.shape[1] ** 0.5 / sd * std
            head.weight.copy_(w.view_as(head.weight))
            head.bias.copy_(-(w @ mu))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"net_recon": net.state_dict(), "epoch": 20}, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bfm_folder", default=os.path.join(ROOT, "standin", "BFM"))
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    a = ap.parse_args(argv)
    bfm = a.force or not all(os.path.isfile(os.path.join(a.bfm_folder, f)) for f in
                             ("01_MorphableModel.mat", "Exp_Pca.bin", "similarity_Lm3D_all.mat"))
    ckpt = a.force or not os.path.isfile(a.checkpoint)
    if bfm or ckpt:
        mb = (BFM_MB + FIRST_RUN_MB) * bfm + CHECKPOINT_MB * ckpt
        print(f"building the stand-in model: about {BUILD_SECONDS} s on 2 CPU cores; it needs ~{mb} MB of disk "
              f"({BFM_MB} MB of BFM files, {CHECKPOINT_MB} MB checkpoint, and {FIRST_RUN_MB} MB that the first "
              "test.py run adds: the converted face model and its cache)", flush=True)
    start, steps, done = time.perf_counter(), 5 * bfm + ckpt, 0

    def progress(what: str) -> None:
        nonlocal done
        done += 1
        print(f"  [{done}/{steps}] {time.perf_counter() - start:5.1f} s  {what}", flush=True)

    if bfm:
        progress(f"copying the auxiliary BFM files to {a.bfm_folder}")
        make_standin_bfm(a.bfm_folder, a.seed, progress)
        stale = os.path.join(a.bfm_folder, "BFM_model_front.mat")
        if os.path.exists(stale):
            os.remove(stale)
    if ckpt:
        progress(f"writing the stand-in checkpoint {a.checkpoint}")
        make_standin_checkpoint(a.checkpoint, a.seed)
    if bfm or ckpt:
        print(f"  built in {time.perf_counter() - start:.1f} s")
    print("stand-in ready: python test.py --name=standin --epoch=20 --img_folder=examples "
          f"--bfm_folder={os.path.relpath(a.bfm_folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
