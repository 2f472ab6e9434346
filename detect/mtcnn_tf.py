"""The ``mtcnn`` package backend (TensorFlow, CPU): the reference detector of process_images.

The only module that imports mtcnn or TensorFlow, lazily: importing it loads nothing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import numpy as np

from detect.base import Detection, DetectorUnavailableError, FaceDetector

# the pyproject.toml extra that installs this backend (run in the checkout), and its packages
MTCNN_INSTALL = 'pip install -e ".[mtcnn-tf]" (the packages: mtcnn tensorflow-cpu)'


_MTCNN_MODELS: dict[str, object] = {}  # one TensorFlow model per process and device


class MTCNNDetector(FaceDetector):
    """The ``mtcnn`` PyPI package (TensorFlow). Its model is built once per process.

    Args:
        max_side: see :class:`FaceDetector`.
        device: TensorFlow's device name.
        threads: > 0 limits TensorFlow's thread pools (only effective before TensorFlow first
            runs in this process).
        quiet: keep TensorFlow's and absl's log lines off the terminal (:func:`tensorflow_quiet`).
        **stage_kw: passed to ``MTCNN.detect_faces`` (e.g. ``min_face_size``).

    Raises:
        DetectorUnavailableError: mtcnn or TensorFlow is not installed (the message says how).
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
        raise DetectorUnavailableError(
            f"the 'mtcnn' detector needs the mtcnn and TensorFlow packages: {MTCNN_INSTALL}; "
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
