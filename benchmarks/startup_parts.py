"""Where a CUDA start-up's seconds go, one part after another in one fresh process (not collected
by pytest; needs CUDA and the stand-in: ``python -m tools.standin``).

    python benchmarks/startup_parts.py    # run it a few times: the first pays for cold caches

Prints the seconds of: ``import torch``, the CUDA context, the nvdiffrast plugin's load, the face
model (its .npz cache), the network (the checkpoint), and both moved to the GPU. test.py overlaps
the context and the plugin with the model files (a thread), so its start-up is less than the sum.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    marks = [("start", time.perf_counter())]
    import torch

    marks.append(("import torch", time.perf_counter()))
    torch.empty(0, device="cuda")
    marks.append(("CUDA context", time.perf_counter()))
    from models.renderer import nvdiffrast_backend

    nvdiffrast_backend.warm_up("cuda")
    marks.append(("nvdiffrast plugin", time.perf_counter()))
    from models.bfm import ParametricFaceModel

    face_model = ParametricFaceModel.from_folder(os.path.join(ROOT, "standin", "BFM"), "BFM_model_front.mat")
    marks.append(("face model", time.perf_counter()))
    from models.networks import load_recon_net

    net = load_recon_net(os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth"), "resnet50", False)
    marks.append(("network", time.perf_counter()))
    face_model.to("cuda"), net.to("cuda")
    torch.cuda.synchronize()
    marks.append(("to the GPU", time.perf_counter()))
    print("  ".join(f"{name} {t - marks[i][1]:.2f} s" for i, (name, t) in enumerate(marks[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
