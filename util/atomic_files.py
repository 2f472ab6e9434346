"""Files that are whole or absent: one temporary-name scheme for every writer of the project.

Every output (detection files, reports, result pictures, meshes, .mat files) is written to a
temporary name in its final folder and renamed into place: the rename is the only step another
program can see. Temporary names carry this project's own prefix, the writing process's id and a
random part, so two runs writing into the same folder never share one, and a later run can prove
that a leftover is ours and that its writer is gone before it deletes it::

    .d3dfr-<pid>-<8 hex>.<final name>.part

:func:`stale_temp_files` finds only such names whose pid is no longer alive; files of any other
name (a user's ``.tmp_mine.txt``, another program's temporaries) are never touched.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from typing import Callable, IO

PREFIX = ".d3dfr-"
SUFFIX = ".part"
_TEMP_RE = re.compile(r"^\.d3dfr-(\d+)-[0-9a-f]{8}\..*\.part$", re.DOTALL)


def temp_path(path: str) -> str:
    """A temporary name beside ``path``, unique to this process and call (nothing is created).

    Args:
        path: the file to be written.

    Returns:
        ``<folder of path>/.d3dfr-<pid>-<8 hex digits>.<name>.part``.
    """
    d, name = os.path.split(path)
    return os.path.join(d, f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.{name}{SUFFIX}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_atomic(path: str, write: Callable[[IO[bytes]], None], mode: int = 0o666) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file is created with ``mode`` filtered by the process's umask (like ``open``), so outputs
    follow the user's umask. On any failure (disk full, permissions, an exception in ``write``,
    Ctrl-C) the temporary file is removed and the exception propagates; ``path`` is then
    untouched (absent or its old content).

    Args:
        path: the file to write (its folder must exist).
        write: called once with the temporary file, opened for binary writing.
        mode: permission bits before the umask.

    Raises:
        OSError: the temporary file cannot be created, written or renamed; and whatever ``write`` raises.
    """
    tmp = temp_path(path)  # this process's own name (pid and a random token): safe to remove
    try:  # the open inside: a Ctrl-C right after it must not leave the temporary file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_files_atomic(files: list[tuple[str, list]]) -> None:
    """Write each (path, bytes-like chunks) to a temporary name of this process beside it, then
    rename them all into place: the renames are the only visible steps. On any failure (disk full,
    Ctrl-C, ...) the temporary files and the files already renamed are removed and the exception
    propagates: all of them are there, or none. Files follow the umask, as with :func:`write_atomic`.

    Args:
        files: (path, chunks) pairs; chunks is an iterable of bytes-like objects (bytes, bytearray,
            memoryview, contiguous numpy arrays), written one after another. Folders must exist.

    Raises:
        OSError: a file cannot be created, written or renamed (nothing of the set is left).
    """
    temps: list[str] = []
    placed: list[str] = []
    try:
        for path, chunks in files:
            temps.append(temp_path(path))
            with open(os.open(temps[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
                for c in chunks:
                    fh.write(c)
        for (path, _), tmp in zip(files, temps):
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for p in temps[len(placed):] + placed:
            _remove_quietly(p)
        raise


def write_bytes_atomic(path: str, data: bytes | list[bytes]) -> None:
    """Write one file of bytes, complete or absent (:func:`write_files_atomic`).

    Args:
        path: the file (its folder must exist).
        data: bytes-like, or a list of bytes-like chunks.

    Raises:
        OSError: as :func:`write_files_atomic`.
    """
    write_files_atomic([(path, [data] if isinstance(data, (bytes, bytearray, memoryview)) else data)])


def temp_owner(name: str) -> int | None:
    """Who wrote one of our temporary files.

    Args:
        name: a file name without folders.

    Returns:
        The pid in a name of :func:`temp_path`'s form, or None when ``name`` is not one of ours.
    """
    m = _TEMP_RE.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine).

    Args:
        pid: a process id; <= 0 is never alive.

    Returns:
        True when it exists, also when owned by another user (``kill(pid, 0)`` gives EPERM).
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def stale_temp_files(folder: str, recursive: bool = False) -> list[str]:
    """Our temporary files in ``folder`` whose writing process is gone (safe to delete).

    Args:
        folder: where to look; a missing folder has none.
        recursive: also in its sub-folders.

    Returns:
        Their paths (never this process's own).
    """
    out = []
    if not os.path.isdir(folder):
        return out
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for d, _, files in walker:
        for f in files:
            pid = temp_owner(f)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                out.append(os.path.join(d, f))
    return out


def remove_stale_temp_files(folder: str, recursive: bool = False) -> int:
    """Delete :func:`stale_temp_files` (those that cannot be removed are left, quietly).

    Args:
        folder: where to look.
        recursive: also in its sub-folders.

    Returns:
        How many were removed.
    """
    n = 0
    for p in stale_temp_files(folder, recursive):
        try:
            os.remove(p)
            n += 1
        except OSError:
            pass
    return n
