"""Worker processes of the folder engine: their number, their thread limits, their tasks.

Each worker process holds one :class:`detect.analyze.Analyzer` (its detector loaded once), caps
its libraries' threads so that workers x threads <= cores, and dies with the run.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from detect.analyze import Analyzer, load_photo
from detect.settings import Plan, PrepareOptions
from util.prefetch import prefetched
from util.subprocesses import flush_std_streams, main_module_hidden

logger = logging.getLogger(__name__)

_WORKER: dict = {}
# Variables that size the thread pools of OpenMP, BLAS libraries, TensorFlow and torch's inter-op
# pool; set for a worker before it starts, so that every library reads them at its import.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS")


# Batched engines on one GPU: each starts torch and a CUDA context (seconds), so a few engines that
# read their photos with several threads beat one engine per core (one H200, 16 cores, 4032
# photos: 4-6 engines 13.1-14.9 s, 15 engines 16.9-18.7 s; docs/detection_speed.md)
MAX_ENGINES = 6


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(requested: int, n_photos: int, batched: bool = False, cores: int | None = None) -> int:
    """How many worker processes a run starts.

    Args:
        requested: ``--workers`` (> 0), or 0 for auto.
        n_photos: the photos to do (``batched``: the batches).
        batched: count engine processes of the batched engine.
        cores: the usable cores (default :func:`usable_cores`).

    Returns:
        ``requested`` (at most one per photo or batch); auto: one per core, at most one per 4
        photos (a detector process takes seconds to start); batched auto: half the cores less one,
        at most :data:`MAX_ENGINES`, at most one per batch (each engine reads with
        :func:`threads_per_worker` threads). At least 1.
    """
    cores = cores or usable_cores()
    if requested > 0:
        return min(requested, max(1, n_photos))
    if batched:  # n_photos: batches
        return min(MAX_ENGINES, max(1, (cores - 1) // 2), max(1, n_photos))
    return max(1, min(cores, -(-n_photos // 4)))


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """CPU threads each of ``workers`` processes may use: ``cores // workers``, at least 1, so that
    workers x threads <= cores (``cores`` default :func:`usable_cores`)."""
    return max(1, (cores or usable_cores()) // max(1, workers))


@contextlib.contextmanager
def thread_limits_in_environment(threads: int):
    """Set :data:`THREAD_VARIABLES` to ``threads`` while worker processes start (they inherit
    the environment, and their libraries read it at import), then restore the parent's."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def limit_threads(threads: int) -> None:
    """Cap this process's torch and OpenCV threads (OpenMP and BLAS read the environment set by
    :func:`thread_limits_in_environment`; TensorFlow gets ``threads`` from the Analyzer)."""
    import sys

    if "torch" in sys.modules:  # not imported for it: a TensorFlow worker has no use for torch
        sys.modules["torch"].set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:  # pragma: no cover - opencv is a requirement
        pass


def thread_limits() -> dict:
    """This process's thread settings, as :func:`limit_threads` left them (read back by tests)."""
    import torch

    out = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    out["torch"] = torch.get_num_threads()
    try:
        import cv2

        out["cv2"] = cv2.getNumThreads()
    except ImportError:  # pragma: no cover
        pass
    return out


def _worker_init(folder: str, options: PrepareOptions, min_score: float, threads: int) -> None:
    from util.subprocesses import die_with_parent

    die_with_parent()  # a worker never outlives a killed run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    try:
        limit_threads(threads)
        _WORKER["analyzer"] = Analyzer(folder, options, min_score, threads=threads)
    except BaseException as e:  # reported by the first task, in the parent
        _WORKER["error"] = e
    atexit.register(_leave_at_once)  # registered last, so run first at the worker's exit


def _leave_at_once() -> None:
    """A worker's exit without the interpreter's teardown: its results are all sent (the pool's
    result queue writes synchronously; an engine's task waits for its results queue to be
    flushed) and it writes no file, while tearing down TensorFlow's or torch's and CUDA's state
    took 1.5-2.5 s during which the run waited for it (docs/detection_speed.md)."""
    flush_std_streams()
    os._exit(0)


