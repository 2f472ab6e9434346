"""CPU vs nvdiffrast (CUDA, OpenGL) renders of the same face meshes (not collected by pytest).

    python benchmarks/render_agreement.py [--backends cuda,opengl] [--n 16] [--json out.json]

Renders N stand-in faces with random pose, lighting and shape (the stand-in model, built by
``python -m tools.standin`` if missing) with every backend and reports, against the CPU backend:
mask agreement and the share of pixels covered by both whose colours agree within 1/255.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.bfm import ParametricFaceModel  # noqa: E402
from models.coeffs import COEFFS  # noqa: E402
from models.renderer import create_renderer  # noqa: E402


def random_faces(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = COEFFS.split(torch.zeros(n, COEFFS.total))
    out = {k: v.clone() for k, v in c.items()}
    out["id"] = torch.randn(n, COEFFS.id, generator=g) * 0.8
    out["exp"] = torch.randn(n, COEFFS.exp, generator=g) * 0.5
    out["tex"] = torch.randn(n, COEFFS.tex, generator=g) * 0.5
    out["angle"] = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.6, 1.2, 0.4])
    out["gamma"] = torch.randn(n, COEFFS.gamma, generator=g) * 0.1
    out["trans"] = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.6, 0.6, 2.0])
    return COEFFS.merge(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", default="cuda,opengl")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    bfm = os.path.join(ROOT, "standin", "BFM")
    if not os.path.isfile(os.path.join(bfm, "01_MorphableModel.mat")):
        subprocess.run([sys.executable, "-m", "tools.standin"], cwd=ROOT, check=True)
    fm = ParametricFaceModel.from_folder(bfm)
    coeffs = random_faces(a.n)
    with torch.no_grad():
        face = fm(coeffs)
        t0 = time.perf_counter()
        ref = create_renderer("cpu")(face.vertex, fm.face_buf, feat=face.color)
        cpu_s = time.perf_counter() - t0
    results = {"n_faces": a.n, "cpu_render_s_per_face": cpu_s / a.n, "backends": {}}
    dev = torch.device("cuda")
    for backend in [b for b in a.backends.split(",") if b]:
        try:
            r = create_renderer(backend, device=dev)
            with torch.no_grad():
                out = r(face.vertex.to(dev), fm.face_buf.to(dev), feat=face.color.to(dev))
        except Exception as e:  # report and go on (e.g. no EGL for opengl)
            results["backends"][backend] = {"error": str(e).splitlines()[0]}
            print(f"{backend}: unavailable: {e}")
            continue
        mask, img = out.mask.cpu(), out.image.cpu()
        both = (mask > 0) & (ref.mask > 0)
        diff = (img - ref.image).abs().amax(dim=1, keepdim=True)
        within = (diff[both] <= 1 / 255).float().mean().item()
        mask_agree = (mask == ref.mask).float().mean().item()
        covered = (ref.mask > 0).sum().item()
        mask_diff_px = (mask != ref.mask).sum().item()
        results["backends"][backend] = {
            "covered_pixels_within_1_255": within, "max_abs_colour_diff": diff[both].max().item(),
            "mask_agreement_all_pixels": mask_agree, "mask_disagreeing_pixels": mask_diff_px,
            "mask_disagreeing_share_of_covered": mask_diff_px / covered}
        print(f"{backend}: {100 * within:.3f}% of pixels covered by both within 1/255 "
              f"(max diff {diff[both].max().item():.2e}); masks differ on {mask_diff_px} px "
              f"({100 * mask_diff_px / covered:.3f}% of covered)")
    print(json.dumps(results, indent=1))
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
