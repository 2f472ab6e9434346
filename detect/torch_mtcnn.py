"""The PyTorch MTCNN backend (detect/mtcnn_port): the mtcnn package's results without TensorFlow,
batched, on the CPU or CUDA. Importing it loads nothing (torch is imported by the constructor).
"""
from __future__ import annotations

import numpy as np

from detect.base import Detection, FaceDetector


class TorchMTCNNDetector(FaceDetector):
    """The PyTorch port of MTCNN (:class:`detect.mtcnn_port.detector.TorchMTCNN`).

    :meth:`detect_prepared` runs the port's ``detect_batch`` on all its images at once (on CUDA
    that is what makes it fast); each image's faces are those it gets alone.

    Args:
        max_side: see :class:`FaceDetector`.
        device: "cpu", "cuda" or "cuda:N".
        threads: > 0 sets torch's CPU threads of this process.

    Raises:
        FileNotFoundError: the MTCNN weight files are missing (the message says how to get them).
    """

    name = "torch"
    default_min_score = 0.9
    devices = ("cpu", "cuda")

    def __init__(self, max_side: int | None = 1600, device: str = "cpu", threads: int = 0):
        super().__init__(max_side)
        import torch

        from detect.mtcnn_port.detector import TorchMTCNN

        if threads > 0:
            torch.set_num_threads(threads)
        self._model = TorchMTCNN(device=device)

    def _detect_many(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [[_detection_from_port(f) for f in faces] for faces in self._model.detect_batch(images)]

    def _detect(self, image: np.ndarray) -> list[Detection]:
        return self._detect_many([image])[0]


def _detection_from_port(f: dict) -> Detection:
    return Detection(box=np.asarray(f["box"], dtype=np.float64).reshape(4), score=float(f["confidence"]),
                     lm5=np.asarray(f["keypoints"], dtype=np.float64).reshape(5, 2))