def _worker_analyse(rel: str) -> dict:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["analyzer"].analyse(rel)


def _worker_thread_limits(_=None) -> dict:
    """A pool task: the worker's :func:`thread_limits` and its parent-death signal (for tests)."""
    import ctypes
    import ctypes.util

    out = thread_limits()
    sig = ctypes.c_int(-1)
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(2, ctypes.byref(sig), 0, 0, 0)  # GET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    out["pdeathsig"] = sig.value
    return out


def load_batch(folder: str, options: PrepareOptions, settings: dict, rels: list[str],
               readers: cf.Executor | None = None) -> list[dict]:
    """:func:`detect.analyze.load_photo` on each photo of a batch (full photos kept when the
    options need them: 68 points, debug pictures), in order; ``readers``: threads that read them
    (decoding and shrinking release the GIL)."""
    keep_full = options.landmarks68 or options.debug_vis

    def load(rel: str) -> dict:
        return load_photo(folder, rel, settings, options.max_side, keep_full)

    return list(readers.map(load, rels)) if readers is not None else [load(rel) for rel in rels]


def analyse_chunk(analyzer: Analyzer, rels: list[str]) -> list[dict]:
    """Load a batch of photos and detect them in one call (:meth:`Analyzer.analyse_batch`)."""
    return analyzer.analyse_batch(load_batch(analyzer.folder, analyzer.options, analyzer.settings, rels))


def _engine_init(folder: str, options: PrepareOptions, min_score: float, threads: int, batches: list,
                 claimed, results) -> None:
    """A batched engine's start: only what reading photos needs; the detector (CUDA, the
    networks) is made by :func:`_engine_task` while its first batch is read."""
    from util.subprocesses import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)  # OpenCV's, for the reading thread; torch's once it is imported
    _WORKER.update(run=(folder, options, min_score), threads=threads, batches=batches, claimed=claimed,
                   results=results)
    atexit.register(_leave_at_once)


def _stopping(claimed, batches: int) -> bool:
    """Whether :meth:`StartedEngines.stop` has set the shared count of a run of ``batches``
    batches past the end (a run that simply ran out of batches leaves it at ``batches``): the run
    wants no more results."""
    return claimed.value > batches


def _claim_batch() -> list[str] | None:
    """The next batch no engine has taken yet (a counter shared by the engines), None when none is
    left or the run is stopping (:meth:`StartedEngines.stop` sets the counter past the end)."""
    batches, claimed = _WORKER["batches"], _WORKER["claimed"]
    with claimed.get_lock():
        i = claimed.value
        if i >= len(batches):
            return None
        claimed.value = i + 1
    return batches[i]


def _engine_task(_=None) -> int:
    """A batched engine's one task: take batches from the run's list until none is left, each read
    by a thread one batch ahead of the detector (the first one while torch, CUDA and the networks
    load; with ``threads`` > 1, that many threads read the photos of a batch), detected in one call
    and its results put on the run's queue. Returns the batches done."""
    folder, options, min_score = _WORKER["run"]
    batches, claimed, results = _WORKER["batches"], _WORKER["claimed"], _WORKER["results"]
    settings = options.settings(min_score)
    threads = _WORKER["threads"]
    readers = cf.ThreadPoolExecutor(threads, thread_name_prefix="read-photo") if threads > 1 else None
    photos = prefetched(iter(_claim_batch, None), lambda rels: load_batch(folder, options, settings, rels, readers),
                        depth=1, name="read-photos")
    done = 0
    try:
        analyzer = Analyzer(folder, options, min_score, threads=threads)
        limit_threads(threads)
        for batch in photos:
            if _stopping(claimed, len(batches)):
                break
            results.put(analyzer.analyse_batch(batch))
            done += 1
    finally:
        photos.close()
        if readers is not None:
            readers.shutdown(wait=False, cancel_futures=True)
    if _stopping(claimed, len(batches)):
        results.cancel_join_thread()
    else:
        results.close()
        results.join_thread()  # every result in the pipe before the task says it is done
    return done


