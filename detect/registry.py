"""The detector backends by name, and process_images' choice of backend and device.

    det = create_detector("mtcnn")            # or "dlib", "torch"
    faces = det.detect(image)                  # list of detect.base.Detection
"""
from __future__ import annotations

import os

from detect.base import FaceDetector
from detect.dlib68 import DlibDetector
from detect.mtcnn_tf import MTCNNDetector
from detect.torch_mtcnn import TorchMTCNNDetector

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


def resolve_detector_device(detector: str = "auto", device: str = "auto", verify: bool = True) -> tuple[str, str]:
    """process_images' ``--detector`` and ``--device`` -> (backend name, device).

    Args:
        detector: a name of :data:`DETECTORS` or 'auto': the torch port on CUDA, else
            :data:`DEFAULT_CPU_DETECTOR` (the mtcnn package).
        device: 'auto' (CUDA when a CUDA device is present and the backend runs there, else
            'cpu'), 'cpu', 'cuda' or 'cuda:N'.
        verify: ask torch whether it sees a CUDA device (imports torch). False: where the
            machine shows a GPU, CUDA is taken on trust (the caller then calls :func:`check_cuda`,
            e.g. while worker processes start); where it shows none, 'cuda' is checked at once.

    Returns:
        ``(backend name, device)``.

    Raises:
        ValueError: (one line, what to do) an unknown name, CUDA asked where torch sees none, or
            a backend that does not run on CUDA.
    """
    if detector != "auto" and detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(DETECTORS)} or auto")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        runs_on_cuda = detector == "auto" or "cuda" in DETECTORS[detector].devices
        device = "cuda" if runs_on_cuda and _gpu_device_files() and (not verify or _cuda_available()) else "cpu"
    elif device.startswith("cuda") and (verify or not _gpu_device_files()):
        check_cuda(device)
    if detector == "auto":
        detector = "torch" if device.startswith("cuda") else DEFAULT_CPU_DETECTOR
    if device.startswith("cuda") and "cuda" not in DETECTORS[detector].devices:
        raise ValueError(f"the {detector} detector runs on the CPU only; use --detector torch for --device {device}")
    return detector, device


def check_cuda(device: str) -> None:
    """Raise ValueError (one line, what to do) unless torch sees a CUDA device; imports torch."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device; "
                         "use --device cpu (or auto)")


def create_detector(name: str = "mtcnn", **kw) -> FaceDetector:
    """Build a detector.

    Args:
        name: one of :data:`DETECTORS`.
        **kw: its constructor's arguments (``max_side``, ``device``, ``threads``, ...).

    Returns:
        the detector, its model loaded.

    Raises:
        ValueError: an unknown name, or a bad argument (``max_side`` < 64).
        DetectorUnavailableError: its package is missing (the message says how to install it).
        FileNotFoundError: its model file is missing (dlib predictor, MTCNN weights).
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](**kw)
