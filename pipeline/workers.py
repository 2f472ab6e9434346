"""Sizing of a run's processes and threads: DataLoader workers, writer processes, batch size,
prefetch depth, and the DataLoader workers' set-up."""
from __future__ import annotations

import os

import torch

SMALL_RUN_FACES = 32  # below this, writer processes cost more to start than they save


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ranks_per_host(world: int) -> int:
    """Processes of this run sharing the machine: torchrun's LOCAL_WORLD_SIZE, else ``world``."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def loader_workers(requested: int, n_faces: int, batch_size: int, world: int = 1) -> int:
    """DataLoader worker processes for a run.

    Args:
        requested: ``--num_threads``: that many, or -1 (auto): the cores per rank minus one (the
            main process), at most 16.
        n_faces, batch_size: the faces of this rank and the batch size.
        world: ranks of the run (torchrun's ``LOCAL_WORLD_SIZE`` says how many share this host).

    Returns:
        the count: 0 when everything fits one batch (no process to start), never more than batches.
    """
    if n_faces <= batch_size:
        return 0
    if requested < 0:
        requested = min(16, max(1, usable_cores() // ranks_per_host(world) - 1))
    return min(requested, -(-n_faces // batch_size))


def writer_workers(requested: int, n_faces: int, world: int = 1) -> int:
    """Writer processes for a run.

    Args:
        requested: ``--write_workers``: that many (0: write in the main process), or -1 (auto): one
            per core per rank, at most 16, none for runs of at most :data:`SMALL_RUN_FACES` faces.
        n_faces: the faces of this rank. world: ranks of the run, as for :func:`loader_workers`.

    Returns:
        the count, never more than ``n_faces``.
    """
    if requested < 0:
        if n_faces <= SMALL_RUN_FACES:
            return 0
        requested = min(16, max(1, usable_cores() // ranks_per_host(world)))
    return min(requested, n_faces)


def default_batch_size(device: torch.device) -> int:
    """``--batch_size -1``'s faces per batch on ``device``: 64 on CUDA, 8 elsewhere (why:
    docs/throughput.md, "Measurements behind the design")."""
    return 64 if device.type == "cuda" else 8


def prefetch_depth(requested: int, device: torch.device) -> int:
    """Batches a thread readies ahead: ``requested`` where >= 0, else (``--prefetch_batches -1``)
    2 on CUDA and 0 elsewhere, where a crops thread would share the cores with the network (and
    the convolutions' rounding may depend on the threads they get: docs/throughput.md)."""
    if requested >= 0:
        return requested
    return 2 if device.type == "cuda" else 0


def loader_worker_init(worker_id: int) -> None:
    """A DataLoader worker keeps its freed memory: each face's alignment makes arrays of the
    same sizes (:func:`util.subprocesses.keep_freed_memory`), and ends with the run's process,
    even one killed with ``kill -9`` (torch's own check takes up to 5 s): SIGTERM when the
    parent dies, taken as an exit, so that multiprocessing's exit removes the worker's
    ``pymp-*`` folder (the socket it hands tensors over by)."""
    import signal

    from util.subprocesses import die_with_parent, keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    die_with_parent(signal.SIGTERM)


def _exit_on_sigterm(signum, frame) -> None:
    """Exit through Python's exit (multiprocessing's clean-up runs), or at once after 2 s if
    that clean-up hangs (a queue whose reader is gone)."""
    import sys
    import threading

    timer = threading.Timer(2.0, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    sys.exit(1)