@dataclass
class StartedWorkers:
    """Worker processes started on their tasks (:func:`start_workers`); their results are
    collected with :meth:`collect` and the processes ended with :meth:`stop`.

    Attributes:
        pool: the process pool; futures: one per task, in task order; workers: the processes;
        started: ``time.perf_counter()`` when they were started.
    """

    pool: cf.ProcessPoolExecutor
    futures: list
    workers: int
    started: float = field(default_factory=time.perf_counter)

    def collect(self, accept) -> None:
        """``accept(result)`` for each photo's result (tasks that return lists give several), in
        the order the tasks finish. Raises the first task's exception (a worker that could not
        start raises its start-up error here)."""
        first = True
        for fut in cf.as_completed(self.futures):
            result = fut.result()
            if first:
                logger.info("first task done %.2f s after the %d worker(s) were started",
                            time.perf_counter() - self.started, self.workers)
                first = False
            for r in result if isinstance(result, list) else [result]:
                accept(r)
        logger.info("all %d tasks done %.2f s after the start", len(self.futures), time.perf_counter() - self.started)

    def finished(self) -> bool:
        """Whether every task's result is in."""
        return all(f.done() for f in self.futures)

    def stop(self, wait: bool = True) -> bool:
        """Cancel the tasks not begun and end the processes.

        Args:
            wait: wait for the processes to end. False: when every task is done, ask them to end
                and return at once (the caller then leaves with
                :func:`util.subprocesses.exit_now`; 15 CUDA engines take about 1.1 s to go,
                most of it the driver releasing their contexts: docs/detection_speed.md).

        Returns:
            True when the processes have ended; False when they were left ending on their own.
        """
        t0 = time.perf_counter()
        if not wait and self.finished():
            self.pool.shutdown(wait=False, cancel_futures=True)
            logger.info("%d worker(s) asked to end; not waited for", self.workers)
            return False
        self.pool.shutdown(wait=True, cancel_futures=True)
        logger.info("%d worker(s) ended in %.2f s", self.workers, time.perf_counter() - t0)
        return True


@dataclass
class StartedEngines(StartedWorkers):
    """Batched engines started on a run's batches (:func:`start_engines`): each engine runs one
    task that takes batches from the shared list and puts each batch's results on ``results``.

    Attributes (besides :class:`StartedWorkers`'): batches: how many batches the run has;
    claimed: the shared count of batches taken; results: the queue of the batches' result lists;
    got: the batches :meth:`collect` handed on; dropped: those :meth:`stop` read and dropped.
    """

    batches: int = 0
    claimed: Any = None
    results: Any = None
    got: int = 0
    dropped: int = 0

    def finished(self) -> bool:
        """Whether every batch's results are in (the engines are then leaving)."""
        return self.got == self.batches

    def _raise_failure(self) -> None:
        """Raise the first engine's exception (one that could not start raises its start-up
        error; a killed one, BrokenProcessPool); RuntimeError when every engine ended with
        batches unreported."""
        if not any(f.done() for f in self.futures):
            return
        for f in self.futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        if all(f.done() for f in self.futures) and self.results.empty():
            raise RuntimeError("the detection engines ended with batches not done")

    def collect(self, accept) -> None:
        """``accept(result)`` for each photo's result, batch by batch as the engines finish them."""
        while self.got < self.batches:
            try:
                results = self.results.get(timeout=0.2)
            except queue.Empty:
                self._raise_failure()
                continue
            if self.got == 0:
                logger.info("first batch done %.2f s after the %d engine(s) were started",
                            time.perf_counter() - self.started, self.workers)
            for r in results:
                accept(r)
            self.got += 1
            if self.got < self.batches:
                self._raise_failure()
        logger.info("all %d batches done %.2f s after the start", self.batches, time.perf_counter() - self.started)

    def stop(self, wait: bool = True) -> bool:
        """As :meth:`StartedWorkers.stop`; the engines take no batch more and drop those they have
        read, and results still coming are read and dropped while the processes end."""
        if self.finished() and not wait:
            return super().stop(wait=False)
        if not self.finished():
            with self.claimed.get_lock():
                self.claimed.value = self.batches + 1  # past the end: see _stopping
        ended = threading.Event()

        def drain() -> None:  # an engine's last put must not wait on a full pipe nobody reads
            while not ended.is_set():
                try:
                    self.results.get(timeout=0.1)
                except (queue.Empty, OSError, ValueError, EOFError):
                    continue
                self.dropped += 1

        drainer = threading.Thread(target=drain, name="drain-results", daemon=True)
        drainer.start()
        try:
            return super().stop(wait=True)
        finally:
            ended.set()
            drainer.join()


