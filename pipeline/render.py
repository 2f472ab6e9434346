"""The render stage: face model and renderer on a batch's coefficients, made into the small
per-face numpy payloads (:class:`util.results_io.FaceResult`) the writers take."""
from __future__ import annotations

import numpy as np
import torch

from data.image_folder import FaceBatch
from models.coeffs import COEFFS
from pipeline.settings import OutputSpec
from util.checks import check_shapes


def colors_to_uint8(color: torch.Tensor) -> torch.Tensor:
    """(..., 3) float colours in 0..1 -> uint8 on their device: :func:`util.mesh_io.colors_to_uint8`'s
    bytes (one float32 product, clamp, truncation), so a quarter of the bytes leave the GPU."""
    return torch.clamp(255.0 * color, 0, 255).to(torch.uint8)


_STEPS: dict[torch.device, torch.Tensor] = {}


def overlay_uint8(image: torch.Tensor, render: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The result picture's middle panel, batched, on the render's device: the same bytes as
    :func:`util.visualize.overlay_uint8` (the original's float composition and tensor2im).

    Args: image (B, 3, H, W) uint8 crops; render (B, 3, H, W) float in 0..1; mask (B, 1, H, W)
    in {0, 1}, all on one device. Returns (B, H, W, 3) uint8. The render's bytes are found as in
    :func:`util.visualize.unit_to_uint8`: ``trunc(255 * x)``, then corrected by comparisons with
    the exact steps, so no device arithmetic (fused, reciprocal-multiplied, ...) can round
    differently from numpy (a ``torch.bucketize`` on the 255 steps gives the same, 5x slower on a CPU).
    """
    check_shapes(image=(image, ("B", 3, "H", "W")), render=(render, ("B", 3, "H", "W")),
                 mask=(mask, ("B", 1, "H", "W")))
    steps = _STEPS.get(render.device)
    if steps is None:  # copied once per device: a copy from pageable memory would wait for the queue
        from util.visualize import uint8_steps

        steps = _STEPS[render.device] = torch.from_numpy(uint8_steps()).to(render.device)
    x = render.permute(0, 2, 3, 1).float()
    k = (x * 255.0).clamp_(0, 255).to(torch.int32).clamp_(0, 255)  # within one of the byte; NaN's clamped
    k += (x >= steps[k + 1]).to(torch.int32)
    k -= (x < steps[k]).to(torch.int32)
    return torch.where(mask.permute(0, 2, 3, 1) != 0, k.to(torch.uint8), image.permute(0, 2, 3, 1))


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy tensors to host numpy arrays (same keys, shapes and dtypes): on CUDA all copies are
    queued (into pinned memory) and waited for once."""
    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    cuda = [t.device for t in tensors.values() if t.device.type == "cuda"]
    host = {k: t.to("cpu", non_blocking=bool(cuda)) for k, t in tensors.items()}
    if cuda:
        torch.cuda.current_stream(cuda[0]).synchronize()
    return {k: t.numpy() for k, t in host.items()}


def render_overlay(model, face, images_u8: torch.Tensor) -> torch.Tensor:
    """The render of ``face`` (a :class:`models.bfm.FaceOutput` of B faces) over the (B, 3, H, W)
    uint8 crops (any device; moved to the render's). Returns the picture's (B, H, W, 3) uint8
    middle panel (:func:`overlay_uint8`)."""
    out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
    return overlay_uint8(images_u8.to(out.image.device, non_blocking=True), out.image, out.mask)


def batch_results(model, coeffs: torch.Tensor, batch: FaceBatch, spec: OutputSpec) -> list:
    """The render stage: face model (and renderer) on a batch's coefficients -> one
    :class:`util.results_io.FaceResult` per face, holding what the enabled outputs need
    (:func:`pipeline.outputs.output_needs`), as small as the files allow: colours and the picture's
    middle panel are made bytes on the device (the picture's float work happens there, batched),
    vertices stay float32.

    Args:
        model: the run's :class:`models.facerecon.FaceReconModel`.
        coeffs: (B, 257) float32 final coefficients, on the model's device.
        batch: the faces' :class:`data.image_folder.FaceBatch` (``image`` (B, 3, 224, 224) uint8
            crops on the device or the host, ``lm`` (B, 5, 2)).
        spec: the outputs asked for.

    Returns:
        B results, in the batch's order, numpy arrays on the host.

    Raises:
        ValueError: ``coeffs`` or the batch's landmarks are not of the shapes above.
    """
    from pipeline.outputs import output_needs
    from util.results_io import FaceResult

    check_shapes(coeffs=(coeffs, ("B", COEFFS.total)), lm=(batch.lm, ("B", 5, 2)))
    needs, makers = output_needs(spec)
    need_mesh, need_render = "mesh" in needs, "render" in needs
    with torch.inference_mode():
        if not (need_mesh or need_render):  # coefficients and landmarks only
            arrays = {"coeffs": coeffs, "lm68": model.face_model.landmarks(coeffs)}
            face = None
        else:
            face = model.face_model(coeffs)
            arrays = {"coeffs": coeffs, "lm68": face.landmark}
        if need_mesh:
            arrays["vertex"], arrays["color"] = face.vertex, colors_to_uint8(face.color)
        made: dict[str, torch.Tensor] = {}
        if need_render:  # the render only when the picture (or a texture, the report) is written
            if makers:
                out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
                arrays["overlay"] = overlay_uint8(batch.image.to(out.image.device, non_blocking=True), out.image,
                                                  out.mask)
                for make in makers:
                    made.update(make(model, face, out, batch.image))
            else:
                arrays["overlay"] = render_overlay(model, face, batch.image)
            if batch.image.device.type != "cpu":  # the picture's left panel, made on the device
                arrays["crop"] = batch.image
    host = to_host({k: v.float() if v.is_floating_point() else v for k, v in {**arrays, **made}.items()})
    image, lm_gt = host.get("crop"), batch.lm.numpy()
    if image is None and need_render:
        image = batch.image.numpy()
    results = []
    for i, m in enumerate(batch.meta):
        r = FaceResult(name=m.name, rel_dir=m.rel_dir, coeffs=host["coeffs"][i], lm68=host["lm68"][i],
                       arrays={k: host[k][i] for k in made})
        if need_mesh:
            r.vertex, r.color = host["vertex"][i], host["color"][i]
        if need_render:
            r.image, r.overlay, r.lm_gt = image[i], host["overlay"][i], lm_gt[i]
        results.append(r)
    return results
