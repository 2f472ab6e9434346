"""Differentiable mesh renderer with three interchangeable backends.

* ``'cpu'``: vectorised PyTorch (:mod:`models.renderer.cpu`), no extra dependency.
* ``'cuda'``: nvdiffrast's CUDA rasterizer (default on a CUDA device).
* ``'opengl'``: nvdiffrast's OpenGL context (needs EGL), the original's default.

All follow the original's camera and nvdiffrast's conventions (see :mod:`models.renderer.base`)::

    renderer = create_renderer("auto", device=device)
    out = renderer(vertex, tri, feat=color)   # out.mask, out.depth, out.image

nvdiffrast is imported only when a 'cuda' or 'opengl' renderer first renders.
"""
from __future__ import annotations

import torch

from .base import ClipProjection, MeshRenderer, Rasterizer, RenderOutput
from .cpu import CpuRasterizer
from .nvdiffrast_backend import PIP_PACKAGE, NvdiffrastRasterizer, nvdiffrast_available

__all__ = ["RenderOutput", "MeshRenderer", "create_renderer", "resolve_backend", "BACKENDS",
           "ClipProjection", "Rasterizer", "CpuRasterizer", "NvdiffrastRasterizer"]

BACKENDS = ("auto", "cpu", "cuda", "opengl")


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Turn a backend request into 'cpu', 'cuda' or 'opengl', checking that it can run.

    'auto' gives 'cuda' when ``device`` (default: torch's default device) is a CUDA device,
    else 'cpu'. 'cuda' and 'opengl' need a CUDA device and the nvdiffrast package (found, not
    imported).

    Args:
        backend: one of :data:`BACKENDS`.
        device: where the inputs will live (None: torch's default device).

    Returns:
        'cpu', 'cuda' or 'opengl'.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: 'cuda' or 'opengl' without a CUDA ``device``, without CUDA in this PyTorch,
            or without nvdiffrast; the message says what to install or to use ``--device cpu``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown renderer backend {backend!r}; expected one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if backend == "auto":
        backend = "cuda" if dev.type == "cuda" else "cpu"
    if backend == "cpu":
        return backend
    if device is not None and dev.type != "cuda":
        raise RuntimeError(f"the {backend!r} renderer (nvdiffrast) needs a CUDA device, got {dev}; "
                           f"use the 'cpu' renderer (`--device cpu`)")
    if not torch.cuda.is_available():
        raise RuntimeError(f"the {backend!r} renderer (nvdiffrast) needs CUDA, which this PyTorch cannot use "
                           f"(CUDA build: {torch.version.cuda}); run with `--device cpu`")
    if not nvdiffrast_available():
        raise RuntimeError(f"the {backend!r} renderer needs nvdiffrast: `pip install {PIP_PACKAGE}` (it builds "
                           f"its CUDA plugin on first use), or run with `--device cpu`")
    return backend


def create_renderer(backend: str = "auto", *, focal: float = 1015.0, center: float = 112.0,
                    z_near: float = 5.0, z_far: float = 15.0,
                    device: torch.device | str | None = None) -> MeshRenderer:
    """Build a :class:`MeshRenderer` for images of ``int(2 * center)`` pixels square.

    Args:
        backend: 'auto', 'cpu', 'cuda' or 'opengl' (see :func:`resolve_backend`).
        focal, center: pinhole camera in pixels (the original's defaults 1015 and 112).
        z_near, z_far: clipping distances in camera units (the original's 5 and 15).
        device: where inputs will live; only used to resolve and check ``backend``.

    Returns:
        The renderer (no parameters or buffers; nvdiffrast is imported at its first render).

    Raises:
        ValueError, RuntimeError: as :func:`resolve_backend`; ValueError also for a camera that
            :class:`ClipProjection` refuses (focal or center <= 0, not 0 < z_near < z_far).
    """
    name = resolve_backend(backend, device)
    projection = ClipProjection(focal=float(focal), center=float(center), z_near=float(z_near), z_far=float(z_far))
    rasterizer = CpuRasterizer() if name == "cpu" else NvdiffrastRasterizer(name)
    return MeshRenderer(rasterizer, projection)
