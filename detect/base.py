"""The detector interface: typed detections and the base class every backend derives from.

    faces = detector.detect(image)             # image: (H, W, 3) uint8 RGB
    faces[0].lm5                               # (5, 2) float64, image pixels

Conventions shared by every backend:

- coordinates are in pixels of the image given to :meth:`FaceDetector.detect`, x to the right,
  y down, origin at the top-left pixel's centre (pixel (0, 0) is at 0, 0);
- the 5 points are, in this order: left eye centre, right eye centre, nose tip, left mouth
  corner, right mouth corner, where "left" means image-left for an upright face (the subject's
  right), the order of the original Deep3DFaceRecon detection files (util/landmarks.py);
- images whose longer side exceeds ``max_side`` are detected on a downscaled copy (area
  interpolation) and the results mapped back to the original pixels.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from util.checks import check_shape
from util.landmarks import scale_points


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
    """Check a detector's input.

    Args:
        image: the photo.

    Raises:
        ValueError: ``image`` is not an (H, W, 3) uint8 RGB ``numpy.ndarray``.
    """
    check_shape(image, ("H", "W", 3), "image (uint8 RGB)")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')}")


def downscale(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float, float]:
    """Shrink ``image`` so that its longer side is at most ``max_side`` (area interpolation).

    Args:
        image: (H, W, C) array.
        max_side: the longest side allowed, pixels; None or 0: no limit.

    Returns:
        ``(small, sx, sy)``: the (h, w, C) copy with ``sx = w / W`` and ``sy = h / H``; ``image``
        itself and 1.0, 1.0 when it is small enough already.
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
    """(..., 2) points of a :func:`downscale` copy -> (..., 2) float64 original pixels
    (:func:`util.landmarks.scale_points`)."""
    return scale_points(points, sx, sy)


def box_to_original(box: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """(4,) ``x, y, w, h`` box of a :func:`downscale` copy -> (4,) float64 original pixels."""
    b = np.asarray(box, dtype=np.float64)
    if sx == 1.0 and sy == 1.0:
        return b.copy()
    return np.array([b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``x, y, w, h`` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


class FaceDetector(ABC):
    """Base class: input checks and the downscale/upscale around a backend's ``_detect``.

    Subclasses implement ``_detect(image) -> list[Detection]`` in the pixels of ``image`` (or
    override ``_detect_many`` for a batched model). Class attributes: ``name`` (the
    ``--detector`` name), ``default_min_score`` (the confidence below which process_images
    treats a face as weak), ``needs_original`` (``_refine`` needs the full-resolution image),
    ``devices`` (device types the backend runs on).

    Args:
        max_side: detect on a copy whose longer side is at most this many pixels (>= 64), None:
            on the image as given.

    Raises:
        ValueError: ``max_side`` below 64.
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
        """All faces in one photo.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            the faces, best score first, in the original's pixels.

        Raises:
            ValueError: ``image`` is not (H, W, 3) uint8.
        """
        return self.detect_prepared([self.prepare(image)], [image])[0]

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Check ``image`` ((H, W, 3) uint8, else ValueError) and shrink it to ``max_side``:
        ``(small, sx, sy)`` as :func:`downscale`. Cheap to run in a loader process, ahead of
        :meth:`detect_prepared`."""
        check_image(image)
        return downscale(image, self.max_side)

    def detect_prepared(self, prepared: Sequence[tuple[np.ndarray, float, float]],
                        originals: Sequence[np.ndarray | None] | None = None) -> list[list[Detection]]:
        """Faces of several images given as :meth:`prepare` made them.

        Backends with a batched model (``torch``) detect all images in one call; the others one
        after another. Either way every image's faces are those it gets alone.

        Args:
            prepared: N ``(small, sx, sy)`` from :meth:`prepare`.
            originals: the N full (H, W, 3) images, needed only by backends that refine on them
                (:attr:`needs_original`); None entries otherwise.

        Returns:
            N lists of faces as :meth:`detect` gives them (best score first, original pixels).

        Raises:
            ValueError: a backend that refines on the full image got no original.
        """
        originals = list(originals) if originals is not None else [None] * len(prepared)
        raw = self._detect_many([p[0] for p in prepared])
        out = []
        for faces, (_, sx, sy), image in zip(raw, prepared, originals):
            mapped = []
            for d in faces:
                lm68 = None if d.lm68 is None else to_original(d.lm68, sx, sy)
                mapped.append(Detection(box=box_to_original(d.box, sx, sy), score=float(d.score),
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

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[Detection]:
        """The faces of one (h, w, 3) uint8 image, in its own pixels."""

    def _refine(self, image: np.ndarray, faces: list[Detection], scale: tuple[float, float]) -> list[Detection]:
        """Hook run on the full-resolution image after mapping back; identity by default."""
        return faces
