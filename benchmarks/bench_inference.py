"""End-to-end and per-stage throughput of test.py's pipeline (not collected by pytest).

    python benchmarks/bench_inference.py --device cuda --n 256 --json bench.json
    python benchmarks/bench_inference.py --device cpu --n 16

Uses the stand-in model (built by ``python -m util.standin`` if missing) on N copies of the
example photos with their detections. Reports, after a warm-up, with CUDA synchronisation:
  * start-up: a fresh ``python test.py`` process on one photo, to its exit (all outputs);
  * end to end, images/s: all outputs at the chosen batch size; coefficients only
    (``--save_mesh false --save_png false``); the one-at-a-time path (batch 1, synchronous writes);
  * per stage (ms/image): decode+align, network, face model, render, output writing;
  * the network against a bare ResNet-50 forward at the same batch size and precision;
  * bf16/fp16 autocast against fp32: coefficient and vertex differences;
  * peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from options.test_options import parse_test_options  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_folder(dst: str, n: int) -> str:
    """N copies of the example photos (hard links where possible) with their detection files."""
    from util.detections_io import detection_path, write_points

    lm = json.load(open(os.path.join(ROOT, "tests", "data", "faces_lm5.json")))
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f in lm)
    os.makedirs(dst, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        stem, ext = os.path.splitext(name)
        out = f"{i:05d}_{stem}{ext}"
        src = os.path.join(ROOT, "examples", name)
        try:
            os.link(src, os.path.join(dst, out))
        except OSError:
            shutil.copyfile(src, os.path.join(dst, out))
        write_points(detection_path(dst, out), np.array(lm[name]))
    return dst


def options(folder: str, out: str, device: str, **kw) -> object:
    argv = ["--name=standin", "--epoch=20", f"--img_folder={folder}", f"--results_dir={out}",
            f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}",
            f"--checkpoints_dir={os.path.join(ROOT, 'checkpoints')}", f"--device={device}"]
    argv += [f"--{k}={v}" for k, v in kw.items()]
    return parse_test_options(argv)


def timed_run(opt, device, model) -> float:
    from models.inference import run_folder

    sync(device)
    t = time.perf_counter()
    s = run_folder(opt, device, progress=False, model=model)
    sync(device)
    assert s.faces_failed == 0, s.failures
    return s.faces_ok / (time.perf_counter() - t)


def stage_times(opt, device, model, n_batches: int) -> dict:
    """ms per image of each stage, measured one after the other on the same batches."""
    from data.image_folder import AlignedFaces, collate_faces, scan_folder
    from models.inference import batch_to_items, write_face_outputs
    from util.preprocess import load_lm3d

    entries, _ = scan_folder(opt.img_folder)
    ds = AlignedFaces(entries, load_lm3d(opt.bfm_folder))
    bs = opt.batch_size
    t = {"decode_align": 0.0, "network": 0.0, "face_model": 0.0, "render": 0.0, "write_outputs": 0.0}
    count = 0
    face_buf = model.face_model.face_buf.cpu().numpy()
    os.makedirs(opt.results_dir, exist_ok=True)
    for b in range(n_batches):
        idx = range(b * bs, min((b + 1) * bs, len(ds)))
        if not idx:
            break
        t0 = time.perf_counter()
        batch = collate_faces([ds[i] for i in idx])
        t["decode_align"] += time.perf_counter() - t0
        images = batch["image"].to(device)
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            coeffs = model.predict_coeffs(images)
            sync(device)
            t["network"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            face = model.face_model(coeffs)
            sync(device)
            t["face_model"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
            sync(device)
            t["render"] += time.perf_counter() - t1
        from models.facerecon import Reconstruction

        recon = Reconstruction(coeffs=coeffs, face=face, mask=out.mask, render=out.image)
        t0 = time.perf_counter()
        for item in batch_to_items(recon, batch, opt):
            write_face_outputs(opt.results_dir, item, opt, face_buf)
        t["write_outputs"] += time.perf_counter() - t0
        count += len(idx)
    return {k: 1000 * v / max(count, 1) for k, v in t.items()}


def network_vs_bare(model, device, bs: int, amp: str, iters: int) -> dict:
    from models.networks import Bottleneck, ResNet

    bare = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=1000, use_last_fc=True).to(device).eval()
    x = torch.rand(bs, 3, 224, 224, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def bench(f):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(3):
                f(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                f(x)
            sync(device)
        return bs * iters / (time.perf_counter() - t0)

    return {"ours_img_s": bench(model.net), "bare_resnet50_img_s": bench(bare)}


def amp_accuracy(model, device, images: torch.Tensor) -> dict:
    out = {}
    with torch.inference_mode():
        ref = model.net(images).float()
        v_ref = model.face_model(ref).vertex
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.autocast(device.type, dtype=dtype):
                c = model.net(images).float()
            v = model.face_model(c).vertex
            out[name] = {"coeff_max_abs": float((c - ref).abs().max()), "coeff_mean_abs": float((c - ref).abs().mean()),
                         "vertex_max_abs_mm": float((v - v_ref).abs().max() * 100),  # decimetres -> mm
                         "lm_note": "vertex difference in mm (model units are decimetres)"}
    return out


def startup_seconds(folder1: str, out: str, device: str) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), "--name=standin", "--epoch=20", f"--img_folder={folder1}",
           f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}", f"--checkpoints_dir={os.path.join(ROOT, 'checkpoints')}",
           f"--results_dir={out}", f"--device={device}", "--num_threads=0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=256, help="images per end-to-end run")
    ap.add_argument("--batch_size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    ap.add_argument("--num_threads", type=int, default=None, help="DataLoader workers (default: cores - 2)")
    ap.add_argument("--write_workers", type=int, default=None)
    ap.add_argument("--amp", default="none")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth")):
        subprocess.run([sys.executable, "-m", "util.standin"], cwd=ROOT, check=True)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    bs = a.batch_size or (64 if cuda else 8)
    cores = os.cpu_count() or 1
    workers = a.num_threads if a.num_threads is not None else max(0, cores - 2)
    writers = a.write_workers if a.write_workers is not None else max(1, min(16, cores))
    tmp = tempfile.mkdtemp(prefix="bench_")
    folder = make_folder(os.path.join(tmp, "photos"), a.n)
    folder1 = make_folder(os.path.join(tmp, "one"), 1)
    res: dict = {"device": str(device), "n_images": a.n, "batch_size": bs, "num_threads": workers,
                 "write_workers": writers, "amp": a.amp,
                 "hardware": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                              "gpu": torch.cuda.get_device_name(device) if cuda else None},
                 "versions": {"python": platform.python_version(), "torch": torch.__version__,
                              "numpy": np.__version__, "cuda": torch.version.cuda}}

    from models.inference import build_model

    t0 = time.perf_counter()
    base = options(folder, os.path.join(tmp, "out"), a.device, batch_size=bs, num_threads=workers,
                   write_workers=writers, amp=a.amp)
    model = build_model(base, device)
    res["model_build_s"] = time.perf_counter() - t0
    timed_run(options(folder1, os.path.join(tmp, "warm"), a.device, num_threads=0), device, model)  # warm-up
    res["startup_to_first_image_s"] = startup_seconds(folder1, os.path.join(tmp, "start"), a.device)

    runs = {
        "all_outputs": dict(batch_size=bs, num_threads=workers, write_workers=writers, amp=a.amp),
        "coeffs_only": dict(batch_size=bs, num_threads=workers, write_workers=writers, amp=a.amp,
                            save_mesh="false", save_png="false"),
        "one_at_a_time": dict(batch_size=1, num_threads=0, write_workers=0),
    }
    res["images_per_s"] = {}
    for name, kw in runs.items():
        n_one = min(a.n, 32 if cuda else 8)
        opt = options(folder if name != "one_at_a_time" else make_folder(os.path.join(tmp, "few"), n_one),
                      os.path.join(tmp, "out_" + name), a.device, **kw)
        res["images_per_s"][name] = timed_run(opt, device, model)
        print(f"{name:>15}: {res['images_per_s'][name]:8.1f} images/s", flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    res["stage_ms_per_image"] = stage_times(options(folder, os.path.join(tmp, "stages"), a.device, batch_size=bs),
                                            device, model, n_batches=max(1, min(4, a.n // bs)))
    if cuda:
        res["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    res["network_vs_bare"] = network_vs_bare(model, device, bs, a.amp, iters=20 if cuda else 2)
    if cuda:
        from data.image_folder import AlignedFaces, scan_folder
        from util.preprocess import load_lm3d

        entries, _ = scan_folder(folder)
        ds = AlignedFaces(entries[:bs], load_lm3d(base.bfm_folder))
        images = torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))])).to(device)
        res["amp_vs_fp32"] = amp_accuracy(model, device, images)

    print("\n| measure | value |\n| --- | --- |")
    print(f"| device | {res['hardware']['gpu'] or res['hardware']['cpu']} ({cores} cores), torch {torch.__version__} |")
    print(f"| start-up to first image (fresh process) | {res['startup_to_first_image_s']:.2f} s |")
    for k, v in res["images_per_s"].items():
        print(f"| images/s, {k} | {v:.1f} |")
    for k, v in res["stage_ms_per_image"].items():
        print(f"| {k}, ms/image | {v:.2f} |")
    nb = res["network_vs_bare"]
    print(f"| network images/s (ours / bare ResNet-50, batch {bs}) | {nb['ours_img_s']:.0f} / {nb['bare_resnet50_img_s']:.0f} |")
    if cuda:
        print(f"| peak GPU memory, batch {bs} | {res['peak_gpu_memory_gib']:.2f} GiB |")
        for k, v in res["amp_vs_fp32"].items():
            print(f"| {k} vs fp32: coeff max / mean abs, vertex max mm | {v['coeff_max_abs']:.2e} / "
                  f"{v['coeff_mean_abs']:.2e}, {v['vertex_max_abs_mm']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
