"""Multi-GPU scaling of test.py: one process on one GPU vs torchrun on N GPUs (not collected by pytest).

    python benchmarks/bench_multi_gpu.py --n 8000 --gpus 2 [--results_root /dev/shm] [--json out.json] \
        [-- extra test.py flags]

Both set-ups reconstruct copies of the example photos with the stand-in model, twice: on N and
on N/4 photos, after one unmeasured 1-GPU run on 256 photos (a fresh host's first run reads the
CUDA libraries from disk). Reported per set-up:
  * ``images_per_s``: N over the run time test.py prints (the slowest rank's; model building,
    worker start-up and the tail included, interpreter start and imports excluded);
  * ``steady_images_per_s``: the marginal rate (3N/4) / (t_N - t_N/4), which cancels what a run
    pays once whatever its size (start-up, warm-up, the last batch's writes), as
    bench_inference.py does;
  * ``after_first_result_images_per_s``: N / (last batch - first results) of the larger run's
    timeline (``test.py --verbose``; the slowest rank's), the start-up left out within one run;
and the scaling of all three, and the mean share of the host's CPUs busy during each run
(/proc/stat). ``--results_root /dev/shm`` writes the results to memory: on a disk that throttles
writeback, a large N measures the disk's file-creation rate (benchmarks/bench_file_writes.py).
``--feed`` adds test.py's DataLoader alone (decoding and aligning in its workers, nothing else) in
1 process and in N side by side, with each rank's worker count: what the host can feed 1 and N
GPUs, whatever they do. ``--cpu_control`` adds one GPU with as many DataLoader workers and
writer processes as all the ranks together: where it matches the multi-GPU rate, the host's CPU
(decoding, aligning, writing), not the GPUs, bounds both. Each run's results are deleted after
it (the .obj files of a large N fill a disk).
"""
from __future__ import annotations

import argparse
import contextlib
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


