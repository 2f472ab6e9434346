"""Per-photo confidences for image-set aggregation (Deng et al. 2019, Sec. 4).

The paper's C-Net predicts, for every photo of a set, a positive confidence vector over the 80
identity coefficients; the set's identity is the confidence-weighted mean of the photos'
identities. The authors never released that network (microsoft/Deep3DFaceReconstruction#182).
This module gives:

* ``fit`` (default): a confidence from how well each photo's own reconstruction explains it,
  ``c = 1 / (1 + (r_lm / sigma_lm)^2 + (r_photo / sigma_photo)^2)`` with ``r_lm`` the mean
  distance (crop pixels at 224) of the model's landmarks to the detected ones and ``r_photo``
  the mean robust colour distance (RGB 0..1) of the render to the photo over the rendered face
  (:func:`fit_residuals`): 1 for a perfect fit, decreasing in each residual, an inverse-variance
  weight if a photo's coefficient error grows in proportion to its residuals;
* ``uniform``: every photo weighs the same (the plain mean the authors found nearly as good);
* a trained network: the path of an exported program (``torch.export.save``, ``.pt2``, with a
  dynamic batch dimension) or a TorchScript file (``torch.jit.save``, any other suffix) whose
  module maps ``(images (B, 3, 224, 224) RGB 0..1, coeffs (B, 257))`` to positive confidences
  ``(B,)`` (one per photo) or ``(B, 80)`` (per identity coefficient, as the paper's C-Net).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from models.coeffs import COEFFS
from models.losses import lm68_to_5
from util.checks import check_shapes


@dataclass(frozen=True)
class FitResiduals:
    """How well B reconstructions explain their photos.

    landmark: (B,) mean distance of the projected landmarks to the given ones, pixels of a 224
    crop. photo: (B,) mean of ``sqrt(eps + |render - image|^2)`` (RGB 0..1) over the rendered
    face's pixels (0 where nothing is rendered).
    """

    landmark: torch.Tensor
    photo: torch.Tensor


@torch.no_grad()
def fit_residuals(model, images: torch.Tensor, coeffs: torch.Tensor, lm: torch.Tensor,
                  eps: float = 1e-6) -> FitResiduals:
    """Residuals of ``coeffs`` on their photos.

    Args:
        model: a :class:`models.facerecon.FaceReconModel` (face model and renderer).
        images: (B, 3, H, W) aligned crops, RGB 0..1. coeffs: (B, 257).
        lm: (B, 5, 2) or (B, 68, 2) landmarks of the photos, crop pixels, y up.
    """
    check_shapes(coeffs=(coeffs, ("B", None)), lm=(lm, ("B", "K", 2)))
    if lm.shape[1] not in (5, 68):
        raise ValueError(f"lm must have shape ({coeffs.shape[0]}, 5 or 68, 2), got {tuple(lm.shape)}")
    rec = model.reconstruct(coeffs)
    pred = rec.face.landmark if lm.shape[1] == 68 else lm68_to_5(rec.face.landmark)
    scale = 224.0 / images.shape[-1]
    landmark = (pred - lm.to(pred.dtype)).norm(dim=-1).mean(dim=1) * scale
    dist = torch.sqrt(eps + ((rec.render - images.to(rec.render.dtype)) ** 2).sum(dim=1, keepdim=True)) * rec.mask
    photo = dist.sum(dim=(1, 2, 3)) / rec.mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return FitResiduals(landmark=landmark, photo=photo)


class Confidence(Protocol):
    """Confidences of B photos: (B,) or (B, 80) positive (the larger, the more a photo counts)."""

    def __call__(self, images: torch.Tensor, coeffs: torch.Tensor, residuals: FitResiduals) -> torch.Tensor: ...


@dataclass(frozen=True)
class FitConfidence:
    """``1 / (1 + (r_lm / sigma_lm)^2 + (r_photo / sigma_photo)^2)`` (module docstring).

    sigma_lm: landmark residual (pixels at 224) that alone halves a photo's weight;
    sigma_photo: the same for the photometric residual (RGB distance 0..sqrt(3))."""

    sigma_lm: float = 2.0
    sigma_photo: float = 0.1

    def __call__(self, images: torch.Tensor, coeffs: torch.Tensor, residuals: FitResiduals) -> torch.Tensor:
        return 1.0 / (1.0 + (residuals.landmark / self.sigma_lm) ** 2 + (residuals.photo / self.sigma_photo) ** 2)


class UniformConfidence:
    """Every photo weighs 1 (the plain mean)."""

    def __call__(self, images: torch.Tensor, coeffs: torch.Tensor, residuals: FitResiduals) -> torch.Tensor:
        return torch.ones(coeffs.shape[0], device=coeffs.device, dtype=coeffs.dtype)


class TrainedConfidence:
    """A trained confidence network (module docstring); its outputs are checked."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        self.path = path
        try:
            if path.endswith(".pt2"):
                self.module = torch.export.load(path).module().to(device)
            else:
                self.module = torch.jit.load(path, map_location=device).eval()
        except Exception as e:  # noqa: BLE001 - any failure to load is the file's fault
            raise ValueError(f"--confidence {path}: not a network file (save it with torch.export.save as "
                             f".pt2, or torch.jit.save): {e}") from None

    def __call__(self, images: torch.Tensor, coeffs: torch.Tensor, residuals: FitResiduals) -> torch.Tensor:
        with torch.no_grad():
            c = self.module(images, coeffs).float()
        b = coeffs.shape[0]
        if c.shape not in ((b,), (b, COEFFS.id)):
            raise ValueError(f"confidence network {self.path} returned shape {tuple(c.shape)}; "
                             f"expected ({b},) or ({b}, {COEFFS.id})")
        if not bool(torch.isfinite(c).all()) or bool((c <= 0).any()):
            raise ValueError(f"confidence network {self.path} returned non-positive or non-finite confidences")
        return c


CONFIDENCES = {"fit": FitConfidence, "uniform": UniformConfidence}


def load_confidence(name_or_path: str, device: torch.device | str = "cpu") -> Confidence:
    """``fit`` | ``uniform`` | the path of a confidence network (.pt2 or TorchScript)."""
    if name_or_path in CONFIDENCES:
        return CONFIDENCES[name_or_path]()
    if os.path.isfile(name_or_path):
        return TrainedConfidence(name_or_path, device)
    raise ValueError(f"--confidence {name_or_path!r}: neither one of {sorted(CONFIDENCES)} nor a file "
                     "(an exported .pt2 or TorchScript confidence network)")
