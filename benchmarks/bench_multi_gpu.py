"""Multi-GPU scaling of test.py: one process on one GPU vs torchrun on N GPUs (not collected by pytest).

    python benchmarks/bench_multi_gpu.py --n 2000 --gpus 2 [--json out.json] [-- extra test.py flags]

Both runs reconstruct the same N copies of the example photos with the stand-in model; images/s
is N over the slowest rank's run time (printed by test.py's summary: model building and process
start-up excluded, as in bench_inference.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_inference import make_folder  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    m = re.search(r"done: (\d+) face\(s\) reconstructed, (\d+) failed.*\(([\d.]+) s\)", r.stdout)
    return float(m.group(3)), wall, m.group(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--json", default="")
    a, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    tmp = tempfile.mkdtemp(prefix="mgpu_")
    folder = make_folder(os.path.join(tmp, "photos"), a.n)
    common = ["test.py", "--name=standin", "--epoch=20", f"--img_folder={folder}",
              f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}", *extra]
    res = {"n_images": a.n, "extra_flags": extra}
    for label, cmd in (
        ("1_gpu", [sys.executable, *common, f"--results_dir={tmp}/r1"]),
        (f"{a.gpus}_gpu_torchrun", [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.gpus}",
                                    *common, f"--results_dir={tmp}/r{a.gpus}"]),
    ):
        secs, wall, line = run(cmd)
        res[label] = {"run_s": secs, "wall_s": wall, "images_per_s": a.n / secs, "summary": line}
        print(f"{label:>16}: {a.n / secs:8.1f} images/s ({secs:.1f} s run, {wall:.1f} s wall)", flush=True)
    res["scaling"] = res[f"{a.gpus}_gpu_torchrun"]["images_per_s"] / res["1_gpu"]["images_per_s"]
    print(f"scaling with {a.gpus} GPUs: {res['scaling']:.2f}x")
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
