"""Detection cost of process_images' backends on tests/data/faces, and mtcnn-vs-dlib agreement.

    python benchmarks/bench_detection.py                         # mtcnn, dlib, torch
    python benchmarks/bench_detection.py --detectors mtcnn --folder-runs 1,2 --json bench.json

For each backend of detect/ (as process_images calls it: ``create_detector(name)`` with
its default --max_side 1600): the model build time, then ``detect()`` on every photo, decoded once
by util.image_io outside the timing, after one untimed warm-up image; reported as images/s and
the median milliseconds per photo. ``--repeat`` passes over the folder are timed.

Agreement: for every photo, mtcnn's chosen face's 5 points against the 5 points derived from
dlib's 68 on the same face (Dlib68Landmarker, as --landmarks68 does), as the mean distance over
the 5 points divided by mtcnn's inter-ocular distance; mean/median/max over the photos.

``--folder-runs`` times whole ``process_images.py`` runs (a fresh process: Python, TensorFlow
import, model build, loading, detection, writing) on a temporary copy of the folder, once per
--workers value listed, and reports wall-clock images/s.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detect import base, dlib68, mtcnn_tf, registry  # noqa: E402
from util.image_io import list_images, load_image_array  # noqa: E402
from detect.analyze import order_faces  # noqa: E402
from util import landmarks  # noqa: E402

DEFAULT_FACES = os.path.join(ROOT, "tests", "data", "faces")  # the 28 test photos


def bench_backend(name: str, photos: dict[str, np.ndarray], repeat: int) -> dict:
    t0 = time.perf_counter()
    det = registry.create_detector(name)
    build = time.perf_counter() - t0
    first = next(iter(photos.values()))
    det.detect(first)  # warm-up (graph tracing, allocations)
    times, found = [], {}
    for _ in range(repeat):
        for key, img in photos.items():
            t = time.perf_counter()
            faces = det.detect(img)
            times.append(time.perf_counter() - t)
            found[key] = faces
    total = float(np.sum(times))
    return {"detector": name, "build_s": round(build, 2), "images": len(times),
            "images_per_s": round(len(times) / total, 2), "median_ms": round(1000 * float(np.median(times)), 1),
            "max_ms": round(1000 * float(np.max(times)), 1),
            "faces": int(sum(len(v) for v in found.values())), "_found": found}


def agreement(photos: dict[str, np.ndarray], mtcnn_found: dict) -> dict:
    lmk = dlib68.Dlib68Landmarker()
    errs = []
    for key, img in photos.items():
        faces = [f for f in mtcnn_found[key] if f.score >= mtcnn_tf.MTCNNDetector.default_min_score]
        if not faces:
            continue
        face = order_faces(faces, img.shape[1], img.shape[0])[0]
        lm5 = landmarks.lm68_to_5(lmk.fit(img, face))
        errs.append(float(np.linalg.norm(lm5 - face.lm5, axis=1).mean() / face.interocular))
    return {"photos": len(errs), "mean": round(float(np.mean(errs)), 4), "median": round(float(np.median(errs)), 4),
            "max": round(float(np.max(errs)), 4)}


def folder_run(folder: str, workers: int, detector: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "photos")
        shutil.copytree(folder, dst)
        n = len(list_images(dst))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "process_images.py"), dst, "--no-progress",
                            "--workers", str(workers), "--detector", detector], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"process_images failed: {r.stderr[-2000:]}")
    return {"detector": detector, "workers": workers, "images": n, "wall_s": round(wall, 2),
            "images_per_s": round(n / wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=DEFAULT_FACES, help="folder of photos (default tests/data/faces)")
    p.add_argument("--detectors", default="mtcnn,dlib,torch", help="comma-separated backends")
    p.add_argument("--repeat", type=int, default=1, help="timed passes over the folder")
    p.add_argument("--folder-runs", default="", help="comma-separated --workers values for whole runs, e.g. 1,2")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    photos = {n: load_image_array(os.path.join(args.faces, n)) for n in list_images(args.faces)}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1min": load, "python": platform.python_version(), "photos": len(photos), "folder": args.faces}
    print(f"{len(photos)} photos from {args.faces}; {info['cpu_count']} CPU cores, load average {load}")
    results, found = [], {}
    for name in [d for d in args.detectors.split(",") if d]:
        try:
            r = bench_backend(name, photos, args.repeat)
        except base.DetectorUnavailableError as e:
            print(f"{name}: unavailable ({e})")
            continue
        found[name] = r.pop("_found")
        results.append(r)
        print(f"{name:6s} build {r['build_s']:5.2f} s | {r['images_per_s']:6.2f} images/s | median "
              f"{r['median_ms']:6.1f} ms | max {r['max_ms']:7.1f} ms | {r['faces']} faces")
    out = {"machine": info, "detectors": results}
    if "mtcnn" in found and dlib68.default_predictor_path():
        out["agreement_mtcnn_vs_dlib68"] = a = agreement(photos, found["mtcnn"])
        print(f"mtcnn vs dlib-68 5 points: mean {a['mean']:.3f}, median {a['median']:.3f}, max {a['max']:.3f} "
              f"x inter-ocular distance ({a['photos']} photos)")
    runs = []
    for w in [int(v) for v in args.folder_runs.split(",") if v]:
        for name in [d for d in args.detectors.split(",") if d in found]:
            r = folder_run(args.faces, w, name)
            runs.append(r)
            print(f"process_images --detector {name} --workers {w}: {r['wall_s']:.1f} s wall for {r['images']} "
                  f"photos = {r['images_per_s']:.2f} images/s (process start and model load included)")
    if runs:
        out["folder_runs"] = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
