"""The renderer's interface: camera-space mesh -> mask, depth and interpolated features.

A :class:`MeshRenderer` is the composition of a :class:`ClipProjection` (camera space -> clip
space, shared by every backend) and a :class:`Rasterizer` backend (clip-space triangles ->
covered pixels and perspective-correct attribute interpolation). The backends live in
``cpu.py`` (pure PyTorch) and ``nvdiffrast_backend.py`` (nvdiffrast's CUDA or OpenGL
rasterizer); they agree on every convention below, which are nvdiffrast's.

Conventions (those of the original Deep3DFaceRecon_pytorch renderer, ``util/nvdiffrast.py``):

* Camera space: x right, y up, z = positive distance in front of the camera (a face at ~10).
* Clip space: the original appends 1, negates y and multiplies by ``P @ diag(1, -1, -1, 1)``
  with the OpenGL frustum ``P`` of half-width ``x0 = tan(fov/2) * z_near``,
  ``fov = 2 * atan(center / focal)``. Worked out::

      clip = (s*x, -s*y, a*z + b, z),   s = z_near / x0 = focal / center,
      a = (f + n) / (f - n),  b = -2 f n / (f - n)   (n = z_near, f = z_far)

  so NDC z = clip_z / clip_w is -1 at z = z_near, +1 at z = z_far and grows with distance.
* Image: pixel (row i, col j) samples NDC x = (j + 0.5) / W * 2 - 1, y = (i + 0.5) / H * 2 - 1;
  row 0 is NDC y = -1, i.e. camera y *up* maps to small row indices: the output is a normal
  top-down image, and the projected pixel of a camera point is
  ``col = focal * x / z + center - 0.5``, ``row = center - focal * y / z - 0.5``
  (in "pixel-centre" units where integer values are pixel centres).
* Coverage is point-sampled at pixel centres; the nearest fragment (smallest NDC z) wins;
  geometry outside ``z_near <= z <= z_far`` is clipped; no face culling (both windings render);
  no antialiasing, hence no silhouette gradients (as in the original).
* Depth = camera z interpolated at the visible surface. One deliberate difference: the original
  passes z as a 2-D (B*N, 1) attribute, which nvdiffrast does not offset per batch element in
  instance mode, so its depth for elements 1..B-1 used element 0's z; here each element uses
  its own. The original never reads the depth (only the mask and the features).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn

from util.checks import check_shape


@dataclass(frozen=True)
class RenderOutput:
    """What :class:`MeshRenderer` returns for a batch of B meshes (H = W = image size).

    All three have the dtype and device of the input vertices (the mask carries no gradient).
    Row 0 is the top of the image (camera y up maps to small rows).

    Attributes:
        mask: (B, 1, H, W) float {0, 1}: 1 where some triangle covers the pixel centre.
        depth: (B, 1, H, W) camera-space z of the visible surface where covered, 0 elsewhere.
        image: (B, C, H, W) perspective-correct interpolation of the per-vertex features where
            covered, 0 elsewhere; None when no features were given.
    """

    mask: torch.Tensor
    depth: torch.Tensor
    image: torch.Tensor | None = None


@dataclass(frozen=True)
class ClipProjection:
    """The original's pinhole camera as an OpenGL projection to clip space.

    Attributes:
        focal: focal length in pixels.
        center: principal point in pixels, the same for x and y (the image is ``int(2 * center)``
            pixels square).
        z_near, z_far: clipping distances (camera units).

    Raises:
        ValueError: (on construction) focal or center <= 0, not 0 < z_near < z_far, or an image
            size below 1.
    """

    focal: float = 1015.0
    center: float = 112.0
    z_near: float = 5.0
    z_far: float = 15.0

    def __post_init__(self):
        if not (self.focal > 0 and self.center > 0):
            raise ValueError(f"focal and center must be positive, got focal={self.focal}, center={self.center}")
        if not (0 < self.z_near < self.z_far):
            raise ValueError(f"need 0 < z_near < z_far, got z_near={self.z_near}, z_far={self.z_far}")
        if int(2 * self.center) < 1:
            raise ValueError(f"image size int(2 * center) must be >= 1, got center={self.center}")

    @property
    def image_size(self) -> int:
        """Height = width of the rendered image in pixels."""
        return int(2 * self.center)

    @property
    def fov(self) -> float:
        """Full field of view in radians."""
        return 2.0 * math.atan(self.center / self.focal)

    def matrix(self) -> torch.Tensor:
        """(4, 4) float64 ``M = P @ diag(1, -1, -1, 1)``, to apply to ``(x, -y, z, 1)``.

        Built exactly as the original does (the fov round-trips through degrees there too);
        :meth:`to_clip` uses the same numbers.
        """
        n, f = self.z_near, self.z_far
        fov_deg = self.fov * 180.0 / math.pi
        x0 = math.tan(math.radians(fov_deg * 0.5)) * n
        frustum = torch.tensor([[n / x0, 0.0, 0.0, 0.0],
                                [0.0, -n / x0, 0.0, 0.0],
                                [0.0, 0.0, -(f + n) / (f - n), -2.0 * f * n / (f - n)],
                                [0.0, 0.0, -1.0, 0.0]], dtype=torch.float64)
        return frustum @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))

    def to_clip(self, vertex: torch.Tensor) -> torch.Tensor:
        """Camera-space (..., 3) -> clip-space (..., 4) ``(s*x, -s*y, a*z + b, z)``, same dtype.

        Equal to ``matrix() @ (x, -y, z, 1)`` (the zero entries are skipped, which changes
        nothing but the cost).
        """
        m = self.matrix().tolist()
        x, y, z = vertex.unbind(-1)
        return torch.stack([m[0][0] * x, m[1][1] * -y, m[2][2] * z + m[2][3], m[3][2] * z], dim=-1)


class Rasterizer(abc.ABC):
    """A backend: rasterize clip-space triangles and interpolate vertex attributes.

    Subclasses set ``name`` and implement :meth:`rasterize_interpolate`.
    """

    name: str = ""

    @abc.abstractmethod
    def rasterize_interpolate(self, clip: torch.Tensor, tri: torch.Tensor, attr: torch.Tensor,
                              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render B instances of one triangle list.

        Args:
            clip: (B, N, 4) clip-space vertices (float32 or float64).
            tri: (M, 3) int64 vertex indices, 0-based, shared by the whole batch.
            attr: (B, N, K) per-vertex attributes, same dtype as ``clip``.
            size: (H, W) of the output.

        Returns:
            mask: (B, H, W) bool, pixel centre covered.
            attr_image: (B, H, W, K) interpolated attributes (0 where not covered), dtype of
            ``attr``, differentiable w.r.t. ``attr`` (and, away from silhouettes, ``clip``).
        """

    def extra_repr(self) -> str:
        return self.name


