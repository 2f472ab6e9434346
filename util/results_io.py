"""Writing each face's results (.png, .obj, .mat), in the main process or in writer processes.

The main process turns a batch into :class:`FaceResult` payloads (numpy arrays only) and hands
them to a :class:`ResultWriter`, which writes them either in the calling thread (``workers=0``)
or in a pool of writer *processes*: formatting a mesh and encoding a PNG are CPU-bound Python and
numpy work that threads cannot spread over cores (the GIL). The pool uses the ``forkserver``
start method where it exists (else ``spawn``), never ``fork``: the main process holds a CUDA
context. At most ``max_pending`` faces are in flight; a full pipeline waits for the oldest
writes, so memory stays flat however many photos a folder holds.

What travels to a writer is the minimum, in bytes where the file holds bytes: the picture's
float work (render over crop, tensor2im's conversion) is done on the device, batched, before the
copy to the host (``pipeline.render.overlay_uint8``: the same pixels, see util.visualize), so a
face pickles as vertices float32, colours, crop and overlay uint8; the writer only copies the
panels, draws the landmarks and encodes.

The .png is encoded by :func:`util.png.png_chunks`: every row 'Up'-filtered with one numpy
subtraction, then one zlib stream at level 1 (Pillow tries all five filters per row, which costs
more than the compression itself; pixels identical, figures in docs/throughput.md).

This module imports only numpy and zlib (and util helpers that do the same; the .mat is written
by :mod:`util.mat5`, without scipy), so a writer process starts in a fraction of a second. A
face's files are written to temporary names of the writing process
(:func:`util.atomic_files.temp_path`: two runs sharing a results folder never collide) and
renamed into place together: a face is complete or absent, never half written, and a write that
fails is a failed face with its reason. A disk that is full or read-only ends the
run (:class:`RunStop`) rather than failing every face in turn. Writer processes keep freed
memory for reuse (:func:`keep_freed_memory`) instead of handing it back to the system between
faces: the first touch of each fresh page costs a page fault (docs/throughput.md).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import signal
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from util.atomic_files import write_files_atomic as write_together  # a face's files: all or none
from util.png import png_chunks
from util.subprocesses import die_with_parent, exit_with, keep_freed_memory, main_module_hidden

if TYPE_CHECKING:
    from util.output_extras import OutputExtras

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutputConfig:
    """What to write and where; shared by every face of a run (sent once to each writer process).

    Attributes:
        out_dir: the results folder.
        files: the writers of the run's outputs, in order (the enabled entries of the registry,
            :mod:`pipeline.outputs`): each ``files(cfg, res, base) -> [(path, bytes-like chunks)]`` for
            the face ``res`` whose files start with ``base`` (``<out_dir>/<rel_dir>/<name>``);
            module-level functions that import no torch (writer processes import them by name).
        coeff_slices: (name, start, stop) of the 257 coefficients (``COEFFS.slices()``), the .mat keys.
        face_lines: the .obj triangle lines (:func:`util.mesh_io.face_lines`), formatted once per run.
        crop_size: side of the aligned crop in pixels (2 * center), to flip landmarks to y down.
        camera_d: camera distance; world z = camera_d - camera z.
        extras: mesh formats, UV texture, report files (:mod:`util.output_extras`), or None.
    """

    out_dir: str
    files: tuple[Callable[["OutputConfig", "FaceResult", str], list], ...] = ()
    coeff_slices: tuple[tuple[str, int, int], ...] = ()
    face_lines: bytes = b""
    crop_size: int = 224
    camera_d: float = 10.0
    extras: "OutputExtras | None" = None  # mesh formats, UV texture, report files (util.output_extras)


@dataclass
class FaceResult:
    """One face's results, as numpy arrays (only those the output switches need; None otherwise).

    Attributes:
        name: output file stem.
        rel_dir: sub-folder of the results folder ('' at top level).
        coeffs: (257,) float32.
        lm68: (68, 2) float32 predicted landmarks, crop pixels, **y up**.
        vertex: (N, 3) float32 camera space.
        color: (N, 3) uint8 vertex colours (``colors_to_uint8``).
        image: (3, H, W) uint8 aligned crop.
        overlay: (H, W, 3) uint8, the picture's middle panel (:func:`util.visualize.overlay_uint8`:
            the render's bytes where it covers the crop).
        lm_gt: (K, 2) detected landmarks in the crop, y up.
        arrays: further per-face arrays that outputs made on the device (the registry's ``make``:
            ``visibility`` (N,) uint8 and ``albedo`` (N, 3) uint8 for the UV texture, ``photo_error``
            float32 for the report).
    """

    name: str
    rel_dir: str = ""
    coeffs: np.ndarray | None = None
    lm68: np.ndarray | None = None
    vertex: np.ndarray | None = None
    color: np.ndarray | None = None
    image: np.ndarray | None = None
    overlay: np.ndarray | None = None
    lm_gt: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- one face
def mat_dict(cfg: OutputConfig, res: FaceResult) -> dict[str, np.ndarray]:
    """The .mat content, as the original writes it.

    Args:
        cfg: the run's settings (``coeff_slices``, ``crop_size``).
        res: the face (``coeffs`` and ``lm68`` needed).

    Returns:
        Each coefficient group as (1, n) float32 (``id``, ``exp``, ``tex``, ``angle``, ``gamma``,
        ``trans``) and ``lm68`` (1, 68, 2) in crop pixels, y down (``crop_size - 1 - y``).
    """
    out = {name: res.coeffs[None, start:stop] for name, start, stop in cfg.coeff_slices}
    lm = res.lm68[None]
    out["lm68"] = np.stack([lm[:, :, 0], cfg.crop_size - 1 - lm[:, :, 1]], axis=2)
    return out


def result_picture(res: FaceResult) -> np.ndarray:
    """The result picture of one face (see :mod:`util.visualize`).

    Args:
        res: the face (``image``, ``overlay``, ``lm68``; ``lm_gt`` drawn too when given).

    Returns:
        (H, 3W, 3) uint8 RGB: input | render overlay | overlay with landmarks.
    """
    from util.visualize import compose_picture

    return compose_picture(res.image.transpose(1, 2, 0)[None], res.overlay[None], res.lm68[None],
                           None if res.lm_gt is None else res.lm_gt[None])[0]


class RunStop(str):
    """A failed write that ends the run: the reason (this string) and ``face_bytes``, what the
    face's files needed. Every later face would fail alike (the results' filesystem is full or
    read-only, the results folder not writable), so the run stops instead of failing each face.

    Args:
        reason: the one-line message (the string's value).
        face_bytes: about how many bytes the face's files needed (0: unknown).
    """

    face_bytes: int = 0

    def __new__(cls, reason: str, face_bytes: int = 0):
        obj = super().__new__(cls, reason)
        obj.face_bytes = face_bytes
        return obj

    def __reduce__(self):  # crosses from writer processes (a str subclass with a field)
        return RunStop, (str(self), self.face_bytes)


# errors after which no other face can be written either (EACCES/EPERM: only on the results folder itself)
_FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_FOLDER_ERRNOS = {errno.EACCES, errno.EPERM}


def human_bytes(n: float) -> str:
    """A byte count for a message, in powers of 1000: ``'512 bytes'``, ``'1.5 MB'``, at most GB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # not reached


def free_bytes(folder: str) -> int | None:
    """Bytes available to this user on ``folder``'s filesystem, or None where ``statvfs`` fails."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


class NotFiniteError(ValueError):
    """A face's numbers are NaN or inf (broken weights or input): no file of it would be right."""


def check_finite(res: FaceResult) -> None:
    """Check a face's numbers before any file of it is made.

    Args:
        res: the face (``coeffs``, ``lm68``, ``vertex`` are checked where present).

    Raises:
        NotFiniteError: one of them holds NaN or inf.
    """
    for key in ("coeffs", "lm68", "vertex"):
        a = getattr(res, key)
        if a is not None and not np.isfinite(a).all():
            raise NotFiniteError(f"the reconstruction is not finite (NaN or inf in its {key}): the checkpoint's "
                                 "weights or this photo's detection are broken")


def world_vertices(cfg: OutputConfig, res: FaceResult) -> np.ndarray:
    """The face's vertices in world (model) space, for meshes on disk.

    Args:
        cfg: the run's settings (``camera_d``).
        res: the face (``vertex`` (N, 3) camera space needed).

    Returns:
        (N, 3) float32 copy: x, y unchanged, world z = camera_d - camera z.
    """
    world = res.vertex.copy()
    world[:, 2] = cfg.camera_d - world[:, 2]  # camera space -> world space
    return world


def png_files(cfg: OutputConfig, res: FaceResult, base: str) -> list[tuple[str, list]]:
    """``<base>.png``: the result picture (input | render overlay | overlay with landmarks).

    Args:
        cfg: the run's settings (unused; every writer of :attr:`OutputConfig.files` takes it).
        res: the face (as :func:`result_picture`).
        base: the face's path without suffix.

    Returns:
        [(``<base>.png``, PNG byte chunks)].
    """
    return [(base + ".png", png_chunks(result_picture(res)))]


def obj_files(cfg: OutputConfig, res: FaceResult, base: str) -> list[tuple[str, list]]:
    """``<base>.obj``: the world-space mesh with vertex colours (the original's format).

    Args:
        cfg: the run's settings (``camera_d``, ``face_lines``).
        res: the face (``vertex``, ``color``).
        base: the face's path without suffix.

    Returns:
        [(``<base>.obj``, byte chunks)].

    Raises:
        ValueError: a vertex coordinate is not finite.
    """
    from util.mesh_io import obj_chunks

    return [(base + ".obj", obj_chunks(world_vertices(cfg, res), cfg.face_lines, res.color))]


def mat_files(cfg: OutputConfig, res: FaceResult, base: str) -> list[tuple[str, list]]:
    """``<base>.mat``: the coefficient groups and the 68 landmarks (:func:`mat_dict`), MATLAB 5 format.

    Args:
        cfg: the run's settings.
        res: the face (``coeffs``, ``lm68``).
        base: the face's path without suffix.

    Returns:
        [(``<base>.mat``, [the file's bytes])].
    """
    from util.mat5 import mat5_bytes  # savemat's bytes without importing scipy (util/mat5.py)

    return [(base + ".mat", [mat5_bytes(mat_dict(cfg, res))])]


def face_files(cfg: OutputConfig, res: FaceResult, base: str) -> list[tuple[str, list]]:
    """(path, bytes-like chunks) of every file of the face that ``cfg.files`` makes.

    Args:
        cfg: the run's settings.
        res: the face.
        base: the face's path without suffix (``<out_dir>/<rel_dir>/<name>``).

    Returns:
        The files, in ``cfg.files``' order.

    Raises:
        NotFiniteError: the face holds non-finite numbers (no file of it would be right).
    """
    check_finite(res)
    return [f for files in cfg.files for f in files(cfg, res, base)]


def _stop_reason(cfg: OutputConfig, d: str, res: FaceResult, err: OSError, size: int) -> RunStop | None:
    """The :class:`RunStop` for ``err`` (writing ``res``'s ``size`` bytes into ``d``), or None
    when only this face is concerned."""
    what = f"writing {res.name}'s files ({human_bytes(size)}) into {os.path.normpath(d)} failed: {err.strerror}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(d)
        left = "" if free is None else f", {human_bytes(free)} free there"
        return RunStop(f"the results' disk is full: {what}{left}", size)
    if err.errno == errno.EROFS:
        return RunStop(f"the results folder is on a read-only filesystem: {what}", size)
    if err.errno in _FOLDER_ERRNOS and os.path.normpath(d) == os.path.normpath(cfg.out_dir):
        return RunStop(f"the results folder is not writable: {what}", size)
    return None


def write_face_result(cfg: OutputConfig, res: FaceResult) -> None:
    """Write one face's files (:func:`face_files`), all or none of them
    (:func:`util.atomic_files.write_files_atomic`), creating its sub-folder where needed.

    Args:
        cfg: the run's settings.
        res: the face.

    Raises:
        NotFiniteError: the face holds non-finite numbers.
        OSError: a file could not be written.
    """
    d = os.path.join(cfg.out_dir, res.rel_dir)
    files = face_files(cfg, res, os.path.join(d, res.name))
    os.makedirs(d, exist_ok=True)
    write_together(files)


def _face_bytes(cfg: OutputConfig, res: FaceResult) -> int:
    """About how many bytes the face's files take (all those the run writes), for the disk-full
    message; 0 when they cannot be made."""
    try:
        return sum(memoryview(c).nbytes for _, chunks in face_files(cfg, res, "") for c in chunks)
    except Exception:  # noqa: BLE001 - only for the message
        return 0


def write_results(cfg: OutputConfig, results: list[FaceResult]) -> list[tuple[str, str | None]]:
    """Write several faces; never raises for a face's failure.

    Args:
        cfg: the run's settings.
        results: the faces, written in order.

    Returns:
        (name, None) per success and (name, reason) per failure, in order. A failure that every
        later face would share (disk full, read-only) ends the list with (name, :class:`RunStop`)
        and leaves the remaining faces unwritten and out of the list.
    """
    out: list[tuple[str, str | None]] = []
    for res in results:
        try:
            write_face_result(cfg, res)
            out.append((res.name, None))
        except OSError as e:
            stop = _stop_reason(cfg, os.path.join(cfg.out_dir, res.rel_dir), res, e, _face_bytes(cfg, res))
            if stop is not None:
                out.append((res.name, stop))
                break
            out.append((res.name, f"writing results failed: {e}"))
        except NotFiniteError as e:
            out.append((res.name, f"reconstruction failed: {e}"))
        except Exception as e:  # noqa: BLE001 - a bad face (non-finite numbers, ...): reported, the others go on
            out.append((res.name, f"writing results failed: {type(e).__name__}: {e}"))
    return out


# --------------------------------------------------------------------------- writer processes
_WORKER_CFG: OutputConfig | None = None


# what a writer process imports; a forkserver imports them once for all writers
WRITER_MODULES = ("util.results_io", "util.mesh_io", "util.visualize", "util.preprocess", "util.output_extras")


def _init_worker(cfg: OutputConfig, run_pid: int) -> None:
    """Writer process set-up: it ends with the run's process ``run_pid`` (even killed with
    ``kill -9``: :func:`util.subprocesses.exit_with`; its parent is a forkserver); Ctrl-C is the
    main process's business (it lets running writes finish, so no file is left half written);
    freed memory is kept for the next face; the writers are imported now, not on the first face."""
    import importlib

    global _WORKER_CFG
    die_with_parent()  # a forkserver's child
    exit_with(run_pid)  # the forkserver exits only once its children have
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    _WORKER_CFG = cfg
    for name in WRITER_MODULES:
        importlib.import_module(name)


def _write_in_worker(results: list[FaceResult]) -> list[tuple[str, str | None]]:
    return write_results(_WORKER_CFG, results)


def _ready() -> int:
    return os.getpid()


def process_context():
    """The multiprocessing context for worker processes.

    Returns:
        ``forkserver``'s where available (Linux, macOS), else ``spawn``'s; never ``fork`` (CUDA).
    """
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def writer_context():
    """:func:`process_context` for writer processes: a forkserver is told to import
    :data:`WRITER_MODULES` once, so that each writer is a cheap fork of it, and
    :mod:`util.forkserver_cleanup`, so that a killed run leaves no socket folder behind.

    Returns:
        The multiprocessing context (preloads set on a forkserver context).
    """
    ctx = process_context()
    if ctx.get_start_method() == "forkserver":  # and the clean-up of its socket folder when it exits
        ctx.set_forkserver_preload([*WRITER_MODULES, "util.forkserver_cleanup"])
    return ctx


def launch_writer_server() -> None:
    """Start the forkserver that writer processes fork from, without waiting for it: it imports
    :data:`WRITER_MODULES` while the caller goes on (e.g. loads the model), instead of
    while :meth:`ResultWriter.start` waits. Nothing to do where writers are spawned."""
    if writer_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class ResultWriter:
    """Write :class:`FaceResult` lists in ``workers`` processes (0: in the calling thread).

    ``submit`` queues faces (split into chunks, one task each) and returns the outcomes that are
    already known; ``finish`` waits for all and returns the rest. Outcomes come in submission
    order as ``(name, None)`` or ``(name, reason)``. At most ``max_pending`` faces are in flight:
    beyond that, ``submit`` waits for the oldest. If a writer process dies (killed, out of
    memory), its faces and all later ones are written in the calling thread instead.

    Args:
        cfg: the run's settings, sent once to each writer process.
        workers: the number of writer processes (0: write in the calling thread).
        max_pending: faces in flight at most (>= 1).
        chunk: faces per task at most (>= 1).
    """

    def __init__(self, cfg: OutputConfig, workers: int = 0, max_pending: int = 64, chunk: int = 4):
        self.cfg, self.chunk = cfg, max(1, chunk)
        self.max_pending = max(1, max_pending)
        self._pending: deque[tuple[list[FaceResult], Future]] = deque()
        self._n_pending = 0
        self._pool = None
        self.gave_up = False  # a writer process died (it may have left a temporary file)
        if workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(workers, mp_context=writer_context(), initializer=_init_worker,
                                             initargs=(cfg, os.getpid()))
            self.workers = workers
        else:
            self.workers = 0

    def start(self) -> None:
        """Start every writer process now (each ``submit`` would otherwise start one lazily)."""
        if self._pool is not None:
            try:
                with main_module_hidden():  # the processes start here (see main_module_hidden)
                    for _ in range(self.workers):
                        self._pool.submit(_ready)
            except Exception as e:  # noqa: BLE001 - no processes here (sandbox, limits): write in-thread
                self._give_up_pool(e)

    def submit(self, results: list[FaceResult]) -> list[tuple[str, str | None]]:
        """Queue faces for writing (may wait for the oldest when ``max_pending`` would be exceeded).

        Args:
            results: the faces.

        Returns:
            The outcomes already known, in submission order: (name, None) or (name, reason), a
            :class:`RunStop` reason for a failure that ends the run.
        """
        done: list[tuple[str, str | None]] = []
        if self._pool is None:  # in-thread (from the start, or since a writer process died)
            return self._drain(0) + write_results(self.cfg, results)
        size = max(1, min(self.chunk, math.ceil(len(results) / self.workers)))
        for i in range(0, len(results), size):
            part = results[i:i + size]
            done += self._drain(self.max_pending - len(part))
            self._pending.append((part, self._submit(part)))
            self._n_pending += len(part)
        return done + self._drain(self.max_pending, block=False)

    def finish(self) -> list[tuple[str, str | None]]:
        """Wait for every queued face; shut the writer processes down.

        Returns:
            The outcomes not returned yet, in submission order.
        """
        try:
            return self._drain(0)
        finally:
            self.close()

    def abort(self) -> list[tuple[str, str | None]]:
        """Stop: queued faces are dropped, those being written finish; returns the outcomes of
        the faces that were written (or failed) by then."""
        self.close(cancel=True)
        done: list[tuple[str, str | None]] = []
        while self._pending:
            part, fut = self._pending.popleft()
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                done += fut.result()
        self._n_pending = 0
        return done

    def close(self, cancel: bool = False) -> None:
        """Shut the writer processes down, waiting for running tasks; ``cancel`` drops queued ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    # -- internals -----------------------------------------------------------------------
    def _submit(self, part: list[FaceResult]) -> Future:
        if self._pool is not None:
            try:
                with main_module_hidden():  # in case a process starts here (start() not called)
                    return self._pool.submit(_write_in_worker, part)
            except Exception as e:  # noqa: BLE001 - broken pool, no processes: write in-thread
                self._give_up_pool(e)
        fut: Future = Future()
        fut.set_result(write_results(self.cfg, part))
        return fut

    def _drain(self, limit: int, block: bool = True) -> list[tuple[str, str | None]]:
        from concurrent.futures import CancelledError
        from concurrent.futures.process import BrokenProcessPool

        done: list[tuple[str, str | None]] = []
        while self._pending and (self._n_pending > limit or (not block and self._pending[0][1].done())):
            part, fut = self._pending.popleft()
            self._n_pending -= len(part)
            try:
                done += fut.result()
            except (BrokenProcessPool, CancelledError) as e:  # a writer process died: write these here
                self._give_up_pool(e)
                done += write_results(self.cfg, part)
            except Exception as e:  # noqa: BLE001 - the task itself failed (its results could not come back, ...)
                done += [(r.name, f"writing results failed: {type(e).__name__}: {e}") for r in part]
        return done

    def _give_up_pool(self, err: Exception) -> None:
        if self._pool is not None:
            self.gave_up = True
            log.warning("a writer process failed (%s); writing the remaining results in the main process", err)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
