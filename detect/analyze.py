"""One photo's detection: load and check it, detect, choose and order the faces, make its report row.

Face choice: faces with a score below ``min_score`` are weak and never written. Among the
others the chosen face maximises :func:`face_priority`, the box area times ``1 - 0.5 d / R``
(``d`` the distance from the box centre to the image centre, ``R`` half the image diagonal): the
largest face wins unless a smaller one is more central - a face in a corner needs twice the
area of a face in the centre. Extra faces are numbered in decreasing priority.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from detect.base import downscale
from detect.dlib68 import Dlib68Landmarker
from detect.outputs import draw_and_save, vis_rel
from detect.registry import create_detector
from detect.report import MIN_IMAGE_SIDE, SKIP_REASONS, file_stat, make_row
from detect.settings import PrepareOptions
from util.image_io import ImageLoadError, load_image_array

logger = logging.getLogger(__name__)

def face_priority(box: np.ndarray, width: int, height: int) -> float:
    """How much a face is "the" face of a photo.

    Args:
        box: (4,) ``x, y, w, h``, pixels; width, height: the photo's size, pixels.

    Returns:
        the box area times ``1 - 0.5 min(d / R, 1)``, ``d`` the distance from the box centre to
        the image centre, ``R`` half the image diagonal (>= 0; negative sizes count as 0).
    """
    x, y, w, h = (float(v) for v in box)
    d = np.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2)
    r = 0.5 * np.hypot(width, height)
    return max(w, 0.0) * max(h, 0.0) * (1.0 - 0.5 * min(d / r, 1.0))


def order_faces(faces: list, width: int, height: int) -> list:
    """Faces sorted by decreasing :func:`face_priority`.

    Args:
        faces: anything with a (4,) ``.box`` (e.g. detect.base.Detection); width, height: the photo's.

    Returns:
        a new list, the chosen face first; ties keep their order (stable sort).
    """
    return sorted(faces, key=lambda f: -face_priority(f.box, width, height))


class Analyzer:
    """Per-process state: the detector (model loaded once) and, if needed, the dlib landmarker.

    Args:
        folder: the photo folder; options: the run's; min_score: faces below it are weak.
        threads: > 0 caps the detector's CPU threads in this process.
        device: where a backend that has a choice (``torch``) runs; default ``options.device``.

    Raises:
        ValueError, DetectorUnavailableError, FileNotFoundError: as
            :func:`detect.registry.create_detector` (and the dlib predictor for ``landmarks68``).
    """

    def __init__(self, folder: str, options: PrepareOptions, min_score: float, threads: int = 0,
                 device: str | None = None):
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
        self.detector = create_detector(options.detector, **kw)
        self.landmarker = None
        if options.landmarks68:
            self.landmarker = (self.detector.landmarker if options.detector == "dlib"
                               else Dlib68Landmarker(options.dlib_predictor))

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
            draw_and_save(os.path.join(self.folder, vis_rel(rel)), image, written, strong[len(written):], weak)
            row_kw["debug_vis"] = vis_rel(rel)
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

    Args:
        folder: the photo folder; rel: the photo's path relative to it.
        settings: the run's settings (for the report row); max_side: see detect.base.downscale.
        keep_full: keep the full (H, W, 3) uint8 photo (for 68 points or the debug picture).

    Returns:
        ``{"result": ...}`` (the photo's final :meth:`Analyzer.analyse` result) when it cannot
        be detected (unreadable, too small), else ``{"rel", "row_kw", "prepared": (small, sx,
        sy), "image": the full photo or None, "load_seconds"}``. Never raises for a bad photo.
    """
    t0 = time.perf_counter()
    path = os.path.join(folder, rel)
    row_kw: dict = {"stat": file_stat(path), "settings": settings}
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
