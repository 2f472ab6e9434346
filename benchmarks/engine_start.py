"""Where a CUDA detection engine's start-up goes, with K engines starting at once (needs CUDA).

    python benchmarks/engine_start.py --engines 1,4,8,15 --methods spawn,forkserver --json out.json

Each engine process does what ``process_images.sh --device cuda`` engines do, one part after
another, and notes the seconds since the launch (parent clock) at the end of each part: its
interpreter and our imports, ``import torch``, the CUDA context, the PyTorch MTCNN's networks on
the GPU, reading its first 32 photos, its first ``detect_batch`` and a second one. ``spawn``
starts each engine as a fresh interpreter (every engine imports torch); ``forkserver`` forks each
from one server process that imported torch once (what :mod:`detect.workers` can do). The
figures are a diagnosis of the start-up; throughput claims come from bench_detect_pipeline.py.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PARTS = ("interpreter", "import torch", "CUDA context", "networks", "read 32 photos", "first batch", "second batch")


def engine(t0: float, folder: str, names: list[str], out, device: str = "cuda") -> None:
    marks = [time.time() - t0]
    import torch

    marks.append(time.time() - t0)
    torch.empty(0, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    marks.append(time.time() - t0)
    from detect.mtcnn_port.detector import TorchMTCNN

    det = TorchMTCNN(device)
    sync()
    marks.append(time.time() - t0)
    from detect.analyze import load_photo

    photos = [load_photo(folder, n, {}, 1600, False)["prepared"][0] for n in names]
    marks.append(time.time() - t0)
    for part in (photos[:32], photos[32:64]):
        det.detect_batch(part)
        sync()
        marks.append(time.time() - t0)
    out.put(marks)
    out.close()
    out.join_thread()
    os._exit(0)


def run(method: str, k: int, folder: str, names: list[str], device: str = "cuda") -> dict:
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":  # a fresh server each time, as a fresh command has
        import multiprocessing.forkserver as fs

        fs._forkserver._stop()
        ctx.set_forkserver_preload(["torch"])
    out = ctx.Queue()
    t0 = time.time()
    procs = [ctx.Process(target=engine, args=(t0, folder, names, out, device)) for _ in range(k)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=300) for _ in procs]
    got = time.time() - t0
    for p in procs:
        p.join()
    ended = time.time() - t0
    parts = {name: {"median_s": round(statistics.median(r[i] for r in rows), 2),
                    "max_s": round(max(r[i] for r in rows), 2)} for i, name in enumerate(PARTS)}
    return {"method": method, "engines": k, "parts_at": parts, "all_done_s": round(got, 2),
            "all_exited_s": round(ended, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", default=os.path.join(ROOT, "tests", "data", "faces"))
    p.add_argument("--engines", default="1,4,8,15")
    p.add_argument("--methods", default="spawn,forkserver")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="")
    a = p.parse_args()
    names = sorted(n for n in os.listdir(a.faces) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    names = (names * (64 // len(names) + 1))[:64]
    results = []
    for method in a.methods.split(","):
        for k in (int(v) for v in a.engines.split(",")):
            r = run(method, k, a.faces, names, a.device)
            results.append(r)
            print(f"{method:10s} x{k:2d}: " + "  ".join(f"{n} {v['median_s']:.2f}/{v['max_s']:.2f}"
                                                      for n, v in r["parts_at"].items())
                  + f"  | all done {r['all_done_s']:.2f} s, exited {r['all_exited_s']:.2f} s", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"seconds_since_launch_median_max": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
