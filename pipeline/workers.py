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
    """DataLoader workers: ``requested``, or with -1 (auto) the cores per rank minus one (the
    main process), at most 16; none when everything fits one batch (no process to start)."""
    if n_faces <= batch_size:
        return 0
    if requested < 0:
        requested = min(16, max(1, usable_cores() // ranks_per_host(world) - 1))
    return min(requested, -(-n_faces // batch_size))


def writer_workers(requested: int, n_faces: int, world: int = 1) -> int:
    """Writer processes: ``requested`` (0 = write in the main process), or with -1 (auto) one per
    core per rank, at most 16, and none for small runs (<= 32 faces). Never more than faces."""
    if requested < 0:
        if n_faces <= SMALL_RUN_FACES:
            return 0
        requested = min(16, max(1, usable_cores() // ranks_per_host(world)))
    return min(requested, n_faces)


# --------------------------------------------------------------------------- the run
def default_batch_size(device: torch.device) -> int:
    """``--batch_size -1``: 64 on CUDA (what the benchmarks measured: the GPU is then far from
    the bottleneck, 1.1 GiB at peak), 8 on the CPU (the CPU rasterizer gains nothing from more)."""
    return 64 if device.type == "cuda" else 8


def prefetch_depth(requested: int, device: torch.device) -> int:
    """``--prefetch_batches -1``: 2 on CUDA; 0 on the CPU, where a crops thread would share the
    cores with the network (with it, a CPU test of byte-equal files failed once in two runs on a
    32-core host: the convolutions' rounding may depend on the threads they get)."""
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
