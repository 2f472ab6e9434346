"""Folder preparation for test.py: detect 5 facial points in every photo of a folder.

Library side of ``process_images.py``. Photos are only read (through util.image_io, the loader
test.py uses); everything written goes under the folder's output sub-folders:

- ``detections/<stem>.txt``: 5 lines ``x y`` of the chosen face (util.detections_io format);
  with ``all_faces`` the other faces as ``detections/<stem>__face02.txt``, ``__face03``, ...;
- ``landmarks/<stem>.txt`` (and ``__faceNN``): dlib 68 points, with ``landmarks68``;
- ``debug_vis/<stem>.jpg``: the photo with boxes and points drawn, with ``debug_vis``;
- ``process_report.json``: one row per photo (see :func:`make_row`) and a summary.

With ``recursive`` the layout below each output folder mirrors the photo sub-folders.
Every file is written to a temporary name in its final folder and renamed into place.

Face choice: faces with a score below ``min_score`` are weak and never written. Among the
others the chosen face (``<stem>.txt``) maximises :func:`face_priority`, the box area times
``1 - 0.5 d / R`` (``d`` the distance from the box centre to the image centre, ``R`` half the
image diagonal): the largest face wins unless a smaller one is more central - a face in a corner
needs twice the area of a face in the centre. Extra faces are numbered in decreasing priority.

Re-runs: a photo whose report row has the same size, modification time and settings, and whose
outputs all exist, is not processed again (unless ``force``).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import stat
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from util.atomic_files import SUFFIX, remove_stale_temp_files, stale_temp_files, write_atomic
from util.detections_io import (DETECTIONS_DIR, LANDMARKS_DIR, detection_path, ensure_folder, face_detection_files,
                                write_points)
from util.filenames import from_hex, is_plain, json_text, raw_hex
from util.image_io import DEBUG_VIS_DIR, ImageLoadError, list_images, load_image_array
from util.subprocesses import main_module_hidden

logger = logging.getLogger(__name__)

REPORT_NAME = "process_report.json"
REPORT_TOOL = "process_images"
REPORT_FORMAT = 1
MIN_IMAGE_SIDE = 20  # MTCNN's smallest face size; a smaller photo cannot hold a usable face
NAME_KEYS = ("path", "outputs", "debug_vis")  # row fields holding file names (see write_report)
# Reasons a photo gets no detection file, besides util.image_io.LOAD_REASONS.
SKIP_REASONS = {
    "no_face": "no face found",
    "low_confidence": "faces found, but all below --min_score",
    "too_small": f"the image is smaller than {MIN_IMAGE_SIDE} pixels on a side",
    "duplicate_stem": "another photo in the same folder has the same name stem",
    "name_clash": "the name looks like an extra-face name (<stem>__faceNN) of another photo",
    "detector_error": "the detector raised an error on this image",
    "output_blocked": "a folder or special file has the name of one of its detection files",
}
_FACE_NAME = re.compile(r"^(?P<base>.+)__face\d{2,}$", re.IGNORECASE)


@dataclass(frozen=True)
class PrepareOptions:
    """What process_images does; defaults are the CLI's."""

    detector: str = "mtcnn"
    all_faces: bool = False
    landmarks68: bool = False
    dlib_predictor: str | None = None
    min_score: float | None = None  # None: the detector's default (mtcnn/torch 0.9, dlib 0.0)
    max_side: int = 1600
    recursive: bool = False
    force: bool = False
    debug_vis: bool = False
    workers: int = 1  # processes (CPU) or loader processes (batched); 0: auto, see worker_count
    device: str = "cpu"  # "cpu", or "cuda"/"cuda:N" for the batched torch engine (see resolve_device)
    batch_size: int = 0  # photos per detect_batch call of the batched engine; 0: its default
    verbose: bool = False  # let TensorFlow's log lines through

    def settings(self, min_score: float) -> dict:
        """The options that change the outputs; a report row is reused only when they match."""
        return {"detector": self.detector, "all_faces": self.all_faces, "landmarks68": self.landmarks68,
                "min_score": min_score, "max_side": self.max_side}


