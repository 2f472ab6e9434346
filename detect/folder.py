"""The folder engine: detect 5 facial points in every photo of a folder, for test.py.

Library side of ``process_images.py`` (and of run_pipeline's detection process). Photos are only
read (through util.image_io, the loader test.py uses); everything written goes under the folder's
output sub-folders:

- ``detections/<stem>.txt``: 5 lines ``x y`` of the chosen face (util.detections_io format);
  with ``all_faces`` the other faces as ``detections/<stem>__face02.txt``, ``__face03``, ...;
- ``landmarks/<stem>.txt`` (and ``__faceNN``): dlib 68 points, with ``landmarks68``;
- ``debug_vis/<stem>.jpg``: the photo with boxes and points drawn, with ``debug_vis``;
- ``process_report.json``: one row per photo (:func:`detect.report.make_row`) and a summary.

With ``recursive`` the layout below each output folder mirrors the photo sub-folders.
Every file is written to a temporary name in its final folder and renamed into place.
Which face is written: :mod:`detect.analyze`.

Re-runs: a photo whose report row has the same size, modification time and settings, and whose
outputs all exist, is not processed again (unless ``force``).
"""
from __future__ import annotations

import logging
import os
import re
import time

from detect.analyze import Analyzer
from detect.outputs import OutputBlockedError, write_outputs
from detect.dlib68 import resolve_predictor_path
from detect.registry import DETECTORS
from detect.report import REPORT_NAME, Report, file_stat, make_row, read_report, write_report
from detect.settings import Plan, PrepareOptions
from detect.workers import StartedWorkers, _worker_analyse, analyse_chunk, start_engines, start_workers, worker_count
from util.atomic_files import SUFFIX, remove_stale_temp_files, stale_temp_files
from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR
from util.image_io import DEBUG_VIS_DIR, list_images

logger = logging.getLogger(__name__)

_FACE_NAME = re.compile(r"^(?P<base>.+)__face\d{2,}$", re.IGNORECASE)


def plan_folder(folder: str, options: PrepareOptions, report_path: str | None = None) -> Plan:
    """List the photos of ``folder`` and decide which need processing. Writes nothing.

    Args:
        folder: the photo folder.
        options: what the run does (its detector must be a name of detect.registry.DETECTORS).
        report_path: the report file; default ``<folder>/process_report.json``.

    Returns:
        the plan: rows already final (name clashes, photos reused from the report) and the
        photos to do, sorted.

    Raises:
        NotADirectoryError: a missing folder.
        ValueError: an unknown detector, a detector that does not run on the device, an output
            folder name taken by a file, or a report file that process_images did not write.
        FileNotFoundError: a missing dlib predictor (checked here, before any work).
    """
    if options.detector not in DETECTORS:
        raise ValueError(f"unknown detector {options.detector!r}; choose one of {sorted(DETECTORS)}")
    if options.workers < 0:
        raise ValueError(f"--workers must be >= 1 (or auto), got {options.workers}")
    if options.device != "cpu" and "cuda" not in DETECTORS[options.detector].devices:
        raise ValueError(f"the {options.detector} detector runs on the CPU only, not on {options.device}")
    if options.landmarks68 or options.detector == "dlib":
        resolve_predictor_path(options.dlib_predictor)
    min_score = options.min_score
    if min_score is None:
        min_score = DETECTORS[options.detector].default_min_score
    report_path = report_path or os.path.join(folder, REPORT_NAME)
    images = list_images(folder, recursive=options.recursive)
    outputs = [DETECTIONS_DIR] + [LANDMARKS_DIR] * options.landmarks68 + [DEBUG_VIS_DIR] * options.debug_vis
    for sub in outputs:
        p = os.path.join(folder, sub)
        if os.path.lexists(p) and not os.path.isdir(p):
            raise ValueError(f"{p} exists and is not a folder: process_images writes its {sub} files into a folder "
                             "of that name; move it away")
    previous = read_report(report_path)
    plan = Plan(folder=folder, options=options, report_path=report_path, min_score=float(min_score))
    settings = options.settings(plan.min_score)
    clashes = _name_clashes(images)
    for rel in images:
        if rel in clashes:
            reason, detail = clashes[rel]
            plan.rows[rel] = make_row(rel, status="skipped", reason=reason, detail=detail,
                                      stat=file_stat(os.path.join(folder, rel)), settings=settings)
            continue
        old = previous.get(rel)
        if not options.force and old is not None and _reusable(folder, rel, old, settings, options):
            plan.rows[rel] = dict(old, reused=True)
        else:
            plan.todo.append(rel)
    return plan