def _check_inputs(vertex: torch.Tensor, tri: torch.Tensor, feat: torch.Tensor | None) -> None:
    """Raise ValueError unless vertex (B, N, 3) float, tri (M, 3) integer and feat (B or 1, N, C)
    share vertex's device (the message names the argument)."""
    sizes = check_shape(vertex, ("B", "N", 3), "vertex")
    if not vertex.is_floating_point():
        raise ValueError(f"vertex must be floating point, got {vertex.dtype}")
    check_shape(tri, ("M", 3), "tri")
    if tri.is_floating_point() or tri.is_complex() or tri.dtype == torch.bool:
        raise ValueError(f"tri must hold integer vertex indices, got {tri.dtype}")
    if tri.device != vertex.device:
        raise ValueError(f"tri is on {tri.device} but vertex is on {vertex.device}")
    if feat is not None:
        batch = 1 if getattr(feat, "ndim", 0) == 3 and feat.shape[0] == 1 else "B"  # one feat for all faces
        check_shape(feat, (batch, "N", "C"), "feat", dict(sizes))
        if feat.device != vertex.device:
            raise ValueError(f"feat is on {feat.device} but vertex is on {vertex.device}")


class MeshRenderer(nn.Module):
    """Render camera-space triangle meshes: ``renderer(vertex, tri, feat) -> RenderOutput``.

    Build one with :func:`models.renderer.create_renderer`. The module has no parameters or
    buffers; outputs follow the device and dtype of ``vertex``.

    Args:
        rasterizer: the backend (:class:`CpuRasterizer <models.renderer.cpu.CpuRasterizer>` or
            :class:`NvdiffrastRasterizer <models.renderer.nvdiffrast_backend.NvdiffrastRasterizer>`).
        projection: the camera (the original's by default).
    """

    def __init__(self, rasterizer: Rasterizer, projection: ClipProjection = ClipProjection()):
        super().__init__()
        self.rasterizer = rasterizer
        self.projection = projection

    @property
    def backend(self) -> str:
        """'cpu', 'cuda' or 'opengl'."""
        return self.rasterizer.name

    @property
    def image_size(self) -> int:
        """Height = width of the rendered images in pixels (:attr:`ClipProjection.image_size`)."""
        return self.projection.image_size

    def extra_repr(self) -> str:
        p = self.projection
        return (f"backend={self.backend!r}, image_size={p.image_size}, focal={p.focal}, center={p.center}, "
                f"z_near={p.z_near}, z_far={p.z_far}")

    def forward(self, vertex: torch.Tensor, tri: torch.Tensor, feat: torch.Tensor | None = None) -> RenderOutput:
        """Render a batch of meshes sharing one triangle list.

        Args:
            vertex: (B, N, 3) float camera-space vertices (x right, y up, z > 0 in front).
            tri: (M, 3) integer, 0-based vertex indices (either winding renders).
            feat: optional (B, N, C) per-vertex features (or (1, N, C), broadcast), e.g. colours.

        Returns:
            :class:`RenderOutput` with mask (B,1,H,W), depth (B,1,H,W), image (B,C,H,W) or None,
            H = W = :attr:`image_size`; dtype and device of ``vertex``.

        Raises:
            ValueError: a shape, dtype or device does not fit (the message names the argument), or
                an nvdiffrast backend gets tensors that are not on a CUDA device.
            IndexError: (CPU backend) ``tri`` holds an index outside 0..N-1.
            NvdiffrastUnavailableError: nvdiffrast cannot be imported, built or its context created.
        """
        _check_inputs(vertex, tri, feat)
        b, n, _ = vertex.shape
        size = self.projection.image_size
        attr = vertex[..., 2:]  # camera z, interpolated into the depth map
        if feat is not None:
            attr = torch.cat([attr, feat.to(vertex.dtype).expand(b, n, -1)], dim=-1)
        clip = self.projection.to_clip(vertex)
        mask, attr_image = self.rasterizer.rasterize_interpolate(
            clip.contiguous(), tri.long().contiguous(), attr.contiguous(), (size, size))
        mask = mask.to(vertex.dtype).unsqueeze(1)
        attr_image = attr_image.permute(0, 3, 1, 2) * mask
        image = attr_image[:, 1:] if feat is not None else None
        return RenderOutput(mask=mask, depth=attr_image[:, :1], image=image)
