"""Starting worker processes without re-running the caller's script.

With the ``forkserver`` and ``spawn`` start methods Python runs the main script's top level again
in every child process (as ``__mp_main__``), so that functions defined there can be unpickled. The
project's workers (writer processes, detection workers) need nothing from the caller's script: their
functions live in importable modules. :func:`main_module_hidden` keeps the script out of them.
"""
from __future__ import annotations

import contextlib
import sys
import types


@contextlib.contextmanager
def main_module_hidden():
    """Hide the caller's ``__main__`` module while worker processes start (wrap the calls that
    start them: ``ProcessPoolExecutor.submit`` with a forkserver/spawn context starts them lazily).

    Without this, a script that imports torch at its top costs every child seconds - 16 writer
    processes on a host with slow imports cost a run about 45 s. (The forkserver's own preloading
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
