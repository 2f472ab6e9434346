"""A load cache for .mat files: their arrays beside them in an uncompressed ``.cache.npz``.

Reading a .mat needs scipy, whose ``scipy.io`` import alone costs a fresh process 0.2-0.5 s;
the cache is read with numpy only (and a large one faster than the .mat). It holds the same arrays
(dtype, shape, values; C order; not the .mat's ``__header__`` entries) and is used only while the
.mat keeps the size and modification time it was made from. A cache that cannot be written
(read-only folder) is skipped quietly; a damaged or foreign one is rebuilt.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Callable

import numpy as np

from util.atomic_files import write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: arrays stored in C order (1: as loadmat returns them, Fortran order)


def cache_path(path: str) -> str:
    """The load cache of a .mat: ``BFM_model_front.mat`` -> ``BFM_model_front.cache.npz``.

    Args:
        path: the .mat's path (any extension is replaced).

    Returns:
        The cache's path beside it.
    """
    return os.path.splitext(path)[0] + ".cache.npz"


def source_stamp(path: str) -> np.ndarray:
    """(3,) int64: the .mat's size and modification time, and :data:`CACHE_FORMAT`."""
    st = os.stat(path)
    return np.array([st.st_size, st.st_mtime_ns, CACHE_FORMAT], dtype=np.int64)


def read_cache(path: str) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``path`` if the cache was made from this very file (same size and
    modification time, current format), else None."""
    cache = cache_path(path)
    if not os.path.isfile(cache):
        return None
    try:
        arrays = _read_stored_npz(cache)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign cache is simply rebuilt
        log.debug("ignoring the cache %s (%s)", cache, e)
        return None
    if not np.array_equal(arrays.pop("__source__", None), source_stamp(path)):
        return None
    return arrays


def _read_stored_npz(path: str) -> dict[str, np.ndarray]:
    """np.load of an uncompressed .npz, faster (docs/throughput.md): each member's .npy is read straight from
    the file instead of through zipfile's reader and its checksum."""
    import struct
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"{info.filename}: not a stored .npy member")
            f.seek(info.header_offset)
            head = f.read(30)  # local file header: signature ... name length, extra length
            if head[:4] != b"PK\x03\x04":
                raise ValueError(f"{info.filename}: bad local header")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            out[info.filename[:-len(".npy")]] = np.lib.format.read_array(f, allow_pickle=False)
    return out


def write_cache(path: str, arrays: dict) -> None:
    """Store the arrays of a loaded .mat beside it (uncompressed .npz), atomically; skipped
    quietly where the folder is read-only or an entry is not a plain numeric array.

    Arrays are stored in C order (loadmat's are Fortran order), which float32 buffers use as they
    are read, without a transposing copy. The cache gets the .mat's permissions (within the
    umask), so whoever may read the .mat may read it."""
    arrays = {k: v for k, v in arrays.items() if not k.startswith("__")}
    if not all(isinstance(v, np.ndarray) and v.dtype.kind in "biufc" for v in arrays.values()):
        return

    def write(f) -> None:
        np.savez(f, __source__=source_stamp(path), **{k: np.ascontiguousarray(v) for k, v in arrays.items()})

    try:
        write_atomic(cache_path(path), write, mode=stat.S_IMODE(os.stat(path).st_mode))
    except OSError as e:
        log.debug("not caching %s (%s)", path, e)


def load_cached(path: str, load: Callable[[str], dict], check: Callable[[dict], None] | None = None,
                cache: bool = True) -> dict:
    """The arrays of the .mat ``path``: from its cache when it is current, else ``load(path)``
    (then cached).

    Args:
        path: an existing .mat.
        load: reads the .mat (``scipy.io.loadmat`` with the caller's error message).
        check: raises when the arrays are not what they should be; run on either source, and
            before a cache is written.
        cache: read and write the cache (False: always ``load``).

    Returns:
        The arrays by key (from the cache: without ``__header__``-like entries, in C order).
    """
    arrays = read_cache(path) if cache else None
    from_cache = arrays is not None
    if not from_cache:
        arrays = load(path)
    if check is not None:
        check(arrays)
    if cache and not from_cache:
        write_cache(path, arrays)
    return arrays
