"""Face detection throughput: the `mtcnn` package (TensorFlow, CPU) vs detect.mtcnn_port.

    python benchmarks/bench_mtcnn_torch.py                    # every backend available here
    python benchmarks/bench_mtcnn_torch.py --threads 1        # one CPU thread for torch and TF
    python benchmarks/bench_mtcnn_torch.py -n 280 --backends torch-cpu,torch-cuda \\
        --batch-sizes 1,8,32 --json bench_mtcnn.json          # on a GPU machine

The photos of --faces (default tests/data/faces, the 28 test photos) are decoded once, outside the
timing, and the list is repeated to -n images. The package detects one image per call (its
batch mode pads the images to a common size, which changes the results); TorchMTCNN runs
``detect_batch`` on chunks of each --batch-sizes value. Every backend gets --warmup untimed
images first; CUDA timings synchronise before the clock stops. Both detectors use the same
thresholds (the package is called with TorchMTCNN's). Prints hardware, versions and a table
(wall time, and the process' CPU time over all threads, which shows contention on a busy
machine); --json writes the same.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere

from benchmarks.hardware import cpu_model  # noqa: E402
from detect.mtcnn_port.detector import DEFAULT_THRESHOLDS, TorchMTCNN  # noqa: E402

DEFAULT_FACES = os.path.join(ROOT, "tests", "data", "faces")  # the 28 test photos
BACKENDS = ("package", "torch-cpu", "torch-cuda")


def load_photos(folder: str, n: int) -> list[np.ndarray]:
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise FileNotFoundError(f"no .jpg/.png photos in {folder}")
    photos = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            photos.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    return [photos[i % len(photos)] for i in range(n)]


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def time_calls(run, chunks, sync=None) -> tuple[float, float]:
    """Wall seconds and this process' CPU seconds (all threads) for ``run`` over ``chunks``."""
    start, cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        run(chunk)
    if sync is not None:
        sync()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_package(images, warmup, thresholds, threads) -> dict:
    import tensorflow as tf  # noqa: PLC0415 - only for this backend

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import mtcnn  # noqa: PLC0415

    det = mtcnn.MTCNN()
    kw = dict(threshold_pnet=thresholds[0], threshold_rnet=thresholds[1], threshold_onet=thresholds[2])
    for im in images[:warmup]:
        det.detect_faces(im, **kw)
    seconds, cpu_seconds = time_calls(lambda im: det.detect_faces(im, **kw), images)
    return {"backend": "package", "device": "cpu", "batch_size": 1, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "versions": {"mtcnn": _version("mtcnn"), "tensorflow": tf.__version__}}


def bench_torch(images, warmup, device, batch_size) -> dict:
    det = TorchMTCNN(device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    warm = images[:max(warmup, batch_size if device == "cuda" else 0)]
    for i in range(0, len(warm), batch_size):
        det.detect_batch(warm[i:i + batch_size])
    if sync:
        sync()
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    seconds, cpu_seconds = time_calls(det.detect_batch, chunks, sync)
    return {"backend": f"torch-{device}", "device": device, "batch_size": batch_size, "seconds": seconds,
            "cpu_seconds": cpu_seconds}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", default=DEFAULT_FACES,
                        help="folder of photos (default tests/data/faces)")
    parser.add_argument("-n", "--images", type=int, default=28, help="images timed per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images first")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma list of {BACKENDS}; unavailable ones are skipped")
    parser.add_argument("--batch-sizes", default="1,8", help="TorchMTCNN detect_batch sizes")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and TensorFlow (default: their own choice)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_photos(args.faces, args.images)
    megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    env = environment()
    env["threads_option"] = args.threads
    print("environment:", json.dumps(env))
    print(f"{len(images)} images ({megapixels:.1f} Mpx) from {os.path.abspath(args.faces)}")

    runs = []
    for backend in backends:
        if backend == "package":
            if _version("mtcnn") is None or not (_version("tensorflow") or _version("tensorflow-cpu")):
                print("skipping package: mtcnn/tensorflow not installed")
                continue
            new = [bench_package(images, args.warmup, DEFAULT_THRESHOLDS, args.threads)]
        elif backend == "torch-cuda" and not torch.cuda.is_available():
            print("skipping torch-cuda: no CUDA device")
            continue
        else:
            device = backend.split("-", 1)[1]
            new = [bench_torch(images, args.warmup, device, bs) for bs in batch_sizes]
        for run in new:
            run.update(images=len(images), megapixels=megapixels, images_per_s=len(images) / run["seconds"])
            print(f"  {run['backend']} batch {run['batch_size']}: {run['images_per_s']:.2f} images/s", flush=True)
        runs += new

    print(f"\n{'backend':<12} {'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9} {'Mpx/s':>7} "
          f"{'CPU s':>7}")
    for run in runs:
        print(f"{run['backend']:<12} {run['batch_size']:>5} {run['images']:>6} {run['seconds']:>8.2f} "
              f"{run['images_per_s']:>9.2f} {run['megapixels'] / run['seconds']:>7.2f} {run['cpu_seconds']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "faces": os.path.abspath(args.faces), "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":
    main()
