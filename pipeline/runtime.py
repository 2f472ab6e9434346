"""What test.py, train.py and the other runs share before they start: the device and set-up errors.

Library code raises :class:`SetupError` when a run cannot start; the command-line scripts print
its message in one line and exit with status 2.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The run cannot start (missing model files, bad options); the message says what to do."""


def torchrun_place() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun sets them (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``) for a run of several processes; None for one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def gpu_id_list(gpu_ids: str) -> list[int]:
    """The GPU ids of ``--gpu_ids`` (comma-separated; ``-1``: none)."""
    return [int(i) for i in str(gpu_ids).split(",") if i.strip() and int(i) >= 0]


def resolve_device(device: str, gpu_ids: str = "0", local_rank: int | None = None) -> torch.device:
    """The run's device from ``--device`` and ``--gpu_ids``.

    Args:
        device: ``auto`` (CUDA when available and ``gpu_ids`` is not -1, else the CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        gpu_ids: comma-separated GPU ids (``-1``: none); plain ``cuda`` takes the first.
        local_rank: this process's rank on its host when one process runs per GPU: rank r takes
            the r-th of several ``gpu_ids``, else GPU r.

    Returns:
        the device, with its index for CUDA (``cuda:N``).

    Raises:
        SetupError: CUDA was asked for and torch sees none.
    """
    ids = gpu_id_list(gpu_ids)
    if device == "auto":
        device = "cuda" if ids and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {device} asked for CUDA, but torch {torch.__version__} sees no CUDA "
                             "device; use --device cpu")
        if device == "cuda":
            if local_rank is None:
                idx = ids[0] if ids else 0
            else:  # one process per GPU: --gpu_ids 0,1 maps ranks to those ids, else rank r -> GPU r
                idx = ids[local_rank] if len(ids) > local_rank and len(ids) > 1 else local_rank
            device = f"cuda:{idx}"
    return torch.device(device)


def renderer_backend(device: torch.device, use_opengl: bool) -> str:
    """The rasterizer for ``device``: ``cpu`` (PyTorch), or nvdiffrast's ``cuda`` or ``opengl`` (EGL).

    ``use_opengl`` without CUDA logs a warning and gives ``cpu``.
    """
    if device.type != "cuda":
        if use_opengl:
            log.warning("--use_opengl True needs a CUDA device; rendering with the CPU rasterizer on %s", device)
        return "cpu"
    return "opengl" if use_opengl else "cuda"
