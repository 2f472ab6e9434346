"""Per-face arrays for the optional outputs (UV textures, the HTML report), made on the device.

:func:`texture_arrays` and :func:`report_arrays` (the ``make`` of the output registry's texture and
report entries, :mod:`pipeline.outputs`) add to a batch's tensors what :mod:`util.uv_texture` and
:mod:`util.report` need beyond the mesh and the picture: each vertex's visibility in the photo (from the render's
depth and the normal's angle to the line of sight), the albedo, and the photometric residual of
the fit. All batched, on the render's device; bytes where the files hold bytes.
"""
from __future__ import annotations

import torch

DEPTH_TOLERANCE = 0.05  # camera units (dm): a vertex within this of the rendered depth is the visible surface
GRAZING = (0.1, 0.4)  # cosine of the view angle: weight 0 at or below the first, 1 at or above the second


def vertex_visibility(face_model, face, depth: torch.Tensor) -> torch.Tensor:
    """(B, N) uint8 visibility weight of each vertex in the crop: 255 where the vertex is the
    rendered surface at its pixel (depth within :data:`DEPTH_TOLERANCE`) and faces the camera,
    fading to 0 between the two :data:`GRAZING` cosines, 0 where hidden or outside the crop.

    Args: face: :class:`models.bfm.FaceOutput` of the batch; depth: (B, 1, H, W) the render's
    depth (camera z, 0 where nothing is drawn), pixel centres as the renderer's docstring gives.
    """
    v = face.vertex
    normal = face_model.compute_norm(face.shape) @ face.rotation  # model space
    normal = normal * normal.new_tensor([1.0, 1.0, -1.0])  # camera space (z' = d - z)
    cos = -(normal * v).sum(-1) / v.norm(dim=-1)  # towards the camera at the origin
    facing = ((cos - GRAZING[0]) / (GRAZING[1] - GRAZING[0])).clamp(0, 1)
    b, _, h, w = depth.shape
    z = v[..., 2]
    col = (face_model.focal * v[..., 0] / z + face_model.center - 0.5).round().long()
    row = (face_model.center - face_model.focal * v[..., 1] / z - 0.5).round().long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1))
    d = depth.reshape(b, h * w).gather(1, flat)
    seen = inside & (d > 0) & ((d - z).abs() < DEPTH_TOLERANCE)
    return (255.0 * facing * seen).round().to(torch.uint8)


def photometric_error(render, images_u8: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean absolute difference, in 0..255 grey levels over the three channels,
    between the render and the crop where the face is drawn (NaN where nothing is)."""
    mask = render.mask
    diff = (render.image.float() * 255.0 - images_u8.to(render.image.device).float()).abs() * mask
    return (diff.sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3)))).float()


def texture_arrays(model, face, render, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a UV texture needs beyond the mesh and the crop: ``visibility`` (B, N) uint8
    (:func:`vertex_visibility`) and ``albedo`` (B, N, 3) uint8 (the model's colours without light).

    Args:
        model: the run's :class:`models.facerecon.FaceReconModel`; face: its
            :class:`models.bfm.FaceOutput` of the batch; render: the renderer's output for it
            (``depth`` (B, 1, H, W)); images_u8: (B, 3, H, W) uint8 crops (unused).
    """
    return {"visibility": vertex_visibility(model.face_model, face, render.depth),
            "albedo": torch.clamp(255.0 * face.texture, 0, 255).to(torch.uint8)}


def report_arrays(model, face, render, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the report needs beyond the mesh and the picture: ``photo_error`` (B,) float32
    (:func:`photometric_error` of the render against the (B, 3, H, W) uint8 crops)."""
    return {"photo_error": photometric_error(render, images_u8)}
