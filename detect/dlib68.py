"""The dlib backend: HOG face detector + 68-point shape predictor, and the 68-point landmarker
that process_images' ``--landmarks68`` runs on any detector's faces.

The only module that imports dlib, lazily: importing it loads nothing.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from detect.base import Detection, DetectorUnavailableError, FaceDetector, box_iou, check_image, downscale
from util.assets import require_file
from util.landmarks import lm68_to_5

# the pyproject.toml extra that installs this backend (run in the checkout), and its packages
DLIB_INSTALL = 'pip install -e ".[dlib]" (the packages: dlib-bin face_recognition_models)'
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_HELP = (
    "Get it with `pip install face_recognition_models` (found automatically) or download "
    "http://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2, unpack it with bunzip2 "
    "and pass its path with --dlib_predictor."
)


def default_predictor_path() -> str | None:
    """The 68-point predictor shipped by ``face_recognition_models``, located without importing it
    (its ``__init__`` needs pkg_resources, which current setuptools dropped). None if absent."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(d, "models", PREDICTOR_FILE)
        if os.path.isfile(p):
            return p
    return None


def resolve_predictor_path(path: str | None) -> str:
    """The dlib 68-point predictor file to use.

    Args:
        path: ``--dlib_predictor``, or None for :func:`default_predictor_path`.

    Returns:
        the path of an existing file.

    Raises:
        FileNotFoundError: (util.assets.MissingAssetError) no such file; the message says how to
            get it.
    """
    if path is None:
        path = default_predictor_path()
        if path is None:
            return require_file(PREDICTOR_FILE, "dlib 68-point predictor", PREDICTOR_HELP)
    return require_file(path, "dlib 68-point predictor", PREDICTOR_HELP)


class DlibDetector(FaceDetector):
    """dlib's HOG frontal face detector + 68-point shape predictor; 5 points derived from the 68.

    ``upsample`` is dlib's number of upsamplings of the (possibly downscaled) image: 1 finds
    faces down to about 40 pixels, 0 is 3-4 times faster but misses faces under about 80 pixels.
    The 68 points are fitted on the full-resolution image.
    """

    name = "dlib"
    default_min_score = 0.0
    needs_original = True

    def __init__(self, max_side: int | None = 1600, predictor_path: str | None = None, upsample: int = 1):
        super().__init__(max_side)
        self.upsample = int(upsample)
        self.landmarker = Dlib68Landmarker(predictor_path)
        self._detector = self.landmarker.dlib.get_frontal_face_detector()

    def _detect(self, image: np.ndarray) -> list[Detection]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), self.upsample, 0.0)
        out = []
        for r, s in zip(rects, scores):
            box = np.array([r.left(), r.top(), r.right() - r.left() + 1, r.bottom() - r.top() + 1], dtype=np.float64)
            out.append(Detection(box=box, score=float(s), lm5=np.zeros((5, 2))))
        return out

    def _refine(self, image, faces, scale):
        out = []
        for d in faces:
            lm68 = self.landmarker.fit_rect(image, d.box)
            out.append(Detection(box=d.box, score=d.score, lm5=lm68_to_5(lm68), lm68=lm68))
        return out


class Dlib68Landmarker:
    """dlib's 68-point shape predictor, for faces found by any detector.

    :meth:`fit` takes a :class:`Detection`: the predictor is started from dlib's own face box
    when dlib's detector finds a box overlapping the face (the framing it was trained on), else
    from the detection's box mapped to dlib's framing (centre moved down by 0.07 box sizes,
    side 0.975 box sizes, measured on tests/data/faces).
    """

    def __init__(self, predictor_path: str | None = None):
        if importlib.util.find_spec("dlib") is None:
            raise DetectorUnavailableError(f"dlib is not installed: {DLIB_INSTALL}")
        import dlib

        self.dlib = dlib
        self.predictor_path = resolve_predictor_path(predictor_path)
        self._predictor = dlib.shape_predictor(self.predictor_path)
        self._detector = None

    def fit_rect(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """68 points ((68, 2) float64, image pixels) from an ``x, y, w, h`` box in dlib framing."""
        x, y, w, h = (float(v) for v in box)
        rect = self.dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)) - 1, int(round(y + h)) - 1)
        shape = self._predictor(np.ascontiguousarray(image), rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def fit(self, image: np.ndarray, face: Detection) -> np.ndarray:
        """68 points for a face found by another detector; (68, 2) float64, image pixels."""
        check_image(image)
        if face.lm68 is not None:
            return face.lm68
        return self.fit_rect(image, self._dlib_box(image, face.box))

    def _dlib_box(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        x, y, w, h = (float(v) for v in box)
        s = float(np.sqrt(max(w * h, 1.0)))
        # crop around the face so that dlib's detector cost does not grow with the photo
        x0, y0 = max(0, int(x - s)), max(0, int(y - s))
        x1, y1 = min(image.shape[1], int(x + w + s)), min(image.shape[0], int(y + h + s))
        crop, sx, sy = downscale(image[y0:y1, x0:x1], 600)
        if self._detector is None:
            self._detector = self.dlib.get_frontal_face_detector()
        best, best_iou = None, 0.3
        if min(crop.shape[:2]) >= 40:
            for r in self._detector(np.ascontiguousarray(crop), 1 if max(crop.shape[:2]) < 400 else 0):
                cand = np.array([r.left() / sx + x0, r.top() / sy + y0,
                                 (r.right() - r.left() + 1) / sx, (r.bottom() - r.top() + 1) / sy])
                iou = box_iou(cand, np.asarray(box, dtype=np.float64))
                if iou > best_iou:
                    best, best_iou = cand, iou
        if best is not None:
            return best
        cx, cy = x + w / 2, y + h / 2 + 0.07 * s
        side = 0.975 * s
        return np.array([cx - side / 2, cy - side / 2, side, side])
