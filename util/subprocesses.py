"""Worker processes: starting them without re-running the caller's script, and their allocator.

With the ``forkserver`` and ``spawn`` start methods Python runs the main script's top level again
in every child process (as ``__mp_main__``), so that functions defined there can be unpickled. The
project's workers (writer processes, detection workers) need nothing from the caller's script: their
functions live in importable modules. :func:`main_module_hidden` keeps the script out of them.
:func:`keep_freed_memory` lets a worker that makes the same arrays face after face (writers, the
DataLoader's decoding and aligning workers) reuse their pages instead of faulting in fresh ones.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import types


@contextlib.contextmanager
def main_module_hidden():
    """Hide the caller's ``__main__`` module while worker processes start (wrap the calls that
    start them: ``ProcessPoolExecutor.submit`` with a forkserver/spawn context starts them lazily).

    Without this, a script that imports torch at its top costs every child seconds (figures:
    docs/throughput.md). (The forkserver's own preloading
    of ``__main__`` never happens: ``multiprocessing.forkserver`` asks for a ``main_path`` key that
    ``spawn.get_preparation_data`` does not produce, so each child imports the script itself.)
    """
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


# glibc's mallopt parameters, and the values workers use (32 MiB: glibc's largest mmap threshold)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BLOCKS_BELOW, _KEEP_FREE_TOP = 32 << 20, 256 << 20


def keep_freed_memory() -> bool:
    """Let this process's allocator (glibc's malloc) keep freed memory for reuse: blocks below
    32 MiB come from the heap instead of fresh ``mmap`` pages, and up to 256 MiB of free heap top
    is kept instead of handed back. A face's arrays (for a writer: a 2.6 MB .obj text, 0.3 MB
    number columns, ~0.5 MB pictures; for a DataLoader worker: the alignment's ~1 MB int32
    passes) then land in pages already mapped, rather than in fresh pages whose first touch costs
    a page fault each (measurements: docs/throughput.md). The process keeps its peak heap (some
    tens of MB). Meant for worker processes.

    Returns:
        True when both settings were made; False where there is no glibc (nothing changed).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BLOCKS_BELOW) & mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_TOP))


_PR_SET_PDEATHSIG = 1


def flush_std_streams() -> None:
    """Flush stdout and stderr, ignoring streams that are gone or closed (before an ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def exit_now(code: int) -> None:
    """End this process with ``code`` without waiting for its child processes: what a CLI does
    once its files are written and its last line printed, when worker processes are still going
    away (their exit, e.g. a CUDA context's release, is then not part of the command's time).
    Flushes the logs and the standard streams and runs multiprocessing's finalizers (its named
    semaphores are released, so its resource tracker has nothing to warn about); no other
    ``atexit`` handler runs. Workers that asked :func:`die_with_parent` get their signal.
    """
    import logging
    import os
    from multiprocessing import util as mp_util

    logging.shutdown()
    flush_std_streams()
    mp_util._run_finalizers(0)  # the finalizers of priority >= 0 (semaphores, queues): what exit runs first
    os._exit(code)


def die_with_parent(sig: int | None = None) -> bool:
    """Ask the kernel to send this process ``sig`` (default SIGKILL) when its parent dies, so a
    worker never outlives a run that was killed with ``kill -9`` (Linux ``prctl``). Call it first
    thing in a child process. If the parent is already gone (re-parented to init), the child exits
    at once.

    Args:
        sig: the signal (None: SIGKILL).

    Returns:
        True when the request took effect; False where ``prctl`` is not available or refused it
        (nothing changed).
    """
    import ctypes
    import ctypes.util
    import os
    import signal

    sig = signal.SIGKILL if sig is None else sig
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    parent = os.getppid()
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(1)
    return True


def exit_with(pid: int) -> None:
    """End this process (``os._exit``) as soon as process ``pid`` ends, even by ``kill -9``: for
    a worker whose parent is not the process it works for, where :func:`die_with_parent` cannot
    help. A forkserver's children (writer processes) are such workers: the forkserver outlives the
    run while they live (each holds its 'alive' pipe), and they would wait forever on a task
    queue whose other end they hold themselves. A daemon thread waits on a pidfd (Linux >= 5.3),
    else checks every half second. Call it first thing in the worker.

    Args:
        pid: the process whose end ends this one (exits at once when it is already gone).
    """
    import os
    import threading

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here
        fd = None

    def watch() -> None:
        if fd is not None:
            import select

            select.select([fd], [], [])  # readable once the process has ended
        else:
            import time

            from util.atomic_files import pid_alive

            while pid_alive(pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def _bound_socket_paths() -> set[str] | None:
    """The paths of the Unix sockets that some process has bound (Linux), or None where unknown."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    return {parts[7] for parts in (row.split() for row in rows) if len(parts) >= 8}


def remove_dead_socket_folders(tmp: str | None = None) -> list[str]:
    """Remove the ``pymp-*`` folders that killed runs' forkservers left behind.

    Args:
        tmp: the temporary folder to look in (default :func:`tempfile.gettempdir`).

    Returns:
        the folders removed: those of this user that hold only ``listener-*`` socket files which
        no process has bound. Nothing is removed where bound sockets cannot be listed (not Linux),
        nor any folder with anything else in it, nor another user's.
    """
    tmp = tmp or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith("pymp-")]
    except OSError:
        return []
    bound = _bound_socket_paths() if names else None
    removed = []
    for name in names if bound is not None else []:
        folder = os.path.join(tmp, name)
        try:
            entries = os.listdir(folder)
            if os.lstat(folder).st_uid != os.getuid() or not entries:
                continue
            paths = [os.path.join(folder, e) for e in entries]
            if not all(e.startswith("listener-") for e in entries) or any(p in bound for p in paths):
                continue
            for p in paths:
                os.remove(p)
            os.rmdir(folder)
            removed.append(folder)
        except OSError:
            continue
    return removed
