"""The reconstruction model: regressor -> face model -> renderer, composed (no hidden state).

``FaceReconModel(images)`` returns a :class:`Reconstruction` with every tensor the outputs need.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from models.bfm import FaceOutput, ParametricFaceModel
from util import precision


@dataclass(frozen=True)
class Reconstruction:
    """For a batch of B aligned 224x224 faces (H = W = the renderer's image size, 224).

    Attributes:
        coeffs: (B, 257) float32 (from :meth:`FaceReconModel.forward`; :meth:`~FaceReconModel.reconstruct`
            keeps the given tensor).
        face: :class:`FaceOutput` (vertices (B,N,3) camera space, colours, landmarks (B,68,2) crop
            pixels y up).
        mask: (B,1,H,W) {0,1}, 1 where the face covers the pixel, row 0 at the top.
        render: (B,3,H,W) lit face colours where covered (not clipped to 0..1), 0 elsewhere.
    """

    coeffs: torch.Tensor
    face: FaceOutput
    mask: torch.Tensor
    render: torch.Tensor


class FaceReconModel(nn.Module):
    """Compose a regressor (``net``), a :class:`ParametricFaceModel` and a renderer.

    Args:
        net: the regressor, (B, 3, 224, 224) -> (B, 257).
        face_model: coefficients -> mesh.
        renderer: a :class:`models.renderer.MeshRenderer`.
        amp: None, 'bf16' or 'fp16': autocast for the network only, on the images' device type
            (bf16 runs on the CPU too); the face model and the renderer always run in float32.
        channels_last: give the network its input in channels_last memory format.
        ieee_fp32: without ``amp``, run the network's float32 convolutions in full precision on
            CUDA (:func:`util.precision.ieee_fp32`), not in the TF32 that PyTorch lets cuDNN use
            by default; test.py's default (its ``--tf32`` turns it off).
    """

    def __init__(self, net: nn.Module, face_model: ParametricFaceModel, renderer: nn.Module,
                 amp: str | None = None, channels_last: bool = False, ieee_fp32: bool = False):
        super().__init__()
        self.net, self.face_model, self.renderer = net, face_model, renderer
        self.amp = None if amp in (None, "none") else amp
        self.channels_last = channels_last
        self.ieee_fp32 = ieee_fp32

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The network's autocast dtype: bfloat16 or float16 with ``amp``, else None (float32)."""
        if self.amp is None:
            return None
        return torch.bfloat16 if self.amp == "bf16" else torch.float16

    def network_precision(self, device: torch.device):
        """The context the network runs in on ``device``.

        Args:
            device: the images' device (its type picks the autocast device type).

        Returns:
            A context manager: autocast to bf16/fp16 with ``amp``, else full float32 where
            ``ieee_fp32`` (:func:`util.precision.ieee_fp32`), else a null context (PyTorch's settings).
        """
        if self.amp is not None:
            return torch.autocast(device_type=device.type, dtype=self.amp_dtype)
        if self.ieee_fp32:
            return precision.ieee_fp32(device)
        return contextlib.nullcontext()

    def predict_coeffs(self, images: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """The network's coefficients.

        Args:
            images: (B, 3, 224, 224) aligned crops, RGB in 0..1.
            net: run this module instead of ``self.net`` (train.py: its DistributedDataParallel
                wrapper), with the same input format and precision.

        Returns:
            (B, 257) float32 coefficients.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.network_precision(images.device):
            coeffs = (self.net if net is None else net)(images)
        return coeffs.float()

    def reconstruct(self, coeffs: torch.Tensor) -> Reconstruction:
        """Mesh and render of coefficients (differentiable; used by fitting too).

        Args:
            coeffs: (B, 257).

        Returns:
            :class:`Reconstruction` with the mesh, the (B, 3, H, W) render and its (B, 1, H, W) mask.
        """
        face = self.face_model(coeffs)
        out = self.renderer(face.vertex, self.face_model.face_buf, feat=face.color)
        return Reconstruction(coeffs=coeffs, face=face, mask=out.mask, render=out.image)

    def forward(self, images: torch.Tensor) -> Reconstruction:
        """:meth:`predict_coeffs`, then :meth:`reconstruct`.

        Args:
            images: (B, 3, 224, 224) aligned crops, RGB in 0..1, on the model's device.

        Returns:
            :class:`Reconstruction` of the predicted coefficients.

        Raises:
            ValueError: as :meth:`MeshRenderer.forward <models.renderer.MeshRenderer.forward>` for
                tensors it cannot take.
        """
        return self.reconstruct(self.predict_coeffs(images))
