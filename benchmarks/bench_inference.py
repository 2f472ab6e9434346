"""End-to-end and per-stage throughput of test.py's pipeline (not collected by pytest).

    python benchmarks/bench_inference.py --device cuda --n 2048 --json bench.json
    python benchmarks/bench_inference.py --quick          # CPU smoke run (a few minutes on 2 cores)

Uses the stand-in model (built by ``python -m tools.standin`` if missing) on N copies of the
example photos with their detections. Reports, after a warm-up (one photo, then a short run
with the timed runs' workers and batch size), with CUDA synchronisation:
  * start-up: fresh ``python test.py`` processes on one photo (all outputs), medians of
    ``--startup_runs``: from the launch to the photo's files on disk, and to the process's exit;
  * end to end, images/s: all outputs at the chosen batch size; coefficients only
    (``--save_mesh false --save_png false``); the one-at-a-time path (batch 1, synchronous
    writes). Each of the first two runs N and N/4 images: ``images_per_s`` is N / time (worker
    start-up included), ``steady_images_per_s`` the marginal rate (3N/4) / (t_N - t_N/4),
    which leaves out everything a run pays once (worker and writer start-up, the tail);
  * per stage, ms/image, medians over batches: decode+align (with ``--resample_on_device``: decode
    and the alignment's plan; with ``--decode_on_device``: reading the JPEGs and the plan),
    crops_to_device (the uint8 crops copied to the device, or made there, JPEGs decoded there),
    network (incl. the uint8 -> float conversion), face model, render, compose (the picture's
    middle panel as bytes, on the device), host copy (device -> numpy results) and
    pickle (the results as the writer pool sends them), the main process's share of the output
    work; then, in a writer process set up
    as test.py's, writing each output file (.png with the panels, landmarks and encoding, .obj,
    .mat); and payload_kib, the pickled results per face;
  * the network against a bare ResNet-50 forward at the same batch size and precision;
  * bf16/fp16 autocast against fp32: coefficient and vertex differences;
  * peak GPU memory.
DataLoader workers and writer processes default to test.py's automatic choice (-1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from options.test_options import parse_test_options  # noqa: E402
from util.precision import ieee_fp32  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_folder(dst: str, n: int, photos: str = os.path.join(ROOT, "examples")) -> str:
    """N copies of the photos of ``photos`` (examples/ or tests/data/faces; hard links where
    possible) with their golden detection files (tests/data/faces_lm5.json)."""
    from util.detections_io import detection_path, write_points

    lm = json.load(open(os.path.join(ROOT, "tests", "data", "faces_lm5.json")))
    names = sorted(f for f in os.listdir(photos) if f in lm)
    os.makedirs(dst, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        stem, ext = os.path.splitext(name)
        out = f"{i:05d}_{stem}{ext}"
        src = os.path.join(photos, name)
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
    """Seconds for one run_folder call (asserting every face succeeded)."""
    from options.run_specs import run_spec
    from pipeline.run import run_folder

    sync(device)
    t = time.perf_counter()
    s = run_folder(run_spec(opt), device, progress=False, model=model)
    sync(device)
    assert s.faces_failed == 0, s.failures
    return time.perf_counter() - t


WRITE_STAGES = (("write_png", "png_files"), ("write_obj", "obj_files"), ("write_mat", "mat_files"))


def timed_writes(cfg, results) -> dict:
    """Seconds to write ``results``' files, one kind of file at a time (runs in a writer process)."""
    from util import results_io
    from util.results_io import write_face_result

    t = {}
    for name, writer in WRITE_STAGES:
        one = dataclasses.replace(cfg, files=(getattr(results_io, writer),))
        t0 = time.perf_counter()
        for r in results:
            write_face_result(one, r)
        t[name] = time.perf_counter() - t0
    return t


