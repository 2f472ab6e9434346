"""The DataLoader workers' CPU share of a face, per photo (not collected by pytest).

    python benchmarks/bench_alignment.py [--folder examples] [--repeats 200] [--json out.json]

For every face of a folder prepared by process_images.sh (default: the bundled examples), one
thread, the allocator set up as test.py's DataLoader workers (``--allocator_defaults``: glibc's
defaults), medians of ``--repeats`` timed calls after one untimed call, in ms:
  * ``pil_whole``: the original's operation, ``img.resize(size, BICUBIC).crop(box)``;
  * ``resize_crop``: :func:`util.preprocess.resize_crop`, the same pixels (checked here too);
  * ``load_aligned``: a worker's whole share (read, decode, fit the alignment, resize + crop).
With the photo's size, the resized size and the CPU and library versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import scipy  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.hardware import cpu_model  # noqa: E402
from data.image_folder import _photo_alignment, load_aligned, scan_folder  # noqa: E402
from util.preprocess import crop_box, load_lm3d, resize_crop  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=os.path.join(ROOT, "examples"))
    ap.add_argument("--bfm_folder", default=os.path.join(ROOT, "BFM"))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--allocator_defaults", action="store_true",
                    help="leave glibc's allocator as it is (test.py's workers keep freed memory)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if not a.allocator_defaults:
        from util.subprocesses import keep_freed_memory

        keep_freed_memory()
    lm3d = load_lm3d(a.bfm_folder)
    entries, _ = scan_folder(a.folder)
    rows = []
    print(f"{'face':>24} {'photo':>11} {'resized':>11} {'pil_whole':>9} {'resize_crop':>11} {'load_aligned':>12}")
    for e in entries:
        img, tr, _ = _photo_alignment(e, lm3d)
        size, box = (tr.w, tr.h), crop_box(tr)
        whole = lambda: img.resize(size, Image.Resampling.BICUBIC).crop(box)  # noqa: E731
        if not np.array_equal(np.asarray(whole()), np.asarray(resize_crop(img, size, box))):
            raise SystemExit(f"{e.name}: resize_crop differs from PIL's resize + crop")
        row = {"face": e.name, "photo": list(img.size), "resized": list(size),
               "pil_whole_ms": median_ms(whole, a.repeats),
               "resize_crop_ms": median_ms(lambda: resize_crop(img, size, box), a.repeats),
               "load_aligned_ms": median_ms(lambda: load_aligned(e, lm3d), a.repeats)}
        rows.append(row)
        print(f"{e.name:>24} {'x'.join(map(str, img.size)):>11} {'x'.join(map(str, size)):>11} "
              f"{row['pil_whole_ms']:9.2f} {row['resize_crop_ms']:11.2f} {row['load_aligned_ms']:12.2f}")
    means = {k: statistics.mean(r[k] for r in rows) for k in ("pil_whole_ms", "resize_crop_ms", "load_aligned_ms")}
    print(f"{'mean':>24} {'':>11} {'':>11} {means['pil_whole_ms']:9.2f} {means['resize_crop_ms']:11.2f} "
          f"{means['load_aligned_ms']:12.2f}")
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
           "pillow": PIL.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
           "folder": a.folder, "repeats": a.repeats, "allocator_defaults": a.allocator_defaults, "faces": rows,
           "means": means}
    print(f"{res['cpu']}, Pillow {res['pillow']}, numpy {res['numpy']}, scipy {res['scipy']}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
