"""Detection and the whole chain as users run them: fresh processes of the repo's commands, wall clock.

    python benchmarks/bench_detect_pipeline.py --n 4032 --json out.json              # on a GPU host
    python benchmarks/bench_detect_pipeline.py --steps scaling --scaling-detector mtcnn \\
        --workers-list 1,2 --n 56                                                     # CPU workers

Steps (--steps, comma list; each adds its figures to the JSON):

- ``agreement``: the photos of --faces detected one at a time by the torch port on the CPU
  (unbatched, the reference) vs the detection files ``process_images.sh --device cuda`` wrote for
  them in the ``detect`` step (copies 0..27 of the big folder): max and mean point distance (px),
  and the faces per photo;
- ``detect``: ``process_images.sh <N copies> --device cuda --batch_size B --workers W`` for each
  B of --batch-sizes and W of --detect-workers, each on a fresh copy: photos/s end to end
  (process start to exit), and the run's timeline (its --verbose lines: engines started, first
  and last batch done, engines ended);
- ``chain``: detection + reconstruction with all outputs of N fresh copies, two ways:
  ``process_images.sh F && python test.py --img_folder F`` and ``run_pipeline.sh F`` (streaming);
- ``scaling``: ``process_images.sh --device cpu --detector D --workers K`` for each K of
  --workers-list on --scaling-n copies: photos/s;
- ``startup``: fresh ``python test.py`` processes on one photo (benchmarks/bench_inference.py's
  measure: to the first image's files and to the exit, median of --startup-runs; with and
  without a bytecode cache where the interpreter writes none), and ``-X importtime``'s 25
  slowest imports of one run;
- ``profile``: one start-up and one ``run_pipeline.sh`` on N copies with every process sampling
  its Python stacks (benchmarks/sampler/): where each process's time goes, over time.

Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE, as on the GPU hosts'
image, whose packages ship uncompiled), every process would compile every module it imports,
torch's included, from source: the commands then run with a bytecode cache (--bytecode-cache),
filled by the warm step, as after a normal install. The copies are hard links (``<i>_<name>``) of the photos of --faces (default tests/data/faces,
else examples/). Reconstruction uses the stand-in (``python -m tools.standin``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CANDIDATE_FACES = [os.path.join(ROOT, "tests", "data", "faces"),
                   os.path.join(ROOT, "examples")]
PHOTO_EXT = (".jpg", ".jpeg", ".png")


def photo_names(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(PHOTO_EXT))


def make_copies(src: str, dst: str, n: int) -> str:
    """``n`` photos in ``dst``: ``<i>_<name>`` hard links (copies where links fail) of ``src``'s."""
    names = photo_names(src)
    os.makedirs(dst, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        out = os.path.join(dst, f"{i:05d}_{name}")
        try:
            os.link(os.path.join(src, name), out)
        except OSError:
            shutil.copyfile(os.path.join(src, name), out)
    return dst


def timed(cmd: list[str], timeout: float = 600, env: dict | None = None) -> tuple[float, str]:
    """Run ``cmd`` from the repository root; (wall seconds, stderr's last lines). Raises on failure."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exit {r.returncode}: {r.stderr[-1500:]} {r.stdout[-500:]}")
    return wall, (r.stdout + r.stderr)[-20000:]


def process_images(folder: str, *args: str, root: str = ROOT) -> list[str]:
    return [os.path.join(root, "process_images.sh"), folder, "--no-progress", *args]


def roots(a) -> list[tuple[str, str]]:
    """(label, checkout) of the commands to time: this one, and --ab-root's (alternated with it)."""
    return [("this", ROOT)] + ([("other", os.path.abspath(a.ab_root))] if a.ab_root else [])


def standin_args(folder: str, out: str, device: str) -> list[str]:
    return ["--name=standin", "--epoch=20", f"--img_folder={folder}", f"--results_dir={out}",
            f"--bfm_folder={os.path.join(ROOT, 'standin', 'BFM')}",
            f"--checkpoints_dir={os.path.join(ROOT, 'checkpoints')}", f"--device={device}"]


def step_detect(a, tmp: str, res: dict) -> None:
    runs = []
    combos = [(int(b), w, wait, extra) for b in a.batch_sizes.split(",") for w in a.detect_workers.split(",")
              for wait in a.detect_wait.split(",") for extra in a.detect_env.split(",")]
    combos = [(c, label, root) for c in combos for label, root in roots(a)]
    for r in range(a.detect_repeats):  # repeats alternate the configurations (the host's load drifts)
        for i, ((bs, workers, wait, extra), label, root) in enumerate(combos):
            folder = make_copies(a.faces, os.path.join(tmp, f"detect_{r}_{i}_bs{bs}_w{workers}_{wait}"), a.n)
            env = {**os.environ, "D3DFR_WAIT_FOR_WORKERS": "1" if wait == "yes" else "0"}
            if extra:
                name, _, value = extra.partition("=")
                env[name] = value
            wall, tail = timed(process_images(folder, "--device", a.device, "--batch_size", str(bs), "--workers",
                                              workers, "--verbose", root=root), env=env)
            report = json.load(open(os.path.join(folder, "process_report.json")))
            timeline = [line for line in tail.splitlines() if "detect." in line and " s" in line]
            runs.append({"checkout": label, "batch_size": bs, "workers": workers, "wait_for_workers": wait, "env": extra, "n": a.n,
                         "wall_s": round(wall, 2), "photos_per_s": round(a.n / wall, 1), "ok": report["summary"]["ok"],
                         "summary": report["summary"], "timeline": timeline})
            print(f"[{label}] detect --device {a.device} --batch_size {bs} --workers {workers} (waiting for the workers: "
                  f"{wait}{'; ' + extra if extra else ''}): {a.n} photos in {wall:.2f} s = {a.n / wall:.1f} photos/s "
                  f"({report['summary']['ok']} with a face)", *timeline, sep="\n  ", flush=True)
            res["detect_folder"] = folder
            if r + 1 < a.detect_repeats or i + 1 < len(combos):
                shutil.rmtree(folder, ignore_errors=True)
    res["detect"] = runs


def step_warm(a, tmp: str, res: dict) -> None:
    """One untimed detection run (fills a bytecode cache where there is one) and, on CUDA, the
    nvdiffrast plugin built (a fresh machine's first test.py otherwise spends ~25 s building it
    inside the timed chain: docs/detection_speed.md)."""
    folder = make_copies(a.faces, os.path.join(tmp, "warm"), len(photo_names(a.faces)))
    wall, _ = timed(process_images(folder, "--device", a.device))
    res["warm_run_s"] = round(wall, 2)
    if res.get("bytecode_cache"):  # every command once, so that the timed runs find their modules compiled
        timed([sys.executable, os.path.join(ROOT, "test.py"), *standin_args(folder, os.path.join(tmp, "r_warm"), a.device)])
        again = make_copies(a.faces, os.path.join(tmp, "warm_chain"), len(photo_names(a.faces)))
        timed([os.path.join(ROOT, "run_pipeline.sh"), again, *standin_args(again, os.path.join(tmp, "r_warm_chain"),
                                                                           a.device), f"--detect_device={a.device}"])
    if a.device.startswith("cuda"):
        wall, out = timed([sys.executable, "-m", "tools.build_nvdiffrast"])
        res["nvdiffrast_build"] = {"wall_s": round(wall, 2), "said": out.strip().splitlines()[-1:]}


def step_agreement(a, tmp: str, res: dict) -> None:
    from detect import registry
    from util.detections_io import detection_path, read_points
    from util.image_io import load_image_array

    folder = res.get("detect_folder")
    if folder is None:
        folder = make_copies(a.faces, os.path.join(tmp, "agree"), len(photo_names(a.faces)))
        timed(process_images(folder, "--device", a.device))
    det = registry.create_detector("torch", device="cpu")
    errs, missing, extra = [], [], []
    for i, name in enumerate(photo_names(a.faces)):
        ref = det.detect(load_image_array(os.path.join(a.faces, name)))
        ref = [f for f in ref if f.score >= det.default_min_score]
        path = detection_path(folder, f"{i:05d}_{name}")
        if not ref:
            (extra if os.path.exists(path) else []).append(name)
            continue
        if not os.path.exists(path):
            missing.append(name)
            continue
        from detect.analyze import order_faces

        img = load_image_array(os.path.join(a.faces, name))
        best = order_faces(ref, img.shape[1], img.shape[0])[0]
        errs.append(float(np.abs(read_points(path) - best.lm5).max()))
    res["agreement_vs_unbatched_cpu_port"] = {
        "photos": len(errs), "max_px": round(max(errs), 4) if errs else None,
        "mean_px": round(float(np.mean(errs)), 4) if errs else None, "missing": missing, "extra": extra}
    print("agreement:", res["agreement_vs_unbatched_cpu_port"], flush=True)


def step_chain(a, tmp: str, res: dict) -> None:
    """The two commands, then ``run_pipeline.sh`` once per --chain-variants item, --chain-repeats
    times, alternated (the host's load drifts), each on fresh copies."""
    out: dict = {"two_commands": [], "run_pipeline": []}
    res["chain"] = out  # filled as the runs end: a failed run keeps the ones before
    for r in range(a.chain_repeats):
        for label, root in roots(a) if a.chain_two == "yes" else []:
            folder = make_copies(a.faces, os.path.join(tmp, f"chain_two_{r}_{label}"), a.n)
            t0 = time.perf_counter()
            w1, _ = timed(process_images(folder, "--device", a.device, root=root))
            w2, _ = timed([sys.executable, os.path.join(root, "test.py"),
                           *standin_args(folder, os.path.join(tmp, f"r_two_{r}_{label}"), a.device)])
            wall = time.perf_counter() - t0
            out["two_commands"].append({"checkout": label, "n": a.n, "detect_s": round(w1, 2),
                                        "test_py_s": round(w2, 2), "wall_s": round(wall, 2),
                                        "photos_per_s": round(a.n / wall, 1)})
            print(f"[{label}] chain, process_images.sh && test.py: {a.n} photos, {w1:.2f} + {w2:.2f} s = "
                  f"{a.n / wall:.1f} photos/s", flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # all outputs of 4032 photos take ~17 GB
            shutil.rmtree(os.path.join(tmp, f"r_two_{r}_{label}"), ignore_errors=True)
        for i, (extra, (label, root)) in enumerate((x, lr) for x in a.chain_variants.split(";") for lr in roots(a)):
            folder = make_copies(a.faces, os.path.join(tmp, f"chain_stream_{r}_{i}"), a.n)
            r_out = os.path.join(tmp, f"r_stream_{r}_{i}")
            wall, tail = timed([os.path.join(root, "run_pipeline.sh"), folder,
                                *standin_args(folder, r_out, a.device)[:-1], f"--device={a.device}",
                                f"--detect_device={a.device}", "--verbose", *extra.split()])
            files = len(os.listdir(r_out)) if os.path.isdir(r_out) else 0
            timeline = [line for line in tail.splitlines()
                        if any(k in line for k in ("reconstruction ended", "detect.", "model ready", "detection process"))]
            out["run_pipeline"].append({"checkout": label, "args": extra, "n": a.n, "wall_s": round(wall, 2),
                                        "photos_per_s": round(a.n / wall, 1), "files_written": files,
                                        "timeline": timeline, "tail": tail[-300:]})
            print(f"[{label}] chain, run_pipeline.sh {extra}: {a.n} photos in {wall:.2f} s = {a.n / wall:.1f} photos/s "
                  f"({files} files)", *timeline, sep="\n  ", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(r_out, ignore_errors=True)


def step_scaling(a, tmp: str, res: dict) -> None:
    runs = []
    for i, k in enumerate(int(v) for v in a.workers_list.split(",")):  # a count may come twice
        folder = make_copies(a.faces, os.path.join(tmp, f"scale_{i}_{k}"), a.scaling_n)
        wall, _ = timed(process_images(folder, "--device", "cpu", "--detector", a.scaling_detector, "--workers", str(k)))
        runs.append({"workers": k, "n": a.scaling_n, "wall_s": round(wall, 2),
                     "photos_per_s": round(a.scaling_n / wall, 2)})
        print(f"--device cpu --detector {a.scaling_detector} --workers {k}: {a.scaling_n} photos in {wall:.2f} s = "
              f"{a.scaling_n / wall:.2f} photos/s", flush=True)
    res["scaling"] = {"detector": a.scaling_detector, "runs": runs}


def step_startup(a, tmp: str, res: dict) -> None:
    from benchmarks.bench_inference import measure_startup

    one = make_copies(a.faces, os.path.join(tmp, "one"), 1)
    timed(process_images(one, "--device", a.device))
    st: dict = {}
    if res.get("bytecode_cache") or a.ab_root:  # runs alternated between the checkouts, medians of each
        from benchmarks.bench_inference import startup_seconds

        times: dict = {label: [] for label, _ in roots(a)}
        for _, root in roots(a):  # untimed: each checkout's modules compiled into the cache first
            startup_seconds(one, os.path.join(tmp, "start"), a.device, 1, root=root)
        for _ in range(a.startup_runs):
            for label, root in roots(a):
                times[label].append(startup_seconds(one, os.path.join(tmp, "start"), a.device, 1, root=root))
        for label, runs in times.items():
            key = "" if label == "this" else "_other"
            st[f"startup_to_first_image{key}_s"] = statistics.median(r[0] for r in runs)
            st[f"startup_to_exit{key}_s"] = statistics.median(r[1] for r in runs)
            st[f"startup_runs{key}"] = [[round(x, 3) for x in r] for r in runs]
    else:
        measure_startup(st, one, tmp, a.device, a.startup_runs)
    res["startup"] = st
    print("start-up:", st, flush=True)
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "test.py"),
                        *standin_args(one, os.path.join(tmp, "r_one"), a.device)], cwd=ROOT, capture_output=True,
                       text=True)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [p.strip() for p in line[len("import time:"):].split("|")]
            if parts[0].isdigit():
                rows.append((int(parts[1]), parts[2]))
    res["startup"]["slowest_imports_us"] = sorted(rows, reverse=True)[:25]


