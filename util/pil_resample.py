"""Pillow's 8-bit bicubic resize, as exact integer arithmetic that runs in torch on any device.

The alignment crop (:func:`util.preprocess.resize_crop`) must be PIL's ``resize(BICUBIC)`` +
``crop`` pixel for pixel: the original's numbers hinge on it. PIL computes it in two separable
passes, each with fixed-point coefficients (22 fractional bits) and a rounding to 8 bits in
between. This module reproduces both from the same formulas (Pillow's ``Resample.c``:
``precompute_coeffs``, ``bicubic_filter``, ``normalize_coeffs_8bpc``, ``clip8``), so that the
expensive part, the two passes, can run on the GPU while the DataLoader workers only decode:

    plan = plan_resize_crop((w0, h0), (w, h), box)          # numpy, cheap (worker)
    region = photo[plan.rows[0]:plan.rows[1], plan.cols[0]:plan.cols[1]]
    crop = apply_plan(torch.from_numpy(region).to(device), plan)   # (3, H, W) uint8, on device

Exactness: the coefficients are computed in float64 with the C code's operation order (numpy does
not fuse multiply-adds, nor does Pillow's generic x86-64 build); the passes multiply 8-bit pixels by
integer coefficients below 2**23 and sum them in float64, where every partial sum is an integer
below 2**53, hence exact in any summation order (CPU BLAS or cuBLAS). tests/test_pil_resample.py
checks the result against Pillow itself on the test photos and thousands of synthetic cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point fraction for 8-bit images
BICUBIC_SUPPORT = 2.0
_A = -0.5  # Pillow's bicubic parameter


def bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), elementwise, same operation order."""
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_coeffs(in_size: int, out_size: int, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed-point coefficients of output pixels ``first..last-1`` when PIL resizes an axis of
    ``in_size`` pixels to ``out_size`` (the whole axis: box 0..in_size).

    Returns (start (n,) int64: each output pixel's first input pixel, length (n,) int64: the
    number of input pixels it reads, coeffs (n, K) int64: their weights in units of 2**-22, zero
    past ``length``)."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(first, last, dtype=np.float64)
    center = 0.0 + (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.trunc(center - support + 0.5).astype(np.int64)  # C's (int) cast
    xmin = np.maximum(xmin, 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize, dtype=np.int64)
    inside = x[None, :] < xmax[:, None]
    w = bicubic_filter(((x[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where(inside, w, 0.0)
    ww = np.zeros(len(xx))
    for k in range(ksize):  # the C loop's left-to-right sum (numpy's sum may pair terms)
        ww = ww + w[:, k]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, xmax, np.where(inside, fixed, 0)


@dataclass(frozen=True)
class ResizeCropPlan:
    """What :func:`apply_plan` needs to produce ``img.resize((w, h), BICUBIC).crop(box)`` from
    the photo's ``rows`` x ``cols`` region (source pixels [start, stop)).

    vertical_first: the pass order Pillow uses for these sizes. h_start/h_coeffs: horizontal
    coefficients of the crop's columns inside the resized photo, starts relative to ``cols[0]``;
    v_start/v_coeffs: the same for its rows, relative to ``rows[0]``. out_size: (W, H) of the
    crop; paste: where the part inside the resized photo goes in it (x, y); the rest is black,
    as PIL's ``crop`` pads.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    vertical_first: bool
    h_start: np.ndarray
    h_coeffs: np.ndarray
    v_start: np.ndarray
    v_coeffs: np.ndarray
    out_size: tuple[int, int]
    paste: tuple[int, int]

    @property
    def empty(self) -> bool:
        """True when the crop lies wholly outside the resized photo (all black)."""
        return len(self.h_start) == 0 or len(self.v_start) == 0


def plan_resize_crop(in_size: tuple[int, int], size: tuple[int, int], box: tuple[int, int, int, int],
                     vertical_first: bool) -> ResizeCropPlan:
    """Plan ``resize(size, BICUBIC).crop(box)`` of a photo of ``in_size`` (w0, h0), with the
    given pass order (:func:`util.preprocess.pil_vertical_first`)."""
    (w0, h0), (w, h) = in_size, size
    left, up, right, low = box
    x0, x1 = max(left, 0), min(right, w)
    y0, y1 = max(up, 0), min(low, h)
    out_size, paste = (right - left, low - up), (x0 - left, y0 - up)
    if x0 >= x1 or y0 >= y1:
        z = np.zeros(0, np.int64)
        return ResizeCropPlan((0, 0), (0, 0), vertical_first, z, z.reshape(0, 1), z, z.reshape(0, 1), out_size, paste)
    hs, hn, hc = axis_coeffs(w0, w, x0, x1)
    vs, vn, vc = axis_coeffs(h0, h, y0, y1)
    c0, c1 = int(hs.min()), int((hs + hn).max())
    r0, r1 = int(vs.min()), int((vs + vn).max())
    return ResizeCropPlan((r0, r1), (c0, c1), vertical_first, hs - c0, hc, vs - r0, vc, out_size, paste)


def _band_matrix(start: torch.Tensor, coeffs: torch.Tensor, in_len: int) -> torch.Tensor:
    """(n,), (n, K) -> (in_len, n) float64 matrix M with M[start_j + k, j] = coeffs[j, k]."""
    n, k = coeffs.shape
    rows = (start[:, None] + torch.arange(k, device=start.device)).clamp_(max=in_len - 1)
    cols = torch.arange(n, device=start.device)[:, None].expand(n, k)
    m = torch.zeros(in_len, n, dtype=torch.float64, device=start.device)
    return m.index_put_((rows, cols), coeffs.to(torch.float64), accumulate=True)  # clamped ones add 0


def _round8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8`` of a fixed-point sum (float64 holding an integer): ((acc + half) >> 22)
    clipped to 0..255."""
    return torch.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def apply_plan(region: torch.Tensor, plan: ResizeCropPlan) -> torch.Tensor:
    """(R, C, 3) uint8 region of the photo (``plan.rows`` x ``plan.cols``) -> (3, H, W) uint8
    crop on the region's device, equal to PIL's ``resize(BICUBIC).crop(box)``."""
    w_out, h_out = plan.out_size
    out = torch.zeros(3, h_out, w_out, dtype=torch.uint8, device=region.device)
    if plan.empty:
        return out
    dev = region.device
    x = region.to(torch.float64).permute(2, 0, 1)  # (3, R, C)
    hm = _band_matrix(torch.as_tensor(plan.h_start, device=dev), torch.as_tensor(plan.h_coeffs, device=dev),
                      x.shape[2])  # (C, X)
    vm = _band_matrix(torch.as_tensor(plan.v_start, device=dev), torch.as_tensor(plan.v_coeffs, device=dev),
                      x.shape[1])  # (R, Y)
    if plan.vertical_first:
        part = _round8(vm.T @ x)         # (3, Y, C)
        part = _round8(part @ hm)        # (3, Y, X)
    else:
        part = _round8(x @ hm)           # (3, R, X)
        part = _round8(vm.T @ part)      # (3, Y, X)
    px, py = plan.paste
    out[:, py:py + part.shape[1], px:px + part.shape[2]] = part.to(torch.uint8)
    return out