def stage_times(opt, device, model, n_batches: int) -> dict:
    """ms per image of each stage, measured one after the other on the same batches; medians
    over the batches. The main process's stages run here, the writes in one writer process set
    up as test.py's (its allocator keeps freed memory, see util.subprocesses.keep_freed_memory).
    Also ``payload_kib``: KiB per face that the main process pickles for the writers."""
    import pickle
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.reduction import ForkingPickler

    from data.image_folder import AlignedFaces, batch_crops, collate_faces, images_to_float, scan_folder
    from options.run_specs import run_spec
    from pipeline.outputs import output_config
    from pipeline.render import batch_results, overlay_uint8
    from util.preprocess import load_lm3d
    from util.results_io import process_context
    from util.subprocesses import keep_freed_memory

    entries, _ = scan_folder(opt.img_folder)
    ds = AlignedFaces(entries, load_lm3d(opt.bfm_folder), resample_on_device=opt.resample_on_device,
                      decode_on_device=opt.decode_on_device)
    bs = opt.batch_size
    keys = ("decode_align", "crops_to_device", "network", "face_model", "render", "compose", "host_copy",
            "pickle", "write_png", "write_obj", "write_mat", "payload_kib")
    per_batch: dict[str, list[float]] = {k: [] for k in keys}
    os.makedirs(opt.results_dir, exist_ok=True)
    spec = run_spec(opt)
    cfg = output_config(spec.outputs, spec.model, model.face_model.face_buf.cpu().numpy(), opt.results_dir)
    writer = ProcessPoolExecutor(1, mp_context=process_context(), initializer=keep_freed_memory)
    try:
        for b in range(n_batches):
            idx = range(b * bs, min((b + 1) * bs, len(ds)))
            if not idx:
                break
            t = {}
            t0 = time.perf_counter()
            batch = collate_faces([ds[i] for i in idx])
            t["decode_align"] = time.perf_counter() - t0
            with torch.inference_mode():
                sync(device)
                t0 = time.perf_counter()
                batch, images = batch_crops(batch, device)  # copied, or made there (--resample_on_device)
                sync(device)
                t["crops_to_device"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                coeffs = model.predict_coeffs(images_to_float(images))
                sync(device)
                t["network"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                face = model.face_model(coeffs)
                sync(device)
                t["face_model"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
                sync(device)
                t["render"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                overlay_uint8(images, out.image, out.mask)
                sync(device)
                t["compose"] = time.perf_counter() - t0
            # batch_results = face model + render + compose + host copy: the host copy is the remainder
            t0 = time.perf_counter()
            results = batch_results(model, coeffs, batch, spec.outputs)
            t["host_copy"] = max(0.0, time.perf_counter() - t0 - t["face_model"] - t["render"] - t["compose"])
            t0 = time.perf_counter()
            payload = ForkingPickler.dumps(results)  # what the writer pool's feeder thread does per task
            t["pickle"] = time.perf_counter() - t0
            t.update(writer.submit(timed_writes, cfg, pickle.loads(payload)).result())
            for k in keys[:-1]:
                per_batch[k].append(1000 * t[k] / len(idx))
            per_batch["payload_kib"].append(len(payload) / 1024 / len(idx))
    finally:
        writer.shutdown()
    out = {k: statistics.median(v) for k, v in per_batch.items()}
    out["write_outputs"] = out["write_png"] + out["write_obj"] + out["write_mat"]
    return out


def network_vs_bare(model, device, bs: int, iters: int) -> dict:
    """Our network and a bare ResNet-50, both in the precision test.py runs the network in."""
    from models.networks import Bottleneck, ResNet

    bare = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=1000, use_last_fc=True).to(device).eval()
    x = torch.rand(bs, 3, 224, 224, device=device)

    def bench(f):
        with torch.inference_mode(), model.network_precision(device):
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
    """Coefficient and vertex differences of bf16, fp16 (autocast) and TF32 (PyTorch's default for
    cuDNN's float32 convolutions, test.py --tf32) against full float32."""
    out = {}
    with torch.inference_mode():
        with ieee_fp32(device):
            ref = model.net(images).float()
        v_ref = model.face_model(ref).vertex
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", None)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                c = model.net(images).float()
            v = model.face_model(c).vertex
            out[name] = {"coeff_max_abs": float((c - ref).abs().max()), "coeff_mean_abs": float((c - ref).abs().mean()),
                         "vertex_max_abs_mm": float((v - v_ref).abs().max() * 100),  # decimetres -> mm
                         "lm_note": "vertex difference in mm (model units are decimetres)"}
    return out


def decode_accuracy(model, device, folder: str, lm3d: np.ndarray, bs: int) -> dict:
    """--decode_on_device against PIL's decoding on the faces of ``folder`` (with detections) that
    it decodes on the device (JPEGs; the others take the same path either way): differences of
    the aligned crops' pixels (0..255), the coefficients and the vertices (mm)."""
    from data.image_folder import AlignedFaces, batch_crops, collate_faces, images_to_float, scan_folder

    entries, _ = scan_folder(folder)
    sets = [AlignedFaces(entries, lm3d, decode_on_device=on) for on in (False, True)]
    px, coeff, vert = [], [], []
    with torch.inference_mode():
        for start in range(0, len(entries), bs):
            idx = range(start, min(start + bs, len(entries)))
            batches = [collate_faces([ds[i] for i in idx]) for ds in sets]
            slots = list(batches[1].jpeg.slots) if batches[1].jpeg is not None else []
            crops = [batch_crops(b, device)[1] for b in batches]
            if len(crops[0]) != len(crops[1]):
                raise RuntimeError("a photo failed on one side only")
            crops = [x[slots] for x in crops]
            c = [model.predict_coeffs(images_to_float(x)).float() for x in crops]
            v = [model.face_model(x).vertex for x in c]
            px.append((crops[0].int() - crops[1].int()).abs().flatten(1).float())
            coeff.append((c[0] - c[1]).abs())
            vert.append((v[0] - v[1]).abs().flatten(1) * 100)  # decimetres -> mm
    px, coeff, vert = torch.cat(px), torch.cat(coeff), torch.cat(vert)
    return {"faces": len(entries), "faces_decoded_on_device": len(px),
            "pixel_max_abs": float(px.max()), "pixel_mean_abs": float(px.mean()),
            "coeff_max_abs": float(coeff.max()), "coeff_mean_abs": float(coeff.mean()),
            "vertex_max_abs_mm": float(vert.max()), "vertex_mean_abs_mm": float(vert.mean())}


def startup_seconds(folder1: str, out: str, device: str, runs: int,
                    env: dict | None = None, root: str = ROOT) -> tuple[float, float]:
    """Fresh ``python test.py`` processes on one photo: the medians of the wall time from the
    launch to the photo's three files (.png, .obj, .mat) being on disk, watched from here every
    millisecond (test.py renames each finished file into place), and to the process's exit.
    ``root``: the checkout whose test.py runs (the stand-in model is this one's)."""
    cmd = [sys.executable, os.path.join(root, "test.py"), "--name=standin", "--epoch=20", f"--img_folder={folder1}",
           f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}",
           f"--checkpoints_dir={os.path.join(ROOT, 'checkpoints')}", f"--results_dir={out}", f"--device={device}"]
    stem = os.path.splitext(next(f for f in sorted(os.listdir(folder1)) if not f.startswith(".")
                                 and os.path.isfile(os.path.join(folder1, f))))[0]
    files = [os.path.join(out, stem + ext) for ext in (".png", ".obj", ".mat")]
    to_exit, to_files = [], []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        first = None
        while p.poll() is None and first is None:
            if all(os.path.exists(f) for f in files):
                first = time.perf_counter() - t0
            else:
                time.sleep(0.001)
        _, err = p.communicate()
        to_exit.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"test.py failed ({p.returncode}): {err[-2000:]}")
        to_files.append(first if first is not None else to_exit[-1])  # written just before the exit
    return statistics.median(to_files), statistics.median(to_exit)


def bytecode_cache_env(folder1: str, out: str, device: str, cache_dir: str) -> dict | None:
    """Where this interpreter may not write bytecode (PYTHONDONTWRITEBYTECODE, as on images that
    also ship their packages without __pycache__, so every process compiles every module it
    imports from source), an environment whose processes read a bytecode cache in ``cache_dir``,
    filled by one untimed run: what a normal ``pip install`` (which compiles) gives. None where
    bytecode is written anyway."""
    if not sys.flags.dont_write_bytecode:
        return None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    startup_seconds(folder1, out, device, 1, env)  # writes the cache
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the timed runs only read it
    return env


def measure_startup(res: dict, folder1: str, tmp: str, device: str, runs: int) -> None:
    """Start-up figures into ``res``: as this environment runs test.py, and, where it forbids
    bytecode caching, also with a cache (``*_bytecode_cache`` keys)."""
    res["startup_to_first_image_s"], res["startup_to_exit_s"] = startup_seconds(
        folder1, os.path.join(tmp, "start"), device, runs)
    env = bytecode_cache_env(folder1, os.path.join(tmp, "start"), device, os.path.join(tmp, "pycache"))
    if env is not None:
        res["startup_to_first_image_bytecode_cache_s"], res["startup_to_exit_bytecode_cache_s"] = \
            startup_seconds(folder1, os.path.join(tmp, "start"), device, runs, env)


def print_startup(res: dict, runs: int) -> None:
    for suffix, what in (("", ""), ("_bytecode_cache", ", with a bytecode cache")):
        if f"startup_to_first_image{suffix}_s" not in res:
            continue
        print(f"| start-up to first image (launch to its files on disk, median of {runs}{what}) | "
              f"{res[f'startup_to_first_image{suffix}_s']:.2f} s |")
        print(f"| fresh process to its exit (one photo{what}) | {res[f'startup_to_exit{suffix}_s']:.2f} s |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="images per end-to-end run (default: 2048 on CUDA, 32 on CPU)")
    ap.add_argument("--batch_size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    ap.add_argument("--num_threads", type=int, default=-1, help="DataLoader workers (-1: test.py's automatic choice)")
    ap.add_argument("--write_workers", type=int, default=-1, help="writer processes (-1: test.py's automatic choice)")
    ap.add_argument("--amp", default="none")
    ap.add_argument("--tf32", action="store_true", help="test.py --tf32 (TF32 convolutions) for every run")
    ap.add_argument("--resample_on_device", action="store_true",
                    help="test.py --resample_on_device for the batched runs and the stage times")
    ap.add_argument("--decode_on_device", action="store_true",
                    help="test.py --decode_on_device (JPEGs decoded on the device; needs torchvision) likewise")
    ap.add_argument("--decode_check_folder", default="",
                    help="with --decode_on_device on CUDA: compare the two decoders' results on this folder's "
                         "faces (photos and detections; default: the example photos)")
    ap.add_argument("--startup_runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: --device cpu --n 16 --batch_size 4, one start-up run, no network comparison")
    ap.add_argument("--startup_only", action="store_true", help="measure only the start-up")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.quick:
        a.device, a.n, a.batch_size, a.startup_runs = "cpu", a.n or 16, a.batch_size or 4, 1
    if not os.path.isfile(os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth")):
        subprocess.run([sys.executable, "-m", "tools.standin"], cwd=ROOT, check=True)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    n = a.n or (2048 if cuda else 32)
    bs = a.batch_size or (64 if cuda else 8)
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="bench_")
    folder1 = make_folder(os.path.join(tmp, "one"), 1)

    from options.run_specs import model_spec
    from pipeline.model import build_model
    from pipeline.workers import loader_workers, writer_workers

    res: dict = {"device": str(device), "n_images": n, "batch_size": bs,
                 "resample_on_device": a.resample_on_device, "decode_on_device": a.decode_on_device,
                 "num_threads": loader_workers(a.num_threads, n, bs),
                 "write_workers": writer_workers(a.write_workers, n),
                 "amp": a.amp, "tf32": a.tf32,
                 "hardware": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                              "gpu": torch.cuda.get_device_name(device) if cuda else None},
                 "versions": {"python": platform.python_version(), "torch": torch.__version__,
                              "numpy": np.__version__, "cuda": torch.version.cuda}}
    if a.startup_only:
        measure_startup(res, folder1, tmp, a.device, a.startup_runs)
        print("\n| measure | value |\n| --- | --- |")
        print_startup(res, a.startup_runs)
        return finish(res, a.json, tmp)
    prec = dict(amp=a.amp, tf32=str(a.tf32).lower())
    folder = make_folder(os.path.join(tmp, "photos"), n)
    folder_quarter = make_folder(os.path.join(tmp, "quarter"), max(1, n // 4))
    t0 = time.perf_counter()
    base = options(folder, os.path.join(tmp, "out"), a.device, batch_size=bs, **prec)
    model = build_model(model_spec(base), device)
    res["model_build_s"] = time.perf_counter() - t0
    timed_run(options(folder1, os.path.join(tmp, "warm"), a.device, num_threads=0), device, model)  # warm-up
    # and once more as the timed runs go (workers, writer pool, batch size): what a process pays
    # once - the writer pool's forkserver start, the first batch's kernels - stays out of them
    warm_folder = make_folder(os.path.join(tmp, "warm_batch"), min(n, max(2 * bs, 40)))
    on_device = dict(resample_on_device="true") if a.resample_on_device else {}
    if a.decode_on_device:
        on_device["decode_on_device"] = "true"
    timed_run(options(warm_folder, os.path.join(tmp, "warm_batch_out"), a.device, batch_size=bs, **prec,
                      num_threads=a.num_threads, write_workers=a.write_workers, **on_device), device, model)
    measure_startup(res, folder1, tmp, a.device, a.startup_runs)

    workers = dict(num_threads=a.num_threads, write_workers=a.write_workers, **on_device)
    runs = {
        "all_outputs": dict(batch_size=bs, **prec, **workers),
        "coeffs_only": dict(batch_size=bs, **prec, save_mesh="false", save_png="false", **workers),
        "one_at_a_time": dict(batch_size=1, num_threads=0, write_workers=0),
    }
    res["images_per_s"], res["steady_images_per_s"] = {}, {}
    for name, kw in runs.items():
        if name == "one_at_a_time":
            n_one = min(n, 32 if cuda else 8)
            few = make_folder(os.path.join(tmp, "few"), n_one)
            opt = options(few, os.path.join(tmp, "out_" + name), a.device, **kw)
            res["images_per_s"][name] = n_one / timed_run(opt, device, model)
        else:
            t_full = timed_run(options(folder, os.path.join(tmp, "out_" + name), a.device, **kw), device, model)
            t_quarter = timed_run(options(folder_quarter, os.path.join(tmp, "outq_" + name), a.device, **kw),
                                  device, model)
            res["images_per_s"][name] = n / t_full
            extra = n - max(1, n // 4)
            res["steady_images_per_s"][name] = extra / (t_full - t_quarter) if t_full > t_quarter else float("nan")
        shutil.rmtree(os.path.join(tmp, "out_" + name), ignore_errors=True)
        steady = res["steady_images_per_s"].get(name)
        print(f"{name:>15}: {res['images_per_s'][name]:8.1f} images/s"
              + (f" (steady state {steady:.1f})" if steady is not None else ""), flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    res["stage_ms_per_image"] = stage_times(options(folder, os.path.join(tmp, "stages"), a.device, batch_size=bs,
                                                    **on_device),
                                            device, model, n_batches=max(1, min(8, n // bs)))
    if cuda:
        res["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if not a.quick:
        res["network_vs_bare"] = network_vs_bare(model, device, bs, iters=20 if cuda else 2)
    if cuda:
        from data.image_folder import AlignedFaces, images_to_float, scan_folder
        from util.preprocess import load_lm3d

        entries, _ = scan_folder(folder)
        ds = AlignedFaces(entries[:bs], load_lm3d(base.bfm_folder))
        images = images_to_float(torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))])).to(device))
        res["amp_vs_fp32"] = amp_accuracy(model, device, images)
        if a.decode_on_device:
            res["decode_on_device_vs_pil"] = decode_accuracy(model, device, a.decode_check_folder
                                                             or os.path.join(ROOT, "examples"),
                                                             load_lm3d(base.bfm_folder), bs)

    print("\n| measure | value |\n| --- | --- |")
    print(f"| device | {res['hardware']['gpu'] or res['hardware']['cpu']} ({cores} cores), torch {torch.__version__} |")
    print(f"| workers | {res['num_threads']} DataLoader, {res['write_workers']} writer processes, batch {bs}, N {n} |")
    print_startup(res, a.startup_runs)
    for k, v in res["images_per_s"].items():
        steady = res["steady_images_per_s"].get(k)
        print(f"| images/s, {k} | {v:.1f}" + (f" (steady state {steady:.1f})" if steady is not None else "") + " |")
    for k, v in res["stage_ms_per_image"].items():
        print(f"| {k}, {'KiB/face' if k == 'payload_kib' else 'ms/image'} | {v:.2f} |")
    if "network_vs_bare" in res:
        nb = res["network_vs_bare"]
        print(f"| network images/s (ours / bare ResNet-50, batch {bs}) | {nb['ours_img_s']:.0f} / "
              f"{nb['bare_resnet50_img_s']:.0f} |")
    if cuda:
        print(f"| peak GPU memory, batch {bs} | {res['peak_gpu_memory_gib']:.2f} GiB |")
        for k, v in res["amp_vs_fp32"].items():
            print(f"| {k} vs fp32: coeff max / mean abs, vertex max mm | {v['coeff_max_abs']:.2e} / "
                  f"{v['coeff_mean_abs']:.2e}, {v['vertex_max_abs_mm']:.3f} |")
        d = res.get("decode_on_device_vs_pil")
        if d:
            print(f"| decode on device vs PIL ({d['faces_decoded_on_device']} JPEG faces): crop pixels max / mean, "
                  "coeff max / mean abs, "
                  f"vertex max / mean mm | {d['pixel_max_abs']:.0f} / {d['pixel_mean_abs']:.3f}, "
                  f"{d['coeff_max_abs']:.2e} / {d['coeff_mean_abs']:.2e}, {d['vertex_max_abs_mm']:.3f} / "
                  f"{d['vertex_mean_abs_mm']:.4f} |")
    return finish(res, a.json, tmp)


def finish(res: dict, json_path: str, tmp: str) -> int:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