def _name_clashes(images: list[str]) -> dict[str, tuple[str, str]]:
    """Photos whose detection files would collide with another photo's: rel -> (reason, detail)."""
    out: dict[str, tuple[str, str]] = {}
    by_stem: dict[tuple[str, str], str] = {}
    for rel in images:  # sorted: the first of a group keeps its name
        d, name = os.path.split(rel)
        key = (d, os.path.splitext(name)[0].casefold())
        if key in by_stem:
            first = by_stem[key]
            out[rel] = ("duplicate_stem", f"same name stem as {first}; detection files are named by stem, "
                                          "so rename one of them")
        else:
            by_stem[key] = rel
    for rel in images:
        d, name = os.path.split(rel)
        m = _FACE_NAME.match(os.path.splitext(name)[0])
        if rel not in out and m and (d, m.group("base").casefold()) in by_stem:
            other = by_stem[(d, m.group("base").casefold())]
            out[rel] = ("name_clash", f"'<stem>__faceNN' names the extra faces of {other}; rename this photo")
    return out


def _reusable(folder: str, rel: str, row: dict, settings: dict, options: PrepareOptions) -> bool:
    st = file_stat(os.path.join(folder, rel))
    if st is None or row.get("size_bytes") != st.st_size or row.get("mtime_ns") != st.st_mtime_ns:
        return False
    if row.get("settings") != settings or row.get("status") not in ("ok", "skipped"):
        return False
    if row.get("reason") in ("detector_error", "duplicate_stem", "name_clash"):
        return False  # not a property of the photo alone: try again
    outputs = list(row.get("outputs", []))
    if options.debug_vis and row.get("seconds") is not None:  # the detector ran: a picture is due
        if not row.get("debug_vis"):
            return False
        outputs.append(row["debug_vis"])
    return all(os.path.isfile(os.path.join(folder, p)) for p in outputs)


DEFAULT_BATCH = {"cpu": 8, "cuda": 32}  # photos per detect_batch call of the batched engine


def batched(options: PrepareOptions) -> bool:
    """Whether ``options`` run the batched engine (the torch port on CUDA, or on the CPU with a
    ``batch_size`` > 1) rather than one photo at a time."""
    return options.detector == "torch" and (options.device.startswith("cuda") or options.batch_size > 1)


def _spawnable(detector: str) -> bool:
    """Whether a fresh worker process finds ``detector``: the backends of this package, not one
    registered at run time (those run in the calling process)."""
    return getattr(DETECTORS.get(detector), "__module__", "").startswith("detect.")


def _chunks(plan: Plan) -> list[list[str]]:
    """The batched engine's batches: ``plan.todo`` in runs of ``batch_size`` (default
    :data:`DEFAULT_BATCH` for the device type)."""
    bs = plan.options.batch_size or DEFAULT_BATCH.get(plan.options.device.split(":")[0], 8)
    return [plan.todo[i:i + bs] for i in range(0, len(plan.todo), bs)]