def sampled_env(folder: str, interval: float) -> dict:
    """The environment that makes every Python process of a command sample itself into ``folder``
    (benchmarks/sampler/sitecustomize.py)."""
    path = os.path.join(ROOT, "benchmarks", "sampler")
    return {**os.environ, "D3DFR_SAMPLE_DIR": folder, "D3DFR_SAMPLE_INTERVAL": str(interval), "D3DFR_SAMPLE_ROOT": ROOT,
            "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}


def step_profile(a, tmp: str, res: dict) -> None:
    """Where the time goes, by sampling every process's Python stacks (benchmarks/sampling_profile.py):
    one ``test.py`` start-up on one photo (every millisecond), then one ``run_pipeline.sh`` on N
    fresh copies (every 5 ms; a little slower than without the sampler). The summaries go into the
    JSON and, as text, beside it (``<json>.profile_*.txt``)."""
    from benchmarks.sampling_profile import summarize

    out: dict = {}
    one = make_copies(a.faces, os.path.join(tmp, "one_p"), 1)
    timed(process_images(one, "--device", a.device))
    runs = [("startup", 0.001, [sys.executable, os.path.join(ROOT, "test.py"),
                                *standin_args(one, os.path.join(tmp, "r_one_p"), a.device), "--verbose"])]
    folder = make_copies(a.faces, os.path.join(tmp, "chain_p"), a.n)
    runs.append(("run_pipeline", 0.005, [os.path.join(ROOT, "run_pipeline.sh"), folder,
                                         *standin_args(folder, os.path.join(tmp, "r_chain_p"), a.device),
                                         f"--detect_device={a.device}", "--verbose"]))
    for name, interval, cmd in runs:
        samples = os.path.join(tmp, f"samples_{name}")
        wall, tail = timed(cmd, env=sampled_env(samples, interval))
        text = summarize(samples, 15, 1.0 if name == "run_pipeline" else 0.25)
        out[name] = {"wall_s": round(wall, 2), "log": tail[-3000:], "summary": text}
        print(f"profile {name}: {wall:.2f} s (sampled)\n{text}", flush=True)
        if a.json:
            with open(f"{a.json}.profile_{name}.txt", "w") as f:
                f.write(f"{' '.join(cmd)}\n{wall:.2f} s with the sampler\n{tail[-3000:]}\n\n{text}\n")
    shutil.rmtree(folder, ignore_errors=True)  # all outputs of 4032 photos take ~17 GB
    shutil.rmtree(os.path.join(tmp, "r_chain_p"), ignore_errors=True)
    res["profile"] = out


STEPS = {"warm": step_warm, "detect": step_detect, "agreement": step_agreement, "chain": step_chain, "scaling": step_scaling,
         "startup": step_startup, "profile": step_profile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=next((d for d in CANDIDATE_FACES if os.path.isdir(d)), CANDIDATE_FACES[0]))
    p.add_argument("--n", type=int, default=4032, help="photos of the detect and chain steps")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", default="detect,agreement,chain,scaling,startup")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--detect-workers", default="auto", help="--workers of the detect step, a comma list")
    p.add_argument("--detect-wait", default="no", help="detect step: 'no' (process_images leaves without waiting "
                   "for its engines' exit, its default), 'yes' (D3DFR_WAIT_FOR_WORKERS=1), or 'no,yes'")
    p.add_argument("--detect-env", default="", help="detect step: environment variants to alternate, a comma "
                   "list of NAME=VALUE (an empty item: none), e.g. an experiment switch's two settings")
    p.add_argument("--detect-repeats", type=int, default=1, help="detect step: runs of each configuration")
    p.add_argument("--chain-repeats", type=int, default=1, help="chain step: runs of each way")
    p.add_argument("--chain-variants", default="", help="chain step: run_pipeline.sh's extra arguments to "
                   "alternate, a ';' list (an empty item: none), e.g. ';--num_threads 8'")
    p.add_argument("--chain-two", choices=("yes", "no"), default="yes", help="chain step: also time the two "
                   "commands (process_images.sh, then test.py)")
    p.add_argument("--ab-root", default="", help="another checkout of this project (e.g. `git worktree add` of an "
                   "older commit): the detect and chain steps alternate each run between its commands and these")
    p.add_argument("--workers-list", default="1,2,4,8,15")
    p.add_argument("--scaling-n", type=int, default=112)
    p.add_argument("--scaling-detector", default="torch")
    p.add_argument("--startup-runs", type=int, default=3)
    p.add_argument("--bytecode-cache", choices=("auto", "yes", "no"), default="auto",
                   help="run every command with a bytecode cache that the warm step fills (auto: where this "
                   "environment forbids writing bytecode, as some images do; a normal install has one)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    import torch

    res: dict = {"host": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "load_average_at_start": os.getloadavg()}, "faces": a.faces,
                 "photos_in_faces": len(photo_names(a.faces))}
    tmp = tempfile.mkdtemp(prefix="bench_detect_")
    if a.bytecode_cache == "yes" or (a.bytecode_cache == "auto" and (sys.flags.dont_write_bytecode
                                                                     or os.environ.get("PYTHONDONTWRITEBYTECODE"))):
        # as a normal install runs (pip compiles what it installs; Python caches the rest on first
        # import): every command reads compiled modules, where this environment would have each
        # process compile every module it imports (torch's included) from source
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
        res["bytecode_cache"] = os.environ["PYTHONPYCACHEPREFIX"]
    failed = 0
    try:
        for step in [s for s in a.steps.split(",") if s]:
            try:
                STEPS[step](a, tmp, res)
            except Exception as e:  # noqa: BLE001 - the other steps still run
                failed += 1
                res.setdefault("errors", {})[step] = f"{type(e).__name__}: {e}"
                print(f"step {step} failed: {e}", flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(res, f, indent=1, default=str)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
