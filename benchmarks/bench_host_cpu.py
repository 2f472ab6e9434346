"""How the host's CPU work scales with processes (not collected by pytest).

    python benchmarks/bench_host_cpu.py [--procs 1,8,16,24,32] [--seconds 2] [--json out.json]

K forked processes (one thread each) repeat one task for ``--seconds`` after a common start;
the table gives the tasks per second of all K together and the ratio to one process:

  * ``compute``: 20 products of 160x160 float64 matrices (arithmetic only);
  * ``alloc``: a 3 MB array allocated and written (memory mapping and page faults);
  * ``decode_mem``: one example photo decoded by PIL from bytes in memory;
  * ``read_file``: one photo's file read;
  * ``load_aligned``: a DataLoader worker's share of one face in test.py (read, decode, align,
    resize + crop: :func:`data.image_folder.load_aligned`).

Where ``load_aligned`` scales with K as ``compute`` does, the host can feed N ranks N times what
it feeds one, if they get N times the workers; bench_multi_gpu.py ``--feed`` measures the
DataLoader itself.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.image_folder import load_aligned, scan_folder  # noqa: E402
from util.preprocess import load_lm3d  # noqa: E402

TASKS = ("compute", "alloc", "decode_mem", "read_file", "load_aligned")


class Tasks:
    def __init__(self, folder: str, bfm_folder: str):
        self.entries, _ = scan_folder(folder)
        self.lm3d = load_lm3d(bfm_folder)
        self.jpg = [open(e.image_path, "rb").read() for e in self.entries[:5]]
        self.a = np.random.default_rng(0).random((160, 160))

    def run(self, name: str, i: int) -> None:
        if name == "compute":
            for _ in range(20):
                self.a @ self.a
        elif name == "alloc":
            x = np.ones(3_000_000, np.uint8)
            x[::4096] = 2
        elif name == "decode_mem":
            Image.open(io.BytesIO(self.jpg[i % len(self.jpg)])).convert("RGB").load()
        elif name == "read_file":
            with open(self.entries[i % len(self.entries)].image_path, "rb") as f:
                f.read()
        else:
            load_aligned(self.entries[i % len(self.entries)], self.lm3d)


def _worker(tasks: Tasks, name: str, seconds: float, queue, start) -> None:
    import torch

    torch.set_num_threads(1)
    for i in range(3):  # warm: imports, caches
        tasks.run(name, i)
    start.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tasks.run(name, n)
        n += 1
    queue.put(n / (time.perf_counter() - t0))


def rate(tasks: Tasks, name: str, procs: int, seconds: float) -> float:
    """Tasks per second of ``procs`` forked processes together."""
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(procs + 1)
    ps = [ctx.Process(target=_worker, args=(tasks, name, seconds, queue, start)) for _ in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    rates = [queue.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(rates)


def main(argv=None) -> int:
    from benchmarks.bench_inference import make_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,8,16,24,32")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--bfm_folder", default=os.path.join(ROOT, "standin", "BFM"))
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    procs = [int(k) for k in a.procs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Tasks(make_folder(os.path.join(tmp, "photos"), 50), a.bfm_folder)
        out = {"cpu_cores": os.cpu_count(), "seconds": a.seconds, "tasks_per_s": {}}
        for name in TASKS:
            row = {k: rate(tasks, name, k, a.seconds) for k in procs}
            out["tasks_per_s"][name] = row
            print(f"{name:13s} " + "  ".join(f"K={k}: {r:9.0f}/s ({r / row[procs[0]]:5.1f}x)" for k, r in row.items()),
                  flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
