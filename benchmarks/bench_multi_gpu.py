"""Multi-GPU scaling of test.py: one process on one GPU vs torchrun on N GPUs (not collected by pytest).

    python benchmarks/bench_multi_gpu.py --n 8000 --gpus 2 [--json out.json] [-- extra test.py flags]

Both set-ups reconstruct copies of the example photos with the stand-in model, twice: on N and
on N/4 photos. Reported per set-up:
  * ``images_per_s``: N over the run time test.py prints (the slowest rank's; model building,
    worker start-up and the tail included, interpreter start and imports excluded);
  * ``steady_images_per_s``: the marginal rate (3N/4) / (t_N - t_N/4), which cancels what a run
    pays once whatever its size (start-up, warm-up, the last batch's writes), as
    bench_inference.py does;
and the scaling of both, and the mean share of the host's CPUs busy during each run (/proc/stat).
``--cpu_control`` adds one GPU with as many DataLoader workers and
writer processes as all the ranks together: where it matches the multi-GPU rate, the host's CPU
(decoding, aligning, writing), not the GPUs, bounds both. Each run's results are deleted after
it (the .obj files of a large N fill a disk).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_inference import make_folder  # noqa: E402


def cpu_times() -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(v), v[3] + v[4]


def run(cmd: list[str], every: float = 0.5) -> tuple[float, float, str, float | None]:
    """Run test.py; returns (its printed run seconds, wall seconds, its summary line, mean share of
    all CPUs busy while it ran: /proc/stat sampled every ``every`` seconds, start-up included)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        busy, last = [], cpu_times()
        while p.poll() is None:
            time.sleep(every)
            now = cpu_times()
            if last and now and now[0] > last[0]:
                busy.append(1.0 - (now[1] - last[1]) / (now[0] - last[0]))
            last = now
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    m = re.search(r"done: (\d+) face\(s\) reconstructed, (\d+) failed.*\(([\d.]+) s\)", stdout)
    return float(m.group(3)), wall, m.group(0), (sum(busy) / len(busy) if busy else None)


def measure(label: str, launcher: list[str], common: list[str], folders: dict[int, str], tmp: str) -> dict:
    out = {}
    for n, folder in folders.items():
        res = os.path.join(tmp, f"res_{label}_{n}")
        secs, wall, line, busy = run([*launcher, *common, f"--img_folder={folder}", f"--results_dir={res}"])
        shutil.rmtree(res, ignore_errors=True)
        out[n] = {"run_s": secs, "wall_s": round(wall, 2), "images_per_s": n / secs, "summary": line,
                  "cpu_busy_mean": busy}
        cpu = f", CPUs {100 * busy:.0f} % busy" if busy is not None else ""
        print(f"{label:>16} N={n:6d}: {n / secs:8.1f} images/s ({secs:.1f} s run, {wall:.1f} s wall{cpu})", flush=True)
    big, small = max(folders), min(folders)
    dt = out[big]["run_s"] - out[small]["run_s"]
    steady = (big - small) / dt if dt > 0 else float("nan")
    print(f"{label:>16}: steady {steady:8.1f} images/s", flush=True)
    return {"runs": out, "images_per_s": out[big]["images_per_s"], "steady_images_per_s": steady}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--cpu_control", action="store_true",
                    help="also run one GPU with as many DataLoader workers and writer processes as all the "
                         "ranks of the multi-GPU run have together (separates the GPUs' share from the CPU's)")
    ap.add_argument("--json", default="")
    a, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    tmp = tempfile.mkdtemp(prefix="mgpu_")
    folders = {n: make_folder(os.path.join(tmp, f"photos_{n}"), n) for n in (a.n, a.n // 4)}
    common = ["test.py", "--name=standin", "--epoch=20", f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}", *extra]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        gpu = "unknown"
    res = {"n_images": a.n, "extra_flags": extra, "gpu": gpu, "gpus": a.gpus, "cpu_cores": os.cpu_count()}
    one = measure("1_gpu", [sys.executable], common, folders, tmp)
    many = measure(f"{a.gpus}_gpu_torchrun", [sys.executable, "-m", "torch.distributed.run",
                                              f"--nproc_per_node={a.gpus}"], common, folders, tmp)
    res["1_gpu"], res[f"{a.gpus}_gpu_torchrun"] = one, many
    if a.cpu_control:
        from models.inference import default_batch_size, loader_workers, writer_workers

        os.environ["LOCAL_WORLD_SIZE"] = str(a.gpus)  # the per-rank counts test.py's ranks choose
        n_rank = -(-a.n // a.gpus)
        bs = default_batch_size(torch.device("cuda"))
        loaders = a.gpus * loader_workers(-1, n_rank, bs, a.gpus)
        writers = a.gpus * writer_workers(-1, n_rank, a.gpus)
        del os.environ["LOCAL_WORLD_SIZE"]
        res["1_gpu_cpu_control"] = measure("1_gpu_all_workers", [sys.executable],
                                           common + [f"--num_threads={loaders}", f"--write_workers={writers}"],
                                           folders, tmp)
        res["1_gpu_cpu_control"]["workers"] = {"loader": loaders, "writer": writers}
    res["scaling"] = many["images_per_s"] / one["images_per_s"]
    res["steady_scaling"] = many["steady_images_per_s"] / one["steady_images_per_s"]
    print(f"scaling with {a.gpus} GPUs: {res['scaling']:.2f}x end to end, {res['steady_scaling']:.2f}x steady")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
