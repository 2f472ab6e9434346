"""Face detection with 5 landmarks: one interface over the mtcnn, dlib and PyTorch-MTCNN backends.

This is the only module that imports mtcnn, TensorFlow or dlib, and it does so lazily, inside
the backends: importing it loads nothing.

    det = create_detector("mtcnn")            # or "dlib", "torch"
    faces = det.detect(image)                  # image: (H, W, 3) uint8 RGB
    faces[0].lm5                               # (5, 2) float64, image pixels

Conventions shared by every backend:

- coordinates are in pixels of the image given to :meth:`FaceDetector.detect`, x to the right,
  y down, origin at the top-left corner of the top-left pixel's centre (pixel (0, 0) is at 0, 0);
- the 5 points are, in this order: left eye centre, right eye centre, nose tip, left mouth
  corner, right mouth corner, where "left" means image-left for an upright face (the subject's
  right). This is the order of the original Deep3DFaceRecon detection files;
- images whose longer side exceeds ``max_side`` are detected on a downscaled copy (area
  interpolation) and the results mapped back to the original pixels.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from util.assets import require_file

# the pyproject.toml extras that install each backend (run in the checkout), and their packages
MTCNN_INSTALL = 'pip install -e ".[mtcnn-tf]" (the packages: mtcnn tensorflow-cpu)'
DLIB_INSTALL = 'pip install -e ".[dlib]" (the packages: dlib-bin face_recognition_models)'
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_HELP = (
    "Get it with `pip install face_recognition_models` (found automatically) or download "
    "http://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2, unpack it with bunzip2 "
    "and pass its path with --dlib_predictor."
)
# 0-based indices into dlib's 68 points (1-based 37&40, 43&46, 31, 49, 55), as the original
LM68_LEFT_EYE = (36, 39)
LM68_RIGHT_EYE = (42, 45)
LM68_NOSE, LM68_MOUTH_LEFT, LM68_MOUTH_RIGHT = 30, 48, 54


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays, compare them with numpy
class Detection:
    """One face.

    Attributes:
        box: (4,) float64 ``x, y, w, h`` of the face box, image pixels.
        score: detector confidence; a probability in [0, 1] for mtcnn/torch, dlib's SVM margin
            (typically 0..3) for dlib.
        lm5: (5, 2) float64 points ``x, y`` in image pixels, order left eye, right eye, nose tip,
            left mouth corner, right mouth corner (image-left = "left").
        lm68: (68, 2) float64 dlib 68 points (iBUG order, 0-based) when the backend computed
            them (dlib), else None.
    """

    box: np.ndarray
    score: float
    lm5: np.ndarray
    lm68: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float(max(self.box[2], 0.0) * max(self.box[3], 0.0))

    @property
    def interocular(self) -> float:
        """Distance between the two eye points, pixels."""
        return float(np.linalg.norm(self.lm5[1] - self.lm5[0]))


class DetectorUnavailableError(RuntimeError):
    """A backend's package or module is missing; the message says how to install it."""


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is an (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {got.strip()}")


def downscale(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float, float]:
    """Shrink ``image`` so that its longer side is at most ``max_side`` (area interpolation).

    Returns ``(small, sx, sy)`` with ``sx = small_w / w`` and ``sy = small_h / h`` (1.0 when the
    image is already small enough; ``small`` is then ``image`` itself).
    """
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0, 1.0
    import cv2

    f = max_side / max(h, w)
    sw, sh = max(1, round(w * f)), max(1, round(h * f))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    return small, sw / w, sh / h


def to_original(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Map (..., 2) point coordinates from a resized copy back to the original (pixel centres)."""
    p = np.asarray(points, dtype=np.float64)
    if sx == 1.0 and sy == 1.0:
        return p.copy()
    return (p + 0.5) / np.array([sx, sy]) - 0.5


def _box_to_original(box: np.ndarray, sx: float, sy: float) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    if sx == 1.0 and sy == 1.0:
        return b.copy()
    return np.array([b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy])


def lm5_from_lm68(lm68: np.ndarray) -> np.ndarray:
    """(68, 2) dlib points -> (5, 2) in detection order, as the original Deep3DFaceRecon does."""
    lm68 = np.asarray(lm68, dtype=np.float64)
    if lm68.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm68.shape}")
    return np.stack([
        lm68[list(LM68_LEFT_EYE)].mean(0), lm68[list(LM68_RIGHT_EYE)].mean(0),
        lm68[LM68_NOSE], lm68[LM68_MOUTH_LEFT], lm68[LM68_MOUTH_RIGHT],
    ])


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
    """``path`` or the default predictor; raises MissingAssetError (FileNotFoundError) if missing."""
    if path is None:
        path = default_predictor_path()
        if path is None:
            return require_file(PREDICTOR_FILE, "dlib 68-point predictor", PREDICTOR_HELP)
    return require_file(path, "dlib 68-point predictor", PREDICTOR_HELP)


class FaceDetector:
    """Base class: input checks and the downscale/upscale around a backend's ``_detect``.

    Subclasses implement ``_detect(image) -> list[Detection]`` in the pixels of ``image``.
    ``default_min_score`` is the confidence below which process_images treats a face as weak.
    """

    name = "base"
    default_min_score = 0.0
    needs_original = False  # True: _refine needs the full-resolution image (dlib's 68 points)
    devices: tuple[str, ...] = ("cpu",)  # device types the backend can run on

    def __init__(self, max_side: int | None = 1600):
        if max_side is not None and max_side < 64:
            raise ValueError(f"max_side must be >= 64 pixels, got {max_side}")
        self.max_side = max_side

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in ``image`` ((H, W, 3) uint8 RGB), best score first, original pixels."""
        return self.detect_prepared([self.prepare(image)], [image])[0]

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Check ``image`` and shrink it to ``max_side``: ``(small, sx, sy)`` as :func:`downscale`.
        Cheap to run in a loader process, ahead of :meth:`detect_prepared`."""
        check_image(image)
        return downscale(image, self.max_side)

    def detect_prepared(self, prepared: Sequence[tuple[np.ndarray, float, float]],
                        originals: Sequence[np.ndarray | None] | None = None) -> list[list[Detection]]:
        """Faces of several images given as :meth:`prepare` made them, each image's list as
        :meth:`detect` gives it (best score first, original pixels). ``originals``: the full
        images, needed only by backends that refine on them (:attr:`needs_original`).

        Backends with a batched model (``torch``) detect all images in one call; the others one
        after another. Either way every image's faces are those it gets alone."""
        originals = list(originals) if originals is not None else [None] * len(prepared)
        raw = self._detect_many([p[0] for p in prepared])
        out = []
        for faces, (_, sx, sy), image in zip(raw, prepared, originals):
            mapped = []
            for d in faces:
                lm68 = None if d.lm68 is None else to_original(d.lm68, sx, sy)
                mapped.append(Detection(box=_box_to_original(d.box, sx, sy), score=float(d.score),
                                        lm5=to_original(d.lm5, sx, sy), lm68=lm68))
            if self.needs_original:
                if image is None:
                    raise ValueError(f"the {self.name} detector refines on the full image: pass originals")
                mapped = self._refine(image, mapped, (sx, sy))
            out.append(sorted(mapped, key=lambda d: -d.score))
        return out

    def _detect_many(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """``_detect`` on each image (in the small image's pixels); batched backends override."""
        return [self._detect(im) for im in images]

    def _detect(self, image: np.ndarray) -> list[Detection]:
        raise NotImplementedError

    def _refine(self, image: np.ndarray, faces: list[Detection], scale: tuple[float, float]) -> list[Detection]:
        """Hook run on the full-resolution image after mapping back; identity by default."""
        return faces


_MTCNN_MODELS: dict[str, object] = {}  # one TensorFlow model per process and device


class MTCNNDetector(FaceDetector):
    """The ``mtcnn`` PyPI package (TensorFlow). Its model is built once per process.

    ``threads`` > 0 limits TensorFlow's thread pools (only effective before TensorFlow first
    runs in this process); ``quiet`` keeps TensorFlow's and absl's log lines off the terminal
    (see :func:`tensorflow_quiet`); ``stage_kw`` go to ``MTCNN.detect_faces`` (e.g. ``min_face_size``).
    """

    name = "mtcnn"
    default_min_score = 0.9

    def __init__(self, max_side: int | None = 1600, device: str = "CPU:0", threads: int = 0, quiet: bool = True,
                 **stage_kw):
        super().__init__(max_side)
        self.stage_kw = stage_kw
        self._model = _load_mtcnn(device, threads, quiet)

    def _detect(self, image: np.ndarray) -> list[Detection]:
        if min(image.shape[:2]) < 12:  # smaller than MTCNN's 12-pixel network input
            return []
        rows = self._model.detect_faces(image, output_type="numpy", box_format="xywh",
                                        fit_to_image=True, limit_boundaries_landmarks=False,
                                        **self.stage_kw)
        return [_detection_from_mtcnn_row(r) for r in np.asarray(rows, dtype=np.float64).reshape(-1, 16)]


def _detection_from_mtcnn_row(row: np.ndarray) -> Detection:
    # mtcnn 1.0 numpy rows: [image_id, x, y, w, h, confidence, x1..x5, y1..y5] with points
    # ordered left eye, right eye, nose, mouth left, mouth right (its docstring says x/y
    # interleaved; the code - adjust_landmarks, limit_bboxes, parse_landmarks - stores all x first).
    return Detection(box=row[1:5].copy(), score=float(row[5]), lm5=np.stack([row[6:11], row[11:16]], axis=1))


@contextlib.contextmanager
def stderr_silenced(active: bool = True):
    """Send this process's file descriptor 2 to /dev/null inside the block (C/C++ libraries'
    messages included: TensorFlow prints its start-up lines through absl before any setting
    can stop them). Nothing happens when ``active`` is False."""
    if not active:
        yield
        return
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tensorflow_quiet() -> None:
    """TensorFlow's C++ logging down to errors (``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set
    it): call before TensorFlow is imported, in the process or in the parent of spawned workers."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _load_mtcnn(device: str, threads: int, quiet: bool = True):
    if device in _MTCNN_MODELS:
        return _MTCNN_MODELS[device]
    if importlib.util.find_spec("mtcnn") is None or importlib.util.find_spec("tensorflow") is None:
        raise DetectorUnavailableError(f"the 'mtcnn' detector needs the mtcnn and TensorFlow packages: {MTCNN_INSTALL}; "
                                       "or --detector torch, its PyTorch port without TensorFlow")
    if quiet:
        tensorflow_quiet()
    import warnings

    with stderr_silenced(quiet), warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")  # protobuf/Keras deprecation notes at import
        import tensorflow as tf
        from mtcnn import MTCNN

        if quiet:
            tf.get_logger().setLevel(logging.ERROR)
            logging.getLogger("absl").setLevel(logging.ERROR)
        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:  # TensorFlow already initialised in this process
                pass
        model = MTCNN(device=device)
        if quiet:  # the first run prints its own start-up lines (oneDNN): make it here, silenced
            model.detect_faces(np.zeros((24, 24, 3), np.uint8))
    _MTCNN_MODELS[device] = model
    return model


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
            out.append(Detection(box=d.box, score=d.score, lm5=lm5_from_lm68(lm68), lm68=lm68))
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


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``x, y, w, h`` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


class TorchMTCNNDetector(FaceDetector):
    """The PyTorch port of MTCNN in ``models/mtcnn_torch.py`` (``TorchMTCNN``), on the CPU or CUDA.

    :meth:`detect_prepared` runs the port's ``detect_batch`` on all its images at once (on CUDA
    that is what makes it fast); each image's faces are those it gets alone. ``threads`` > 0
    sets torch's CPU threads of this process.
    """

    name = "torch"
    default_min_score = 0.9
    devices = ("cpu", "cuda")

    def __init__(self, max_side: int | None = 1600, device: str = "cpu", threads: int = 0):
        super().__init__(max_side)
        try:
            from models.mtcnn_torch import TorchMTCNN
        except ModuleNotFoundError as e:
            if e.name not in ("models", "models.mtcnn_torch"):
                raise
            raise DetectorUnavailableError(
                "the 'torch' detector needs models/mtcnn_torch.py (class TorchMTCNN), which is not in "
                "this checkout; use --detector mtcnn (default) or dlib") from None
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self._model = TorchMTCNN(device=device)

    def _detect_many(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [[_detection_from_port(f) for f in faces] for faces in self._model.detect_batch(images)]

    def _detect(self, image: np.ndarray) -> list[Detection]:
        return self._detect_many([image])[0]


def _detection_from_port(f: dict) -> Detection:
    return Detection(box=np.asarray(f["box"], dtype=np.float64).reshape(4), score=float(f["confidence"]),
                     lm5=np.asarray(f["keypoints"], dtype=np.float64).reshape(5, 2))


DETECTORS = {
    "mtcnn": MTCNNDetector,
    "dlib": DlibDetector,
    "torch": TorchMTCNNDetector,
}


DEFAULT_CPU_DETECTOR = "mtcnn"  # the reference; "torch" is the default where CUDA is (batched)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_device_files() -> bool:
    """Whether the machine shows a GPU device file (NVIDIA's, or WSL's): torch's CUDA check
    costs an import of torch, which is not needed to know there is no GPU at all."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


def resolve_detector_device(detector: str = "auto", device: str = "auto") -> tuple[str, str]:
    """process_images' ``--detector`` and ``--device`` -> (backend name, device).

    ``device`` 'auto': CUDA when a CUDA device is present and the backend runs there, else 'cpu'.
    ``detector`` 'auto': the torch port on CUDA, else :data:`DEFAULT_CPU_DETECTOR` (the mtcnn
    package). Raises ValueError (one line, what to do) for CUDA asked where torch sees none, or
    for a backend that does not run on CUDA.
    """
    if detector != "auto" and detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(DETECTORS)} or auto")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        runs_on_cuda = detector == "auto" or "cuda" in DETECTORS[detector].devices
        device = "cuda" if runs_on_cuda and _gpu_device_files() and _cuda_available() else "cpu"
    elif device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device; "
                             "use --device cpu (or auto)")
    if detector == "auto":
        detector = "torch" if device.startswith("cuda") else DEFAULT_CPU_DETECTOR
    if device.startswith("cuda") and "cuda" not in DETECTORS[detector].devices:
        raise ValueError(f"the {detector} detector runs on the CPU only; use --detector torch for --device {device}")
    return detector, device


def create_detector(name: str = "mtcnn", **kw) -> FaceDetector:
    """Build the detector ``name`` (one of :data:`DETECTORS`); ``kw`` go to its constructor.

    Raises ValueError for an unknown name and DetectorUnavailableError when its package is missing.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](**kw)
