"""Sum up the samples that benchmarks/sampler/sitecustomize.py wrote for every process of a run.

    D3DFR_SAMPLE_DIR=/tmp/prof PYTHONPATH=benchmarks/sampler:$PYTHONPATH ./run_pipeline.sh F --name standin ...
    python benchmarks/sampling_profile.py /tmp/prof [--top 12] [--timeline 1.0] > profile.txt

Processes are grouped by role (script or multiprocessing name, digits dropped). For each role
and thread name: the share of its samples in each innermost frame ("self"), the project
functions found anywhere on the stack ("inclusive"), and a timeline of the main threads' most
sampled frame per window, on one clock for all processes (seconds since the first process
started). Shares are of wall-clock samples: a waiting thread counts where it waits.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re


def role(p: dict) -> str:
    argv0 = os.path.basename(p["argv"][0]) if p["argv"] else "?"
    name = re.sub(r"[-_:]?\d+$", "", p.get("process") or "")
    return f"{argv0} {name}".strip()


def is_project(frame: str) -> bool:
    """Not an installed package (``lib:``), the standard library (``py:``) or frozen import code."""
    return not frame.startswith(("lib:", "py:", "<", "/"))


def cores_timeline(ps: list[dict], t_first: float, window: float) -> str:
    """The processes' CPU seconds per wall second, per window of the common clock."""
    used: dict[int, float] = collections.defaultdict(float)
    for p in ps:
        points = sorted((p["t0"] - t_first + int(b) * p["bucket_s"], c) for b, c in p.get("cpu", {}).items())
        prev_c = points[0][1] if points else 0.0
        for t, c in points:
            used[int(t / window)] += c - prev_c
            prev_c = c
    return " ".join(f"{w * window:.0f}s:{used[w] / window:.1f}" for w in sorted(used))


def summarize(folder: str, top: int, window: float) -> str:
    procs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not procs:
        return f"no samples in {folder}"
    t_first = min(p["t0"] for p in procs)
    by_role = collections.defaultdict(list)
    for p in procs:
        by_role[role(p)].append(p)
    lines = [f"{len(procs)} processes, interval {procs[0]['interval'] * 1000:.1f} ms; "
             f"clock: seconds since the first process started"]
    for r, ps in sorted(by_role.items(), key=lambda kv: -sum(p["samples"] for p in kv[1])):
        starts = [p["t0"] - t_first for p in ps]
        ends = [p["end"] - t_first for p in ps]
        cpu = sum(max(p.get("cpu", {"0": 0.0}).values()) for p in ps)
        lines.append(f"\n## {r}: {len(ps)} process(es), {sum(p['samples'] for p in ps)} samples, "
                     f"from {min(starts):.2f} s to {max(ends):.2f} s, {cpu:.1f} CPU s")
        if window > 0:
            lines.append("  cores in use: " + cores_timeline(ps, t_first, window))
        per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for p in ps:
            for key, n in p["stacks"].items():
                thread, *frames = key.split(";")
                per_thread[thread][frames[-1] if frames else "?"] += n
                for fn in set(f.rsplit(":", 1)[0] if i == len(frames) - 1 else f for i, f in enumerate(frames)):
                    if is_project(fn):
                        inclusive[thread][fn] += n
        for thread, leaves in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(leaves.values())
            thread_cpu = sum(p.get("thread_cpu_s", {}).get(thread, 0.0) for p in ps)
            lines.append(f"### thread {thread}: {total} samples, {thread_cpu:.1f} CPU s (live threads at the last dump)")
            lines.append("  self: " + "; ".join(f"{100 * n / total:.0f}% {f}" for f, n in leaves.most_common(top)))
            inc = inclusive[thread]
            lines.append("  inclusive (project): " + "; ".join(f"{100 * n / total:.0f}% {f}"
                                                             for f, n in inc.most_common(top)))
        if window > 0:
            tl: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
            for p in ps:
                for b, counts in p["timeline"].items():
                    t = p["t0"] - t_first + int(b) * p["bucket_s"]
                    for k, n in counts.items():
                        if k.startswith("MainThread "):
                            tl[int(t / window)][k[len("MainThread "):]] += n
            if tl:
                lines.append("  main threads' timeline: " + " | ".join(
                    f"{w * window:.0f}s " + ", ".join(f"{f} {n}" for f, n in tl[w].most_common(2))
                    for w in sorted(tl)))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--top", type=int, default=12, help="frames listed per thread")
    ap.add_argument("--timeline", type=float, default=1.0, help="timeline window in seconds (0: none)")
    a = ap.parse_args()
    print(summarize(a.folder, a.top, a.timeline))


if __name__ == "__main__":
    main()
