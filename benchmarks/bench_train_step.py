"""Training-step speed of the recovery experiment, one variant of its speed options at a time
(not collected by pytest).

    python benchmarks/bench_train_step.py --device cuda --json bench_train.json
    python benchmarks/bench_train_step.py --device cuda --variants "eager=--cuda_graph false;graph=--cuda_graph true"
    python benchmarks/bench_train_step.py --device cpu --size 64 --batch_size 4 --steps 5 --warm 2   # smoke run

Each variant is a set of ``experiments.recovery`` options added to the common ones (the
stand-in face model, ``--bfm_folder``; built by ``python -m tools.standin``). For each, a fresh
session (face model, renderer, regressor, loss) is built and trained with the experiment's own
training loop (:func:`experiments.recovery.train`): ``--warm`` steps first (cuDNN's algorithm
search, graph capture, the allocator's first sizes), then ``--steps`` timed steps with one
device synchronisation at the end; no learning-curve points, no per-phase syncs. Reports ms per
step and faces per second of the whole step (synthetic data, network, face model, render, loss,
backward, Adam). ``--landmark_steps`` times the curriculum's first stage instead (no render of
the prediction). With ``--kernels N`` the last variant's steps also run under
``torch.profiler``: the N kernels and the N host operators with the most time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import recovery  # noqa: E402

OFF = "--fused_adam false --data_chunk 1 --cuda_graph false"  # the experiment before session 33
VARIANTS = (f"base={OFF};fused={OFF} --fused_adam true;chunk8={OFF} --data_chunk 8;graph={OFF} --cuda_graph true;"
            "all=--fused_adam true --data_chunk 8 --cuda_graph true")


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """``"name=--opt v;name2=..."`` -> [(name, argv), ...]; raises ValueError on an entry without '='."""
    out = []
    for entry in (e.strip() for e in spec.split(";") if e.strip()):
        if "=" not in entry:
            raise ValueError(f"a variant is name=options, got {entry!r}")
        name, args = entry.split("=", 1)
        out.append((name.strip(), shlex.split(args)))
    return out


def run_steps(o, s, steps: int) -> dict:
    """``steps`` steps of the experiment's training loop on session ``s``, the device synchronised
    at the end; returns the training's record."""
    o.max_steps = steps
    rec = recovery.train(o, s, deadline=time.perf_counter() + 3600.0)
    recovery.sync(s.device)
    return rec


def time_variant(common: list[str], extra: list[str], warm: int, steps: int, curriculum: bool) -> dict:
    """Build a session for ``common + extra`` and time ``steps`` training steps after ``warm``."""
    argv = [*common, *extra, "--curve_every_s", "1e9", "--profile_steps", "0", "--verbose", "false",
            "--curve_size", "8", "--eval_size", "8", "--eval_batch", "8", "--optimum_faces", "0"]
    if curriculum:  # the budget's deadline is an hour away: every step falls in the landmark stage
        argv += ["--curriculum", "0.99"]
    o = recovery.parse_recovery_options(argv)
    s = recovery.make_session(o)
    run_steps(o, s, warm)
    t0 = time.perf_counter()
    rec = run_steps(o, s, steps)
    seconds = time.perf_counter() - t0
    return {"options": extra, "steps": rec["steps"], "landmark_steps": rec["landmark_steps"],
            "seconds": round(seconds, 3),
            "ms_per_step": round(1000 * seconds / rec["steps"], 2),
            "faces_per_s": round(rec["steps"] * o.batch_size / seconds, 1), "_session": (o, s)}


def kernel_table(o, s, steps: int, rows: int) -> dict:
    """The ``rows`` entries with the most device time (kernels, and the operators and graph
    replays that launch them: nested entries overlap, so the rows do not add up to a step) and
    the ``rows`` host operators with the most self time, per step over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(o, s, steps)
    events = prof.key_averages()

    def top(key: str, keep) -> list[dict]:
        rows_ = sorted((e for e in events if keep(e)), key=lambda e: getattr(e, key), reverse=True)[:rows]
        return [{"name": e.key[:90], "calls": e.count, "total_ms_per_step": round(getattr(e, key) / 1000 / steps, 3)}
                for e in rows_]

    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return {"kernels": top(device_key, lambda e: getattr(e, device_key) > 0),
            "host_ops": top("self_cpu_time_total", lambda e: "::" in e.key)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--bfm_folder", default="standin/BFM")
    p.add_argument("--net_recon", default="resnet18")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warm", type=int, default=30, help="untimed steps first")
    p.add_argument("--steps", type=int, default=200, help="timed steps")
    p.add_argument("--variants", default=VARIANTS, help="name=recovery options;... (default: %(default)s)")
    p.add_argument("--landmark_steps", action="store_true", help="time the curriculum's landmark-only steps")
    p.add_argument("--kernels", type=int, default=0, help="profile the last variant: its top N kernels/host ops")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    common = ["--device", a.device, "--bfm_folder", a.bfm_folder, "--net_recon", a.net_recon,
              "--batch_size", str(a.batch_size), "--size", str(a.size)]
    results, last = {}, None
    for name, extra in parse_variants(a.variants):
        r = time_variant(common, extra, a.warm, a.steps, a.landmark_steps)
        last = r.pop("_session")
        results[name] = r
        print(f"{name:10s} {r['ms_per_step']:8.2f} ms/step  {r['faces_per_s']:9.1f} faces/s   {' '.join(extra)}",
              flush=True)
    out = {"device": a.device, "hardware": recovery.hardware(last[1].device), "torch": torch.__version__,
           "net_recon": a.net_recon, "batch_size": a.batch_size, "size": a.size, "warm": a.warm,
           "landmark_steps": a.landmark_steps, "variants": results}
    if a.kernels:
        out["profile_of"] = name
        out["profile"] = kernel_table(*last, steps=min(a.steps, 20), rows=a.kernels)
        for k in out["profile"]["kernels"]:
            print(f"  {k['total_ms_per_step']:7.3f} ms/step  {k['calls']:6d}  {k['name']}")
    if a.json:
        recovery.write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