def start_run(plan: Plan) -> StartedWorkers | None:
    """Start the worker processes that :func:`run_plan` will use for ``plan``, with their tasks,
    so that they load their detectors while the caller does other work (run_plan's outputs are
    written only when it runs).

    The batched engine (:func:`batched`: the torch port on CUDA, or on the CPU with a batch size)
    runs ``workers`` engine processes (auto: half the cores less one, at most 6, at most one per
    batch) that share the GPU and take batches from one list, each reading, checking and
    shrinking its next batch in threads (cores / workers of them) while it detects the current
    one in one ``detect_batch`` call; one photo at a time, ``workers`` detector
    processes (auto: one per core, at most one per 4 photos), each with cores / workers threads.

    Args:
        plan: from :func:`plan_folder`.

    Returns:
        the started workers, or None when the plan runs in this process (nothing to do, one
        worker, one batch, or a backend registered at run time). Pass it to :func:`run_plan`,
        or call its ``stop()`` when not running the plan after all.
    """
    options = plan.options
    if not plan.todo or not _spawnable(options.detector):
        return None
    if batched(options):
        chunks = _chunks(plan)
        workers = worker_count(options.workers, len(chunks), batched=True)
        if workers <= 1 or len(chunks) == 1:
            return None
        logger.info("batched detection on %s: %d batches of up to %d, %d engine process(es)", options.device,
                    len(chunks), len(chunks[0]), workers)
        return start_engines(plan, chunks, workers)
    workers = worker_count(options.workers, len(plan.todo))
    return None if workers == 1 else start_workers(plan, plan.todo, _worker_analyse, workers)


def start_run_checking_cuda(plan: Plan, fallback: PrepareOptions | None = None
                            ) -> tuple[Plan, StartedWorkers | None]:
    """:func:`start_run`, and on CUDA the check that torch sees a CUDA device, made while the
    engines start (they import torch and set up CUDA, seconds; the check imports torch here too).

    Args:
        plan: from :func:`plan_folder`, its device possibly taken on trust
            (``resolve_detector_device(..., verify=False)``).
        fallback: the options to run with instead when torch sees no CUDA (those of the CPU, for
            ``--device auto``); None: that is an error.

    Returns:
        ``(plan, started)``: the plan to run (made again with ``fallback`` after a fallback)
        and its started workers (None: it runs in the calling process).

    Raises:
        ValueError: (one line) torch sees no CUDA device and there is no fallback; the engines
            are stopped first.
    """
    from detect.registry import check_cuda

    started = start_run(plan)
    if not plan.options.device.startswith("cuda"):
        return plan, started
    try:
        check_cuda(plan.options.device)
    except ValueError:
        if started is not None:
            started.stop()
        if fallback is None:
            raise
        plan = plan_folder(plan.folder, fallback, report_path=plan.report_path)
        return plan, start_run(plan)
    return plan, started


def run_plan(plan: Plan, on_result=None, flush_every_s: float = 10.0, started: StartedWorkers | None = None,
             wait_for_workers: bool = True) -> Report:
    """Process ``plan.todo``: detect, write each photo's outputs as its result comes, then the report.

    Args:
        plan: from :func:`plan_folder`.
        on_result: called with each photo's report row after its outputs are written.
        flush_every_s: the report is also written this often while the run goes on (marked
            interrupted), and when interrupted.
        started: the workers :func:`start_run` started for this plan (default: started here);
            they are stopped before this returns.
        wait_for_workers: wait for the worker processes to end. False: after a run in which
            every task finished, they are left ending on their own (``report.workers_left``
            True), and the caller must leave with :func:`util.subprocesses.exit_now`.

    Returns:
        the report written (rows sorted by path, summary).

    Raises:
        KeyboardInterrupt: re-raised after the report of the photos done so far is written.
        DetectorUnavailableError, OSError: a backend that cannot start, outputs that cannot be
            written.
    """
    options, folder = plan.options, plan.folder
    _remove_stale_temp_files(folder, plan.report_path)
    rows = dict(plan.rows)
    t0, last_flush = time.perf_counter(), time.perf_counter()
    index: dict = {}  # one listing of each output folder for the whole run (see write_outputs)

    def accept(result: dict) -> None:
        nonlocal last_flush
        row = result["row"]
        rel = row["path"]
        try:
            row["outputs"] = write_outputs(folder, rel, result["faces"], options.landmarks68, index)
        except (NotADirectoryError, OutputBlockedError) as e:  # this photo's paths only, nothing written
            row.update(status="skipped", reason="output_blocked", detail=str(e), outputs=[])
        rows[rel] = row
        if on_result is not None:
            on_result(row)
        if time.perf_counter() - last_flush > flush_every_s:
            write_report(plan, rows, time.perf_counter() - t0, interrupted=True)
            last_flush = time.perf_counter()

    interrupted = False
    try:
        if started is None:
            started = start_run(plan)
        if started is not None:
            started.collect(accept)
        elif plan.todo:
            analyzer = Analyzer(folder, options, plan.min_score)
            if batched(options):
                for chunk in _chunks(plan):
                    for r in analyse_chunk(analyzer, chunk):
                        accept(r)
            else:
                for rel in plan.todo:
                    accept(analyzer.analyse(rel))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        left = False
        try:
            if started is not None:
                left = not started.stop(wait=wait_for_workers or interrupted)
        finally:
            report = write_report(plan, rows, time.perf_counter() - t0, interrupted=interrupted)
    report.workers_left = left
    return report


