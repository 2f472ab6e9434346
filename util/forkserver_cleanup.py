"""Imported by the writers' forkserver only (one of its preload modules): when the forkserver
exits, it removes its socket and that socket's ``pymp-*`` folder.

Python's forkserver listens on a socket in a folder the *run's* process made
(``multiprocessing.util.get_temp_dir``: ``/tmp/pymp-<random>``) and removes at its normal exit.
When the run is killed (``kill -9``, out of memory) nothing of it runs any more, and the folder
would stay forever. The forkserver notices the run's death (its pipe from the run closes) and
exits normally: this module's exit hook, registered when the forkserver imports it (the one
thing this module does on import, on purpose: a forkserver runs nothing else of ours), removes
the socket and the folder if nothing else is in it. After a normal run the folder is already
gone and the hook does nothing.

In about one killed run in ten a ``pymp-*`` folder still stayed with one ``listener-*`` socket
file that no process had bound (this forkserver's or a DataLoader worker's; the cause was not
found). :func:`util.subprocesses.remove_dead_socket_folders`, run by the next test.py run,
removes such folders: ``pymp-*`` folders of this user in the temporary folder that hold nothing
but ``listener-*`` sockets that no process has bound (Linux's ``/proc/net/unix``).
"""
from __future__ import annotations

import atexit
import os


def remove_socket_folder() -> None:
    """Remove this process's forkserver socket and its ``pymp-*`` folder when it is empty then."""
    from multiprocessing import forkserver

    address = getattr(forkserver._forkserver, "_forkserver_address", None)
    if not isinstance(address, str) or not address or address.startswith("\0"):
        return  # not a forkserver, or an abstract socket (no file)
    folder = os.path.dirname(address)
    try:
        os.remove(address)
        if os.path.basename(folder).startswith("pymp-"):
            os.rmdir(folder)  # only when empty: never removes anything else
    except OSError:
        pass


atexit.register(remove_socket_folder)
