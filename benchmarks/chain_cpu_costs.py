"""CPU time per photo of the chain's two photo-loading steps (not collected by pytest).

    python benchmarks/chain_cpu_costs.py [--faces tests/data/faces] [--bfm_folder standin/BFM]

On one core (process time, best of --repeats passes over the photos of --faces that have a
golden detection in tests/data/faces_lm5.json):

  * detection's load (:func:`detect.analyze.load_photo`: read, decode, checks, shrink to
    ``--max_side``), what a detection engine's reading thread does per photo;
  * reconstruction's load (:func:`data.image_folder.load_face`: read, decode, align, PIL's resize
    and crop), what a DataLoader worker does per face.

Both steps decode every photo; these figures say what sharing one decode could save at most
(docs/detection_speed.md, session 30).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_ms_per_item(fn, items: list, repeats: int) -> float:
    """The least process time of ``repeats`` passes of ``fn`` over ``items``, in ms per item."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for x in items:
            fn(x)
        best = min(best, (time.process_time() - t0) / len(items))
    return best * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=os.path.join(ROOT, "tests", "data", "faces"))
    p.add_argument("--bfm_folder", default=os.path.join(ROOT, "standin", "BFM"))
    p.add_argument("--max_side", type=int, default=1600)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import cv2

    from benchmarks.bench_inference import make_folder
    from data.image_folder import FaceEntry, load_face
    from detect.analyze import load_photo
    from util.detections_io import detection_path
    from util.preprocess import load_lm3d

    cv2.setNumThreads(1)
    lm3d = load_lm3d(a.bfm_folder)
    with tempfile.TemporaryDirectory(prefix="chain_cpu_") as tmp:
        n = len([f for f in os.listdir(a.faces) if f.lower().endswith((".jpg", ".jpeg", ".png"))])
        folder = make_folder(tmp, n, a.faces)  # one copy of each photo with a golden detection
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        detect = cpu_ms_per_item(lambda n: load_photo(folder, n, {}, a.max_side, False), names, a.repeats)
        entries = [FaceEntry(os.path.join(folder, n), detection_path(folder, n), os.path.splitext(n)[0], "")
                   for n in names]
        recon = cpu_ms_per_item(lambda e: load_face(0, e, lm3d), entries, a.repeats)
    print(f"{len(names)} photos of {a.faces}, one core:")
    print(f"  detection's load (decode, shrink to {a.max_side}): {detect:.1f} ms per photo")
    print(f"  reconstruction's load (decode, align, crop): {recon:.1f} ms per photo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