DETECTION_DONE, DETECTION_FAILED = "done", "failed"  # detect_to_queue's last message: (kind, ...)


def detect_to_queue(folder: str, options: PrepareOptions, queue, report_path: str | None = None,
                    fallback: PrepareOptions | None = None) -> None:
    """Entry of a detection process (run_pipeline): plan and run ``folder``, putting on ``queue``
    the list of photos (report paths) with a detection kept from an earlier run, the number of
    photos to detect, then for each photo as it is done a list of it alone (or an empty list: no
    face, or skipped), then ``(DETECTION_DONE, summary, report path)`` or ``(DETECTION_FAILED,
    one-line reason)``. CUDA taken on trust is checked as
    :func:`start_run_checking_cuda` does (``fallback``: the options without CUDA). SIGTERM (the
    parent stopping it) is taken as Ctrl-C. Dies with its parent, and leaves once its last
    message is sent, without waiting for its engines' exit (:func:`util.subprocesses.exit_now`;
    they end with it)."""
    from util.interrupts import sigterm_as_interrupt
    from util.subprocesses import die_with_parent, exit_now

    die_with_parent()
    try:
        with sigterm_as_interrupt():  # the parent's terminate(): the engines stopped, the queues' files freed
            _detect_to_queue(folder, options, queue, report_path, fallback)
    except KeyboardInterrupt:  # the parent may have stopped reading: what the queue holds must not keep us
        queue.cancel_join_thread()
        queue.put((DETECTION_FAILED, "interrupted"))
        exit_now(130)
    except Exception as e:  # noqa: BLE001 - the parent reports it in one line
        queue.put((DETECTION_FAILED, f"{type(e).__name__}: {e}"))
    queue.close()
    queue.join_thread()  # the last message is in the pipe
    exit_now(0)


def _detect_to_queue(folder: str, options: PrepareOptions, queue, report_path: str | None,
                     fallback: PrepareOptions | None) -> None:
    plan, started = start_run_checking_cuda(plan_folder(folder, options, report_path=report_path), fallback)
    queue.put([rel for rel, row in plan.rows.items() if row["status"] == "ok"])
    queue.put(len(plan.todo))
    report = run_plan(plan, on_result=lambda row: queue.put([row["path"]] if row["status"] == "ok" else []),
                      started=started)
    queue.put((DETECTION_DONE, report.summary, report.path))


def _remove_stale_temp_files(folder: str, report_path: str) -> None:
    """Delete the temporary files that killed runs of this tool left: only names of
    :mod:`util.atomic_files` whose writing process is gone, in the output folders and, beside
    the report, only those of the report itself. Nothing else is touched (a user's
    ``.tmp_mine.txt``, another program's temporaries, a live run's files)."""
    for sub in (DETECTIONS_DIR, LANDMARKS_DIR, DEBUG_VIS_DIR):
        remove_stale_temp_files(os.path.join(folder, sub), recursive=True)
    report_dir, report_name = os.path.split(os.path.abspath(report_path))
    for p in stale_temp_files(report_dir):
        if p.endswith(f".{report_name}{SUFFIX}"):
            try:
                os.remove(p)
            except OSError:
                pass
