"""Reconstruct 3D faces from a folder of photos (same command line as Deep3DFaceRecon_pytorch).

    python test.py --name=<model> --epoch=20 --img_folder=<folder>

reads <folder>/detections/<stem>.txt (written by ./process_images.sh) and writes
checkpoints/<model>/results/<folder name>/epoch_20_000000/<stem>.{png,obj,mat}.
Several GPUs: torchrun --nproc_per_node=N test.py ... (or --gpu_ids 0,1) shards the folder.
Exit code: 0 when every detected face was reconstructed, 1 when some failed or none was found,
2 when the run could not start (the message says what is missing).
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import time

log = logging.getLogger(__name__)
LISTED = 20  # photos skipped / faces failed shown in the summary; longer lists go to files beside the results


def _run_rank(rank: int, world: int, opt, local_rank: int | None, spawned: bool):
    from models.inference import RunSummary, resolve_device, run_folder

    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if spawned:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(opt.ddp_port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
    device = resolve_device(opt.device, opt.gpu_ids, local_rank)
    summary = run_folder(opt, device, rank=rank, world=world, progress=rank == 0 or opt.verbose)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, summary)
        total = RunSummary(out_dir=summary.out_dir)
        for p in parts:
            total.merge(p)
        summary = total
        dist.destroy_process_group()
    return summary


def _spawned_main(rank: int, world: int, opt, queue) -> None:
    from util.interrupts import sigterm_as_interrupt

    with sigterm_as_interrupt():
        queue.put((rank, _run_rank(rank, world, opt, rank, spawned=True)))


def _run_spawned(world: int, opt):
    """``--gpu_ids`` with several GPUs: one spawned process per GPU; the ranks are stopped (as by
    SIGTERM, which they take as Ctrl-C) when this process is interrupted."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_spawned_main, args=(world, opt, queue), nprocs=world, start_method="spawn",
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


def main(argv: list[str] | None = None) -> int:
    """Run test.py with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    With ``--verbose``, logs the seconds from this call (in a fresh process: its start, less
    the interpreter's own ~0.1 s) to the first face's files and to the end."""
    started = time.perf_counter()
    from options.test_options import parse_test_options

    opt = parse_test_options(argv)
    logging.basicConfig(level=logging.INFO if opt.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from models.inference import SetupError

    ready = time.perf_counter()  # options parsed, torch imported
    from util.interrupts import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            summary, reporting = _run(opt)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files already written are complete; the same command with --skip_existing true "
              "does only the rest", file=sys.stderr)
        return 130
    if reporting:
        listed = LISTED
        try:
            summary.write_long_lists(LISTED)
        except OSError as e:  # the lists stay whole on the terminal
            print(f"warning: could not write the lists of photos skipped and faces failed: {e}", file=sys.stderr)
            listed = None
        print(summary.report(listed))
        _log_timing(summary, started, ready)
    return summary.exit_code


def _run(opt):
    """(the run's summary, of all ranks; whether this process reports it: all but torchrun's
    ranks other than 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        return _run_rank(rank, world, opt, local_rank, spawned=False), rank == 0
    ids = [i for i in opt.gpu_ids.split(",") if i.strip() and int(i) >= 0]
    import torch

    if len(ids) > 1 and opt.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return _run_spawned(len(ids), opt), True
    return _run_rank(0, 1, opt, None, spawned=False), True


def _log_timing(summary, started: float, ready: float) -> None:
    """Log the seconds from ``started`` to ``ready`` (imports and options), to the first face's
    files (``RunSummary.first_result_at``, a ``time.perf_counter()`` like these) and to now."""
    def since(t: float) -> str:
        return f"{t - started:.2f} s"

    first = summary.first_result_at  # None: nothing written
    log.info("start-up: imports and options %s, first results after %s, %d face(s) after %s", since(ready),
             "-" if first is None else since(first), summary.faces_ok, since(time.perf_counter()))
    if summary.timeline:  # the slowest rank's, from the start of its run
        log.info("run timeline: %s", ", ".join(f"{k} {v:.2f} s" for k, v in summary.timeline.items()))


if __name__ == "__main__":
    code = main()
    # The interpreter's shutdown runs full garbage collections over every object torch created
    # (~0.4 s on a CPU core); the run is over and its files are closed, so leave them out.
    gc.freeze()
    sys.exit(code)
