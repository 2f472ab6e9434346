"""This checkout's test.py against an earlier commit's, on the same photos, wall clock, alternating.

    python benchmarks/bench_versions.py [--ref 741719b] [--copies 2] [--repeats 5] [--device cpu]

Builds the commit's files from this clone's history (``git archive``), a folder of ``--copies``
copies of tests/data/faces with their golden detections, and the stand-in model (``python -m
tools.standin`` when missing), then runs both ``test.py`` versions in turn (fresh processes, all
outputs) on the folder and on one photo (start-up), and prints each run and the medians. The first
run of each version also writes its bytecode cache; it is left out of the medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FACES = os.path.join(ROOT, "tests", "data", "faces")


def timed_run(tree: str, photos: str, out: str, device: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "test.py", "--name", "standin", "--epoch", "20",
           "--checkpoints_dir", os.path.join(ROOT, "checkpoints"), "--bfm_folder", os.path.join(ROOT, "standin", "BFM"),
           "--img_folder", photos, "--results_dir", out, "--device", device]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="741719b", help="the earlier commit")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from benchmarks.bench_inference import make_folder

    if not os.path.isfile(os.path.join(ROOT, "checkpoints", "standin", "epoch_20.pth")):
        subprocess.run([sys.executable, "-m", "tools.standin"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="bench_versions_")
    try:
        ref = os.path.join(work, "ref")
        os.makedirs(ref)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", ref], input=archive, check=True)
        n_faces = len([f for f in os.listdir(FACES) if not f.endswith(".md")])
        folders = {"folder": make_folder(os.path.join(work, "many"), args.copies * n_faces, FACES),
                   "one photo": make_folder(os.path.join(work, "one"), 1, FACES)}
        trees = {args.ref: ref, "this checkout": ROOT}
        for what, photos in folders.items():
            n = len([f for f in os.listdir(photos) if f != "detections"])
            times: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(args.repeats + 1):
                for label, tree in trees.items():
                    times[label].append(timed_run(tree, photos, os.path.join(work, "out"), args.device))
            for label, ts in times.items():
                med = statistics.median(ts[1:])
                print(f"{what} ({n} photos), {label}: median {med:.2f} s ({n / med:.1f} photos/s); runs "
                      + " ".join(f"{t:.2f}" for t in ts))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
