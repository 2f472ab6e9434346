"""Face detection with 5 landmarks: the names this module has always offered, from the detect/ package.

Kept at the top of the checkout for scripts written against it (``import mtcnn_detector``); the
code lives in detect/ (detect/base.py: :class:`Detection` and :class:`FaceDetector`;
detect/registry.py: :func:`create_detector`; one module per backend). Library code imports
detect/ directly. Importing this module loads no detector (mtcnn, TensorFlow, dlib, torch).

    det = create_detector("mtcnn")            # or "dlib", "torch"
    faces = det.detect(image)                  # image: (H, W, 3) uint8 RGB
    faces[0].lm5                               # (5, 2) float64, image pixels, y down
"""
from __future__ import annotations

from detect.base import Detection, DetectorUnavailableError, FaceDetector, box_iou, check_image, downscale, to_original
from detect.dlib68 import (DLIB_INSTALL, PREDICTOR_FILE, PREDICTOR_HELP, Dlib68Landmarker, DlibDetector,
                           default_predictor_path, resolve_predictor_path)
from detect.mtcnn_tf import MTCNN_INSTALL, MTCNNDetector, stderr_silenced, tensorflow_quiet
from detect.registry import DEFAULT_CPU_DETECTOR, DETECTORS, create_detector, resolve_detector_device
from detect.torch_mtcnn import TorchMTCNNDetector
from util.landmarks import lm68_to_5 as lm5_from_lm68

__all__ = [
    "DEFAULT_CPU_DETECTOR", "DETECTORS", "DLIB_INSTALL", "MTCNN_INSTALL", "PREDICTOR_FILE", "PREDICTOR_HELP",
    "Detection", "DetectorUnavailableError", "Dlib68Landmarker", "DlibDetector", "FaceDetector", "MTCNNDetector",
    "TorchMTCNNDetector", "box_iou", "check_image", "create_detector", "default_predictor_path", "downscale",
    "lm5_from_lm68", "resolve_detector_device", "resolve_predictor_path", "stderr_silenced", "tensorflow_quiet",
    "to_original",
]
