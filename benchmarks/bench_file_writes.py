"""How many small result files a folder's filesystem takes per second, written the way test.py's
writers write them: K processes, each file ~2 KB (a coefficients-only face's .mat), written under
a temporary name and renamed into place, all into one folder.

    python benchmarks/bench_file_writes.py /tmp/probe /dev/shm/probe [--cases 16x60000 32x120000]

For each root and each case (processes x files) it prints files/s over the whole case and over
its first and second halves (writeback throttling shows as a slower second half, or as slower
later cases once earlier ones' dirty pages pile up). The folders are removed afterwards.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time

PAYLOAD = 2200  # bytes: about a coefficients-only .mat


def _writer(folder: str, k: int, procs: int, n: int, t_half, start) -> None:
    data = os.urandom(PAYLOAD)
    start.wait()
    for i in range(k, n, procs):
        base = os.path.join(folder, f"{i:06d}_photo")
        with open(base + ".mat.part", "wb") as f:
            f.write(data)
        os.replace(base + ".mat.part", base + ".mat")
        if i == n // 2:
            t_half.value = time.perf_counter()


def write_case(root: str, procs: int, n: int) -> dict:
    """``procs`` forked processes write ``n`` files into a new folder under ``root``; returns the
    rates (files/s) of the whole case and of its two halves."""
    folder = os.path.join(root, f"files_{procs}_{n}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    ctx = mp.get_context("fork")
    start, t_half = ctx.Barrier(procs + 1), ctx.Value("d", 0.0)
    workers = [ctx.Process(target=_writer, args=(folder, k, procs, n, t_half, start)) for k in range(procs)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    total = time.perf_counter() - t0
    written = len(os.listdir(folder))
    shutil.rmtree(folder, ignore_errors=True)
    half = max(t_half.value - t0, 1e-9)
    return {"procs": procs, "files": written, "files_per_s": n / total, "first_half_files_per_s": n / 2 / half,
            "second_half_files_per_s": n / 2 / max(total - half, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", help="folders to write under (created if missing)")
    ap.add_argument("--cases", nargs="+", default=["16x60000", "32x60000", "16x120000", "32x120000"],
                    help="PROCESSESxFILES, run in this order")
    a = ap.parse_args(argv)
    print(subprocess.run(["df", "-T", *a.roots], capture_output=True, text=True).stdout, flush=True)
    for root in a.roots:
        os.makedirs(root, exist_ok=True)
        for case in a.cases:
            procs, n = (int(x) for x in case.split("x"))
            r = write_case(root, procs, n)
            print(f"{root:12s} procs {procs:2d} n {n:6d}: {r['files_per_s']:8.0f} files/s "
                  f"(first half {r['first_half_files_per_s']:8.0f}, second {r['second_half_files_per_s']:8.0f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