@dataclass
class Plan:
    """Photos of a folder split into rows already final (skips, reused) and work to do."""

    folder: str
    options: PrepareOptions
    report_path: str
    min_score: float
    rows: dict[str, dict] = field(default_factory=dict)  # rel path -> report row
    todo: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Result of :func:`run_plan`: the rows (sorted by path), the summary, whether interrupted."""

    path: str
    rows: list[dict]
    summary: dict
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------
# selection and geometry

def face_priority(box: np.ndarray, width: int, height: int) -> float:
    """Box area times ``1 - 0.5 d / R``: ``d`` box centre to image centre, ``R`` half the diagonal."""
    x, y, w, h = (float(v) for v in box)
    d = np.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2)
    r = 0.5 * np.hypot(width, height)
    return max(w, 0.0) * max(h, 0.0) * (1.0 - 0.5 * min(d / r, 1.0))


def order_faces(faces: list, width: int, height: int) -> list:
    """Faces (anything with ``.box``) sorted by decreasing :func:`face_priority` (stable)."""
    return sorted(faces, key=lambda f: -face_priority(f.box, width, height))


# ---------------------------------------------------------------------------------------------
# planning

def plan_folder(folder: str, options: PrepareOptions, report_path: str | None = None) -> Plan:
    """List the photos of ``folder`` and decide which need processing.

    Raises NotADirectoryError for a missing folder, ValueError for an existing report file that
    process_images did not write, DetectorUnavailableError/FileNotFoundError for a missing
    backend or dlib predictor (checked here, before any work).
    """
    import mtcnn_detector as md

    if options.detector not in md.DETECTORS:
        raise ValueError(f"unknown detector {options.detector!r}; choose one of {sorted(md.DETECTORS)}")
    if options.workers < 0:
        raise ValueError(f"--workers must be >= 1 (or auto), got {options.workers}")
    if options.device != "cpu" and "cuda" not in md.DETECTORS[options.detector].devices:
        raise ValueError(f"the {options.detector} detector runs on the CPU only, not on {options.device}")
    if options.landmarks68 or options.detector == "dlib":
        md.resolve_predictor_path(options.dlib_predictor)
    min_score = options.min_score
    if min_score is None:
        min_score = md.DETECTORS[options.detector].default_min_score
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
                                      stat=_stat(os.path.join(folder, rel)), settings=settings)
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


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _reusable(folder: str, rel: str, row: dict, settings: dict, options: PrepareOptions) -> bool:
    st = _stat(os.path.join(folder, rel))
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


# ---------------------------------------------------------------------------------------------
# one photo

def make_row(rel: str, status: str, reason: str = "", detail: str = "", stat: os.stat_result | None = None,
             settings: dict | None = None, **extra) -> dict:
    """One report row. Keys:

    path (relative, '/'-separated), status ('ok' | 'skipped'), reason ('' or a key of
    SKIP_REASONS / util.image_io.LOAD_REASONS), detail (human text), faces (faces at or above
    min_score), weak_faces (below it), confidence (chosen face's score), box (chosen face's
    [x, y, w, h], pixels), width, height, outputs (files written, relative to the folder),
    size_bytes, mtime_ns (the photo when processed), settings, seconds (load + detection time;
    None when the detector did not run), debug_vis (the picture written, or None), reused (row
    kept from an earlier run).
    """
    row = {"path": rel, "status": status, "reason": reason, "detail": detail, "faces": 0, "weak_faces": 0,
           "confidence": None, "box": None, "width": None, "height": None, "outputs": [],
           "size_bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None,
           "settings": settings, "seconds": None, "debug_vis": None, "reused": False}
    row.update(extra)
    return row


class Analyzer:
    """Per-process state: the detector (model loaded once) and, if needed, the dlib landmarker.

    ``threads`` > 0 caps the detector's CPU threads in this process; ``device`` (default
    ``options.device``) is where a backend that has a choice (``torch``) runs."""

    def __init__(self, folder: str, options: PrepareOptions, min_score: float, threads: int = 0,
                 device: str | None = None):
        import mtcnn_detector as md

        self.folder, self.options, self.min_score = folder, options, min_score
        self.settings = options.settings(min_score)
        kw: dict = {"max_side": options.max_side}
        if options.detector == "dlib":
            kw["predictor_path"] = options.dlib_predictor
        if options.detector == "mtcnn":
            kw["quiet"] = not options.verbose
        if options.detector in ("mtcnn", "torch") and threads:
            kw["threads"] = threads
        if options.detector == "torch":
            kw["device"] = device or options.device
        self.detector = md.create_detector(options.detector, **kw)
        self.landmarker = None
        if options.landmarks68:
            self.landmarker = (self.detector.landmarker if options.detector == "dlib"
                               else md.Dlib68Landmarker(options.dlib_predictor))

    def analyse(self, rel: str) -> dict:
        """Load, check and detect one photo. Returns ``{"row": ..., "faces": [...]}`` where faces
        (chosen first) are dicts with lm5 (5, 2), lm68 (68, 2) or None, box, score. Writes the
        debug image if asked; writes nothing else."""
        photo = load_photo(self.folder, rel, self.settings, self.options.max_side, keep_full=True)
        if "result" in photo:
            return photo["result"]
        t0 = time.perf_counter()
        try:
            found = self.detector.detect_prepared([photo["prepared"]], [photo["image"]])[0]
        except Exception:  # noqa: BLE001 - a detector failure on one photo must not stop the folder
            return detector_error(photo)
        return self.finish(photo, found, time.perf_counter() - t0)

    def analyse_batch(self, photos: list[dict]) -> list[dict]:
        """:meth:`analyse` for photos that :func:`load_photo` loaded (in a loader process): the
        detector runs once on all of them (``torch``: one batch). If it fails, each photo is
        detected alone, so that only the photo that fails gets ``detector_error``."""
        todo = [p for p in photos if "result" not in p]
        found: list | None = None
        t0 = time.perf_counter()
        if todo:
            try:
                found = self.detector.detect_prepared([p["prepared"] for p in todo], [p.get("image") for p in todo])
            except Exception:  # noqa: BLE001 - retried one by one below
                logger.info("batched detection failed; detecting the %d photos one by one", len(todo), exc_info=True)
        share = (time.perf_counter() - t0) / max(1, len(todo))
        results, k = [], 0
        for p in photos:
            if "result" in p:
                results.append(p["result"])
                continue
            if found is not None:
                results.append(self.finish(p, found[k], share))
            else:
                t1 = time.perf_counter()
                try:
                    faces = self.detector.detect_prepared([p["prepared"]], [p.get("image")])[0]
                except Exception:  # noqa: BLE001
                    results.append(detector_error(p))
                else:
                    results.append(self.finish(p, faces, time.perf_counter() - t1))
            k += 1
        return results

    def finish(self, photo: dict, found: list, detect_seconds: float) -> dict:
        """Choose and order the faces :func:`load_photo`'s photo got; fit 68 points and draw the
        debug picture if asked. Returns ``{"row": ..., "faces": [...]}`` as :meth:`analyse`."""
        rel, row_kw = photo["rel"], dict(photo["row_kw"])
        w, h = row_kw["width"], row_kw["height"]
        found = [d for d in found if np.all(np.isfinite(d.lm5))]
        strong = order_faces([d for d in found if d.score >= self.min_score], w, h)
        weak = [d for d in found if d.score < self.min_score]
        written = strong if self.options.all_faces else strong[:1]
        image = photo.get("image")
        faces = []
        for d in written:
            lm68 = self.landmarker.fit(image, d) if self.landmarker is not None else None
            faces.append({"lm5": d.lm5, "lm68": lm68, "box": d.box, "score": d.score})
        if self.options.debug_vis:
            draw_and_save(os.path.join(self.folder, _vis_rel(rel)), image, written, strong[len(written):], weak)
            row_kw["debug_vis"] = _vis_rel(rel)
        row_kw.update(faces=len(strong), weak_faces=len(weak), seconds=round(photo["load_seconds"] + detect_seconds, 4))
        if strong:
            best = strong[0]
            row = make_row(rel, "ok", confidence=round(best.score, 4),
                           box=[round(float(v), 2) for v in best.box], **row_kw)
        elif weak:
            best = max(weak, key=lambda d: d.score)
            row = make_row(rel, "skipped", "low_confidence",
                           f"best score {best.score:.3f} < min_score {self.min_score}",
                           confidence=round(best.score, 4), box=[round(float(v), 2) for v in best.box], **row_kw)
        else:
            row = make_row(rel, "skipped", "no_face", SKIP_REASONS["no_face"], **row_kw)
        return {"row": row, "faces": faces}


def load_photo(folder: str, rel: str, settings: dict, max_side: int, keep_full: bool) -> dict:
    """Read and check one photo and shrink it for the detector (safe in a loader process).

    Returns ``{"result": ...}`` (the photo's final :meth:`Analyzer.analyse` result) when it cannot
    be detected (unreadable, too small), else ``{"rel", "row_kw", "prepared": (small, sx, sy),
    "image": the full photo or None (``keep_full`` False), "load_seconds"}``.
    """
    from mtcnn_detector import downscale

    t0 = time.perf_counter()
    path = os.path.join(folder, rel)
    row_kw: dict = {"stat": _stat(path), "settings": settings}
    try:
        image = load_image_array(path)
    except ImageLoadError as e:
        return {"result": {"row": make_row(rel, "skipped", e.reason, e.detail, **row_kw), "faces": []}}
    h, w = image.shape[:2]
    row_kw.update(width=w, height=h)
    if min(h, w) < MIN_IMAGE_SIDE:
        detail = f"{w}x{h} pixels; a face needs at least {MIN_IMAGE_SIDE} pixels on a side"
        return {"result": {"row": make_row(rel, "skipped", "too_small", detail, **row_kw), "faces": []}}
    prepared = downscale(image, max_side)
    return {"rel": rel, "row_kw": row_kw, "prepared": prepared, "image": image if keep_full else None,
            "load_seconds": time.perf_counter() - t0}


def detector_error(photo: dict) -> dict:
    """The result of a photo the detector raised on (logged with its traceback)."""
    import sys

    e = sys.exc_info()[1]
    logger.exception("detector failed on %s", photo["rel"])
    return {"row": make_row(photo["rel"], "skipped", "detector_error", f"{type(e).__name__}: {e}", **photo["row_kw"]),
            "faces": []}


def _vis_rel(rel: str) -> str:
    return f"{DEBUG_VIS_DIR}/{os.path.splitext(rel)[0]}.jpg"


def write_outputs(folder: str, rel: str, faces: list[dict], landmarks68: bool, index: dict | None = None) -> list[str]:
    """Write the detection (and landmark) files of one photo; remove its stale ones.

    Returns the written paths relative to ``folder``. Detection files of this photo that are not
    rewritten are removed (a photo with no face keeps none, a photo with fewer faces than before
    loses the extra ones). Landmark files not rewritten are removed too when they are older than
    the photo. Raises OutputBlockedError, having written and removed nothing, when one of these
    names is taken by a folder or a special file (never replaced or removed). ``index``: one dict
    for all photos of a run, so that each output folder is listed once (its listing from before
    the run is what stale files are looked up in).
    """
    targets = []
    for k, f in enumerate(faces, start=1):
        targets.append((detection_path(folder, rel, face=k), f["lm5"]))
        if landmarks68 and f["lm68"] is not None:
            targets.append((detection_path(folder, rel, face=k, subdir=LANDMARKS_DIR), f["lm68"]))
    keep = {p for p, _ in targets}
    photo_mtime = _stat(os.path.join(folder, rel))
    stale = [p for _, p in face_detection_files(folder, rel, index=index) if p not in keep and os.path.lexists(p)]
    for _, p in face_detection_files(folder, rel, subdir=LANDMARKS_DIR, index=index):
        st = _stat(p)
        if p not in keep and st and (landmarks68 or (photo_mtime and st.st_mtime_ns < photo_mtime.st_mtime_ns)):
            stale.append(p)
    for p in [p for p, _ in targets] + stale:  # all checked before anything is written: all or nothing
        _check_replaceable(p)
    for d in {os.path.dirname(p) for p, _ in targets}:
        ensure_folder(d)
    for p, points in targets:
        write_points(p, points)
    for p in stale:
        os.remove(p)
    return [os.path.relpath(p, folder).replace(os.sep, "/") for p, _ in targets]


class OutputBlockedError(OSError):
    """A photo's output path is taken by something this tool does not replace (a folder, a FIFO)."""


def _check_replaceable(path: str) -> None:
    """OutputBlockedError when ``path`` exists and is neither a file nor a link (a folder, a FIFO,
    a device): an output name taken by something this tool never replaces or removes."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent (a file in place of a folder above: ensure_folder says)
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a special file (FIFO, device or socket)"
        raise OutputBlockedError(f"{path} is {kind}, not a detection file; move it away")


def draw_and_save(path: str, image: np.ndarray, written: list, extra: list, weak: list) -> None:
    """Save ``image`` with faces drawn: chosen face green, other written/strong faces blue, weak
    faces red; the 5 points as dots (left eye and left mouth corner filled). Atomic write."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    s = min(1.0, 2000.0 / max(h, w))
    im = Image.fromarray(image)
    if s < 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 400))
    groups = [(written[:1], (0, 220, 0)), (written[1:] + extra, (40, 120, 255)), (weak, (255, 40, 40))]
    for faces, colour in groups:
        for d in faces:
            x, y, bw, bh = (float(v) * s for v in d.box)
            draw.rectangle([x, y, x + bw, y + bh], outline=colour, width=lw)
            r = max(2.0, 0.03 * float(np.sqrt(max(d.area, 1.0))) * s)
            for i, (px, py) in enumerate(np.asarray(d.lm5) * s):
                fill = colour if i in (0, 3) else None
                draw.ellipse([px - r, py - r, px + r, py + r], outline=colour, fill=fill, width=max(1, lw // 2))
            draw.text((x + lw, y + lw), f"{d.score:.2f}", fill=colour)
    if not (written or extra or weak):
        draw.text((lw, lw), "no face", fill=(255, 40, 40))
    _atomic_write(path, lambda f: im.save(f, format="JPEG", quality=90))


def _atomic_write(path: str, write) -> None:
    """:func:`util.atomic_files.write_atomic` into ``path``'s folder, made first if need be."""
    ensure_folder(os.path.dirname(path) or ".")
    write_atomic(path, write)


# ---------------------------------------------------------------------------------------------
# worker processes

_WORKER: dict = {}
# Variables that size the thread pools of OpenMP, BLAS libraries, TensorFlow and torch's inter-op
# pool; set for a worker before it starts, so that every library reads them at its import.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(requested: int, n_photos: int, batched: bool = False, cores: int | None = None) -> int:
    """Processes for ``n_photos``: ``requested``, or with 0 (auto) one per core, at most one per
    4 photos (a detector process costs seconds to start), at least 1. ``batched``: engine
    processes of the batched engine for ``n_photos`` batches (auto: the cores less one, at most
    16, at most one per batch)."""
    cores = cores or usable_cores()
    if requested > 0:
        return min(requested, max(1, n_photos))
    if batched:  # n_photos: batches
        return min(16, max(1, cores - 1), max(1, n_photos))
    return max(1, min(cores, -(-n_photos // 4)))


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """CPU threads each of ``workers`` processes may use, so that workers x threads <= cores."""
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


def _worker_analyse_batch(rels: list[str]) -> list[dict]:
    """A batched engine's task: load a batch of photos, detect them in one call."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _analyse_chunk(_WORKER["analyzer"], rels)


def _analyse_chunk(analyzer: Analyzer, rels: list[str]) -> list[dict]:
    keep_full = analyzer.options.landmarks68 or analyzer.options.debug_vis
    photos = [load_photo(analyzer.folder, rel, analyzer.settings, analyzer.options.max_side, keep_full)
              for rel in rels]
    return analyzer.analyse_batch(photos)


# ---------------------------------------------------------------------------------------------
# running

DEFAULT_BATCH = {"cpu": 8, "cuda": 32}  # photos per detect_batch call of the batched engine


def batched(options: PrepareOptions) -> bool:
    """Whether ``options`` run the batched engine (the torch port on CUDA, or on the CPU with a
    ``batch_size`` > 1) rather than one photo at a time."""
    return options.detector == "torch" and (options.device.startswith("cuda") or options.batch_size > 1)


def _spawnable(detector: str) -> bool:
    """Whether a fresh worker process finds ``detector``: the backends of mtcnn_detector, not
    one registered at run time (those run in the calling process)."""
    import mtcnn_detector as md

    return getattr(md.DETECTORS.get(detector), "__module__", None) == md.__name__


def run_plan(plan: Plan, on_result=None, flush_every_s: float = 10.0) -> Report:
    """Process ``plan.todo``, write outputs and the report; ``on_result(row)`` after each photo.

    The report is also written every ``flush_every_s`` seconds and when interrupted
    (KeyboardInterrupt is re-raised after the report is written).
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
        if plan.todo:
            if batched(options):
                _run_batched(plan, accept)
            elif not _spawnable(options.detector) or worker_count(options.workers, len(plan.todo)) == 1:
                analyzer = Analyzer(folder, options, plan.min_score)
                for rel in plan.todo:
                    accept(analyzer.analyse(rel))
            else:
                _run_pool(plan, accept)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        report = write_report(plan, rows, time.perf_counter() - t0, interrupted=interrupted)
    return report


def _run_pool(plan: Plan, accept, tasks: list | None = None, task=_worker_analyse, workers: int | None = None) -> None:
    """Worker processes, each with its own detector and :func:`threads_per_worker` threads, on
    ``tasks`` (default: each photo to do) with ``task``, whose results (one or a list) go to ``accept``."""
    options = plan.options
    tasks = plan.todo if tasks is None else tasks
    n = workers or worker_count(options.workers, len(tasks))
    threads = threads_per_worker(n)
    ctx = multiprocessing.get_context("spawn")  # TensorFlow and CUDA do not survive fork
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init,
                                  initargs=(plan.folder, options, plan.min_score, threads))
    try:
        # the workers start here; they need nothing from the caller's script
        with main_module_hidden(), thread_limits_in_environment(threads):
            futures = [pool.submit(task, t) for t in tasks]
        for fut in cf.as_completed(futures):
            result = fut.result()
            for r in result if isinstance(result, list) else [result]:
                accept(r)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_batched(plan: Plan, accept) -> None:
    """The batched engine: the photos in batches of ``batch_size``; each batch is read, checked
    and shrunk, then detected in one ``detect_batch`` call. On CUDA several engine processes
    (``workers``, auto: the cores less one, at most 16) share the GPU, each reading its own
    batches, so that decoding runs on every core and the GPU's work of one process overlaps the
    reading and the Python of the others (one engine fed by a DataLoader was bound by moving the
    decoded photos into its process: 185 photos/s on an H200, docs/detection_speed.md)."""
    options = plan.options
    device_type = options.device.split(":")[0]
    bs = options.batch_size or DEFAULT_BATCH.get(device_type, 8)
    chunks = [plan.todo[i:i + bs] for i in range(0, len(plan.todo), bs)]
    workers = worker_count(options.workers, len(chunks), batched=True) if _spawnable(options.detector) else 1
    if workers <= 1 or len(chunks) == 1:
        analyzer = Analyzer(plan.folder, options, plan.min_score)
        for chunk in chunks:
            for r in _analyse_chunk(analyzer, chunk):
                accept(r)
        return
    logger.info("batched detection on %s: %d batches of up to %d, %d engine process(es)", options.device,
                len(chunks), bs, workers)
    _run_pool(plan, accept, tasks=chunks, task=_worker_analyse_batch, workers=workers)


DETECTION_DONE, DETECTION_FAILED = "done", "failed"  # detect_to_queue's last message: (kind, ...)


def detect_to_queue(folder: str, options: PrepareOptions, queue, report_path: str | None = None) -> None:
    """Entry of a detection process (run_pipeline): plan and run ``folder``, putting on ``queue``
    lists of the photos (report paths) that have a detection, as they get it (those kept from an
    earlier run first), then ``(DETECTION_DONE, summary, report path)`` or ``(DETECTION_FAILED,
    one-line reason)``. Dies with its parent."""
    from util.subprocesses import die_with_parent

    die_with_parent()
    try:
        plan = plan_folder(folder, options, report_path=report_path)
        ready = [rel for rel, row in plan.rows.items() if row["status"] == "ok"]
        if ready:
            queue.put(ready)
        report = run_plan(plan, on_result=lambda row: queue.put([row["path"]]) if row["status"] == "ok" else None)
        queue.put((DETECTION_DONE, report.summary, report.path))
    except KeyboardInterrupt:
        queue.put((DETECTION_FAILED, "interrupted"))
    except Exception as e:  # noqa: BLE001 - the parent reports it in one line
        queue.put((DETECTION_FAILED, f"{type(e).__name__}: {e}"))


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


# ---------------------------------------------------------------------------------------------
# report

def summarize(rows: list[dict], seconds: float) -> dict:
    """Counts over report rows: images, ok, faces_written, reused, processed, skipped by reason."""
    skipped: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    processed = sum(1 for r in rows if not r.get("reused"))
    faces_written = sum(sum(1 for p in r.get("outputs", []) if p.startswith(DETECTIONS_DIR + "/")) for r in rows)
    return {
        "images": len(rows),
        "ok": sum(1 for r in rows if r["status"] == "ok"),
        "faces_written": faces_written,
        "reused": len(rows) - processed,
        "skipped": dict(sorted(skipped.items())),
        "loaded": sum(1 for r in rows if r.get("width") is not None),
        "seconds": round(seconds, 3),
    }


def write_report(plan: Plan, rows: dict[str, dict], seconds: float, interrupted: bool = False) -> Report:
    """Write the report (UTF-8 JSON) atomically. File names that are not valid UTF-8 are
    written escaped (:func:`util.filenames.json_text`: each undecodable byte as ``\\xNN``) and,
    in the fields that name files (:data:`NAME_KEYS`, and ``folder``), also exactly, as the
    hexadecimal digits of their bytes in ``<field>_hex`` (a list for ``outputs``), from which
    :func:`read_report` finds the files again."""
    ordered = [rows[k] for k in sorted(rows)]
    summary = summarize(ordered, seconds)
    folder = os.path.abspath(plan.folder)
    doc = {
        "tool": REPORT_TOOL, "format": REPORT_FORMAT, "folder": folder,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "interrupted": interrupted,
        "options": asdict(plan.options), "settings": plan.options.settings(plan.min_score),
        "summary": summary, "images": [r if is_plain(r["path"]) else _with_raw_names(r) for r in ordered],
    }
    if not is_plain(folder):
        doc["folder_hex"] = raw_hex(folder)
    try:
        data = json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 somewhere (a path, a message quoting one)
        data = json.dumps(_json_safe(doc), indent=1, ensure_ascii=False).encode("utf-8")
    _atomic_write(plan.report_path, lambda f: f.write(data))
    return Report(path=plan.report_path, rows=ordered, summary=summary, interrupted=interrupted)


def _with_raw_names(row: dict) -> dict:
    """``row`` with ``<key>_hex`` beside each name field (:data:`NAME_KEYS`): the names' bytes."""
    out = dict(row)
    for key in NAME_KEYS:
        v = row.get(key)
        if isinstance(v, str):
            out[key + "_hex"] = raw_hex(v)
        elif isinstance(v, list):
            out[key + "_hex"] = [raw_hex(x) for x in v]
    return out


def _json_safe(obj):
    """``obj`` (JSON-able) with every string passed through :func:`util.filenames.json_text`."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, dict):
        return {json_text(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _restore_names(row: dict) -> dict | None:
    """A row read back: name fields from their ``_hex`` bytes where present; None if damaged."""
    for key in NAME_KEYS:
        raw = row.pop(key + "_hex", None)
        if raw is None:
            continue
        try:
            row[key] = [from_hex(x) for x in raw] if isinstance(raw, list) else from_hex(raw)
        except (TypeError, ValueError):
            return None
    return row


def read_report(path: str) -> dict[str, dict]:
    """Rows of an earlier report by path; {} when absent or unreadable. Raises ValueError when
    ``path`` exists but is not a process_images report (it is then never overwritten), or is not
    a file (a folder, a FIFO - never opened, so never waited on). Rows that are not well-formed
    (an edited report) are left out: their photos are processed again."""
    if not os.path.lexists(path):
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"{path} exists and is not a file; move it or pass --report")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("tool") != REPORT_TOOL:
        raise ValueError(f"{path} exists and was not written by process_images; move it or pass --report")
    if doc.get("format") != REPORT_FORMAT or not isinstance(doc.get("images"), list):
        return {}
    rows = (_restore_names(dict(r)) for r in doc["images"] if isinstance(r, dict))
    return {r["path"]: r for r in rows if r is not None and _well_formed(r)}


def _well_formed(row: dict) -> bool:
    """Whether a report row read back has the types :func:`plan_folder` relies on."""
    outputs, vis = row.get("outputs", []), row.get("debug_vis")
    return (isinstance(row.get("path"), str) and isinstance(outputs, list) and all(isinstance(p, str) for p in outputs)
            and (vis is None or isinstance(vis, str)))
