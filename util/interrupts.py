"""SIGTERM handled like Ctrl-C.

Batch schedulers (SLURM at a time limit or on preemption), ``kill`` and torchrun's agent stop a
process with SIGTERM, whose default action ends it on the spot: no report, pool processes left
behind. Inside :func:`sigterm_as_interrupt` it raises ``KeyboardInterrupt`` instead, so the
command's Ctrl-C path runs (files finished, report written, workers stopped, exit code 130).
"""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises ``KeyboardInterrupt`` in the main thread while inside; the previous handler
    is restored on leaving. A no-op outside the main thread (Python handles signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