def start_engines(plan: Plan, batches: list[list[str]], workers: int) -> StartedEngines:
    """Start ``workers`` batched engine processes on ``batches`` (lists of photos): each makes its
    detector while a thread reads its first batch, then detects batch after batch
    (:func:`_engine_task`); :meth:`StartedEngines.collect` gets the results as they come.

    Returns:
        the started engines; the caller must :meth:`~StartedEngines.stop` them (also on errors).
    """
    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    claimed, results = ctx.Value("l", 0), ctx.Queue()
    return _start_pool(plan, [None] * workers, _engine_task, workers, _engine_init, (batches, claimed, results),
                       lambda pool: StartedEngines(pool, [], workers, batches=len(batches), claimed=claimed,
                                                   results=results))


def start_workers(plan: Plan, tasks: list, task, workers: int) -> StartedWorkers:
    """Start ``workers`` processes, each with its own detector (:class:`detect.analyze.Analyzer`)
    and :func:`threads_per_worker` threads, and hand them ``tasks`` (run with ``task``) at once.

    Args:
        plan: the run (folder, options, min_score are passed to each worker).
        tasks: picklable task arguments (a photo, or a batch of photos).
        task: a module-level function of this module run on each task in a worker.
        workers: the number of processes (>= 1).

    Returns:
        the started workers; the caller must :meth:`~StartedWorkers.stop` them (also on errors).
    """
    return _start_pool(plan, tasks, task, workers, _worker_init, (), lambda pool: StartedWorkers(pool, [], workers))


def _start_pool(plan: Plan, tasks: list, task, workers: int, initializer, more_initargs: tuple, make_started
                ) -> StartedWorkers:
    """``workers`` spawned processes, started with ``initializer(folder, options, min_score,
    threads, *more_initargs)`` and handed ``tasks`` at once; ``make_started(pool)`` makes the
    returned record."""
    threads = threads_per_worker(workers)
    ctx = multiprocessing.get_context("spawn")  # TensorFlow and CUDA do not survive fork
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer,
                                  initargs=(plan.folder, plan.options, plan.min_score, threads, *more_initargs))
    started = make_started(pool)
    try:
        # the workers start here (one per task submitted while none is idle, so all of them at
        # once); they need nothing from the caller's script
        with main_module_hidden(), thread_limits_in_environment(threads):
            started.futures = [pool.submit(task, t) for t in tasks]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return started


def run_pool(plan: Plan, accept, tasks: list | None = None, task=_worker_analyse, workers: int | None = None) -> None:
    """:func:`start_workers` on ``tasks`` (default: each photo to do, with :func:`_worker_analyse`),
    every result to ``accept``, then the processes ended. ``workers``: default
    :func:`worker_count` of the options' ``workers`` for the tasks."""
    tasks = plan.todo if tasks is None else tasks
    started = start_workers(plan, tasks, task, workers or worker_count(plan.options.workers, len(tasks)))
    try:
        started.collect(accept)
    finally:
        started.stop()