def run(cmds: list[list[str]], every: float = 0.5, env: dict | None = None, stderr: list | None = None
        ) -> tuple[list[str], float, float | None]:
    """Run the commands side by side; returns (their stdouts, wall seconds, mean share of all CPUs
    busy while they ran: /proc/stat sampled every ``every`` seconds, start-up included). Their
    stderrs are appended to ``stderr`` where given."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")), stack.enter_context(tempfile.TemporaryFile("w+")))
                 for _ in cmds]
        procs = [subprocess.Popen(c, stdout=o, stderr=e, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
                 for c, (o, e) in zip(cmds, files)]
        busy, last = [], cpu_times()
        while any(p.poll() is None for p in procs):
            time.sleep(every)
            now = cpu_times()
            if last and now and now[0] > last[0]:
                busy.append(1.0 - (now[1] - last[1]) / (now[0] - last[0]))
            last = now
        wall = time.perf_counter() - t0
        outs = []
        for c, p, (o, e) in zip(cmds, procs, files):
            o.seek(0), e.seek(0)
            if p.returncode != 0:
                raise SystemExit(f"failed ({p.returncode}): {' '.join(c)}\n{e.read()[-3000:]}")
            outs.append(o.read())
            if stderr is not None:
                stderr.append(e.read())
    return outs, wall, (sum(busy) / len(busy) if busy else None)


def test_py_runner(launcher: list[str], common: list[str]):
    """(n, folder, results) -> (run seconds test.py prints, wall seconds, summary line, CPU busy share,
    {phase: seconds} of the run's timeline as ``--verbose`` logs it, the slowest rank's)."""
    def go(n: int, folder: str, res: str) -> tuple:
        err = []
        (stdout,), wall, busy = run([[*launcher, *common, "--verbose", f"--img_folder={folder}",
                                      f"--results_dir={res}"]], stderr=err)
        m = re.search(r"done: (\d+) face\(s\) reconstructed, (\d+) failed.*\(([\d.]+) s\)", stdout)
        t = re.search(r"run timeline: (.*)", err[0])
        timeline = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", t.group(1))} if t else {}
        return float(m.group(3)), wall, m.group(0), busy, timeline
    return go


def feed_runner(ranks: int, extra: list[str]):
    """Like :func:`test_py_runner` for ``ranks`` processes that only run test.py's DataLoader on
    their shares (:func:`feed_rank`; no GPU, no model, no files written): what the host's CPUs
    deliver to that many ranks. The run's seconds are the slowest process's."""
    def go(n: int, folder: str, res: str) -> tuple:
        cmds = [[sys.executable, os.path.abspath(__file__), "--feed_rank", str(r), "--gpus", str(ranks),
                 "--feed_folder", folder, "--", *extra] for r in range(ranks)]
        outs, wall, busy = run(cmds, env={"LOCAL_WORLD_SIZE": str(ranks)})
        fed = [re.search(r"fed (\d+) face\(s\) in ([\d.]+) s", o) for o in outs]
        secs = max(float(m.group(2)) for m in fed)
        return secs, wall, f"fed {sum(int(m.group(1)) for m in fed)} face(s) in {secs:.1f} s", busy, {}
    return go


def feed_rank(rank: int, world: int, folder: str, extra: list[str]) -> int:
    """One rank's share of ``folder`` through test.py's DataLoader (same workers, batch size and
    alignment as a CUDA rank of ``world``), the batches dropped; prints the faces and seconds."""
    import torch

    from data.image_folder import scan_folder
    from options.run_specs import run_spec
    from options.test_options import parse_test_options
    from pipeline.loader import face_loader
    from pipeline.workers import default_batch_size

    opt = parse_test_options(["--name=standin", "--epoch=20", f"--img_folder={folder}",
                              f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}", *extra])
    t0 = time.perf_counter()
    entries, _ = scan_folder(folder, opt.recursive, share=(rank, world))
    bs = opt.batch_size if opt.batch_size > 0 else default_batch_size(torch.device("cuda"))
    spec = run_spec(opt)
    loader = face_loader(spec.loader, spec.model.bfm_folder, entries, torch.device("cpu"), world, batch_size=bs)
    n = sum(len(b.meta) for b in loader)
    print(f"fed {n} face(s) in {time.perf_counter() - t0:.2f} s ({loader.num_workers} workers)")
    return 0


def measure(label: str, runner, folders: dict[int, str], results_root: str) -> dict:
    out = {}
    for n, folder in folders.items():
        res = os.path.join(results_root, f"res_{label}_{n}")
        secs, wall, line, busy, timeline = runner(n, folder, res)
        shutil.rmtree(res, ignore_errors=True)
        out[n] = {"run_s": secs, "wall_s": round(wall, 2), "images_per_s": n / secs, "summary": line,
                  "cpu_busy_mean": busy, "timeline": timeline}
        cpu = f", CPUs {100 * busy:.0f} % busy" if busy is not None else ""
        print(f"{label:>16} N={n:6d}: {n / secs:8.1f} images/s ({secs:.1f} s run, {wall:.1f} s wall{cpu})", flush=True)
        if timeline:
            print(" " * 18 + "timeline: " + ", ".join(f"{k} {v:.2f}" for k, v in timeline.items()), flush=True)
    big, small = max(folders), min(folders)
    dt = out[big]["run_s"] - out[small]["run_s"]
    steady = (big - small) / dt if dt > 0 else float("nan")
    # the rate once results flow: from the first results to the last batch of the larger run (its
    # slowest rank's timeline), the start-up left out within one run rather than between two sizes
    t = out[big]["timeline"]
    flowing = big / (t["last_batch"] - t["first_result"]) if "first_result" in t and "last_batch" in t else None
    rate = f", after the first results {flowing:8.1f} images/s" if flowing else ""
    print(f"{label:>16}: steady {steady:8.1f} images/s{rate}", flush=True)
    return {"runs": out, "images_per_s": out[big]["images_per_s"], "steady_images_per_s": steady,
            "after_first_result_images_per_s": flowing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--cpu_control", action="store_true",
                    help="also run one GPU with as many DataLoader workers and writer processes as all the "
                         "ranks of the multi-GPU run have together (separates the GPUs' share from the CPU's)")
    ap.add_argument("--feed", action="store_true",
                    help="also run test.py's DataLoader alone (no GPU, no model, no files) for 1 rank and for "
                         "--gpus ranks side by side: the rates the host's CPUs can feed")
    ap.add_argument("--results_root", default="",
                    help="where the runs write their results (default: the temporary folder of the photos); "
                         "e.g. /dev/shm to take the disk's file-creation rate out of the measurement")
    ap.add_argument("--json", default="")
    ap.add_argument("--feed_rank", type=int, default=-1, help=argparse.SUPPRESS)  # a feed_runner child
    ap.add_argument("--feed_folder", default="", help=argparse.SUPPRESS)
    a, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    if a.feed_rank >= 0:
        return feed_rank(a.feed_rank, a.gpus, a.feed_folder, extra)
    tmp = tempfile.mkdtemp(prefix="mgpu_")
    results_root = tempfile.mkdtemp(prefix="mgpu_results_", dir=a.results_root) if a.results_root else tmp
    folders = {n: make_folder(os.path.join(tmp, f"photos_{n}"), n) for n in (a.n, a.n // 4)}
    common = ["test.py", "--name=standin", "--epoch=20", f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}", *extra]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        gpu = "unknown"
    # a first run on a fresh host reads the CUDA libraries from disk (model ready ~1-1.5 s later
    # than in the runs after it): one small run first, so that the 1-GPU run, measured first,
    # does not pay for it alone
    warm_folder = make_folder(os.path.join(tmp, "photos_warm_up"), 256)
    test_py_runner([sys.executable], common)(256, warm_folder, os.path.join(results_root, "res_warm_up"))
    shutil.rmtree(os.path.join(results_root, "res_warm_up"), ignore_errors=True)
    res = {"n_images": a.n, "extra_flags": extra, "results_root": a.results_root or "beside the photos", "gpu": gpu,
           "gpus": a.gpus, "cpu_cores": os.cpu_count()}
    one = measure("1_gpu", test_py_runner([sys.executable], common), folders, results_root)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.gpus}"]
    many = measure(f"{a.gpus}_gpu_torchrun", test_py_runner(torchrun, common), folders, results_root)
    res["1_gpu"], res[f"{a.gpus}_gpu_torchrun"] = one, many
    if a.cpu_control:
        from pipeline.workers import default_batch_size, loader_workers, writer_workers

        os.environ["LOCAL_WORLD_SIZE"] = str(a.gpus)  # the per-rank counts test.py's ranks choose
        n_rank = -(-a.n // a.gpus)
        bs = default_batch_size(torch.device("cuda"))
        loaders = a.gpus * loader_workers(-1, n_rank, bs, a.gpus)
        writers = a.gpus * writer_workers(-1, n_rank, a.gpus)
        del os.environ["LOCAL_WORLD_SIZE"]
        res["1_gpu_cpu_control"] = measure(
            "1_gpu_all_workers",
            test_py_runner([sys.executable], common + [f"--num_threads={loaders}", f"--write_workers={writers}"]),
            folders, results_root)
        res["1_gpu_cpu_control"]["workers"] = {"loader": loaders, "writer": writers}
    if a.feed:
        res["feed_1_rank"] = measure("feed_1_rank", feed_runner(1, extra), folders, results_root)
        res[f"feed_{a.gpus}_ranks"] = measure(f"feed_{a.gpus}_ranks", feed_runner(a.gpus, extra), folders,
                                              results_root)
        res["feed_scaling"] = res[f"feed_{a.gpus}_ranks"]["images_per_s"] / res["feed_1_rank"]["images_per_s"]
        print(f"the DataLoader alone, {a.gpus} ranks vs 1: {res['feed_scaling']:.2f}x")
    res["scaling"] = many["images_per_s"] / one["images_per_s"]
    res["steady_scaling"] = many["steady_images_per_s"] / one["steady_images_per_s"]
    flowing = ""
    rates = (many["after_first_result_images_per_s"], one["after_first_result_images_per_s"])
    if all(rates):
        res["after_first_result_scaling"] = rates[0] / rates[1]
        flowing = f", {res['after_first_result_scaling']:.2f}x after the first results"
    print(f"scaling with {a.gpus} GPUs: {res['scaling']:.2f}x end to end, {res['steady_scaling']:.2f}x steady{flowing}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(results_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
