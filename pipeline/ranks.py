"""The processes of a test.py run: one, torchrun's ranks, or one spawned per ``--gpu_ids`` GPU.

Each rank reconstructs its share of the folder (:func:`pipeline.run.run_folder`, every
world-th photo) on its GPU and writes its faces' files; the ranks' summaries are gathered into one.
"""
from __future__ import annotations

import os

import torch

from pipeline.run import run_folder
from pipeline.runtime import gpu_id_list, resolve_device, torchrun_place
from pipeline.settings import RunSpec
from pipeline.summary import RunSummary
from util.interrupts import sigterm_as_interrupt


def run_ranks(spec: RunSpec) -> tuple[RunSummary, bool]:
    """Run ``spec`` in this process, as one of torchrun's ranks (``WORLD_SIZE`` > 1), or in one
    spawned process per GPU where ``spec.gpu_ids`` names several and as many are present.

    Returns:
        (the run's summary, of all ranks; whether this process reports it: all but torchrun's
        ranks other than 0).

    Raises:
        SetupError: as :func:`pipeline.run.run_folder`, or no CUDA for a CUDA device.
    """
    place = torchrun_place()
    if place is not None:  # launched by torchrun
        rank, world, local_rank = place
        return run_rank(rank, world, spec, local_rank, spawned=False), rank == 0
    ids = gpu_id_list(spec.gpu_ids)
    if len(ids) > 1 and spec.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return run_spawned(len(ids), spec), True
    return run_rank(0, 1, spec, None, spawned=False), True


def run_rank(rank: int, world: int, spec: RunSpec, local_rank: int | None, spawned: bool) -> RunSummary:
    """Rank ``rank`` of ``world``: its share of the folder on its device (GPU ``local_rank``);
    with several ranks, joins their gloo group (``spawned``: on this machine, at ``--ddp_port``)
    and returns the summary of all of them."""
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if spawned:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(spec.ddp_port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
    device = resolve_device(spec.device, spec.gpu_ids, local_rank)
    summary = run_folder(spec, device, rank=rank, world=world, progress=rank == 0 or spec.verbose)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, summary)
        total = RunSummary(out_dir=summary.out_dir)
        for p in parts:
            total.merge(p)
        summary = total
        dist.destroy_process_group()
    return summary


def _spawned_main(rank: int, world: int, spec: RunSpec, queue) -> None:
    with sigterm_as_interrupt():
        queue.put((rank, run_rank(rank, world, spec, rank, spawned=True)))


def run_spawned(world: int, spec: RunSpec) -> RunSummary:
    """``--gpu_ids`` with several GPUs: one spawned process per GPU; the ranks are stopped (as by
    SIGTERM, which they take as Ctrl-C) when this process is interrupted."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_spawned_main, args=(world, spec, queue), nprocs=world, start_method="spawn",
                               join=False)
    summaries = {}

    def receive() -> None:  # read while they run: a summary larger than the pipe's buffer blocks its sender
        while not queue.empty():
            rank, summary = queue.get()
            summaries[rank] = summary

    try:
        while not ranks.join(timeout=0.2):  # raises if a rank failed
            receive()
    except KeyboardInterrupt:
        for p in ranks.processes:
            if p.is_alive():
                p.terminate()
        for p in ranks.processes:
            p.join(60)
        raise
    receive()
    return summaries[0]
