"""Pillow's 8-bit bicubic resize, as exact integer arithmetic that runs in torch on any device.

The alignment crop (:func:`util.preprocess.resize_crop`) must be PIL's ``resize(BICUBIC)`` +
``crop`` pixel for pixel: the original's numbers hinge on it. PIL computes it in two separable
passes, each with fixed-point coefficients (22 fractional bits) and a rounding to 8 bits in
between. This module reproduces both from the same formulas (Pillow's ``Resample.c``:
``precompute_coeffs``, ``bicubic_filter``, ``normalize_coeffs_8bpc``, ``clip8``), so that the
expensive part, the two passes, can run on the GPU while the DataLoader workers only decode:

    plan = plan_resize_crop((w0, h0), (w, h), box, order)    # numpy, cheap (worker)
    region = photo[plan.rows[0]:plan.rows[1], plan.cols[0]:plan.cols[1]]
    batch = PlanBatch.collate([region, ...], [plan, ...])    # padded tensors (worker)
    crops = apply_plans(batch.to(device))                    # (B, 3, H, W) uint8, on device

Exactness: the coefficients are computed in float64 with the C code's operation order (numpy does
not fuse multiply-adds, nor does Pillow's generic x86-64 build); the passes multiply 8-bit pixels by
integer coefficients below 2**23 and sum them in float64, where every partial sum is an integer
below 2**53, hence exact in any summation order (CPU BLAS or cuBLAS). tests/test_pil_resample.py
checks the result against Pillow itself on the test photos and thousands of synthetic cases.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point fraction for 8-bit images
BICUBIC_SUPPORT = 2.0
_A = -0.5  # Pillow's bicubic parameter


def bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), elementwise, same operation order.

    Args:
        x: float distances in input pixels, any shape.

    Returns:
        float64 weights of the same shape (0 for ``|x| >= 2``).
    """
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_coeffs(in_size: int, out_size: int, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed-point coefficients of output pixels ``first..last-1`` when PIL resizes an axis of
    ``in_size`` pixels to ``out_size`` (the whole axis: box 0..in_size).

    Args:
        in_size: the axis's input length in pixels.
        out_size: its output length.
        first, last: the output pixels wanted, 0-based, ``last`` excluded (n = last - first).

    Returns:
        (start (n,) int64: each output pixel's first input pixel, length (n,) int64: the number of
        input pixels it reads, coeffs (n, K) int64: their weights in units of 2**-22, zero past
        ``length``).
    """
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
    """What :func:`apply_plans` needs to produce ``img.resize((w, h), BICUBIC).crop(box)`` from
    the photo's ``rows`` x ``cols`` region (source pixels [start, stop)).

    Each output column j of the crop (resized column ``box[0] + j``) reads region columns
    ``h_index[j]`` with fixed-point weights ``h_weight[j]`` (all zero where the column lies
    outside the resized photo: black, as PIL's ``crop`` pads); ``v_index``/``v_weight`` the same
    for rows.

    Attributes:
        rows: (start, stop) of the photo rows the crop reads (row 0 at the top).
        cols: (start, stop) of the photo columns it reads.
        vertical_first: the pass order Pillow uses for these sizes.
        h_index, h_weight: (W, Kh) int64 region columns and their weights (units of 2**-22).
        v_index, v_weight: (H, Kv) int64 region rows and their weights.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    vertical_first: bool
    h_index: np.ndarray  # (W, Kh) int64
    h_weight: np.ndarray  # (W, Kh) int64
    v_index: np.ndarray  # (H, Kv) int64
    v_weight: np.ndarray  # (H, Kv) int64

    @property
    def out_size(self) -> tuple[int, int]:
        """(W, H) of the crop, as PIL sizes go."""
        return self.h_index.shape[0], self.v_index.shape[0]


def _axis_plan(in_size: int, out_size: int, first: int, n: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """Output pixels ``first..first+n-1`` of an axis resized from ``in_size`` to ``out_size``
    (those outside 0..out_size-1 black) -> ((region start, stop), index (n, K), weight (n, K)),
    indices relative to the region start."""
    lo, hi = max(first, 0), min(first + n, out_size)
    if lo >= hi:  # wholly outside: black
        return (0, 1), np.zeros((n, 1), np.int64), np.zeros((n, 1), np.int64)
    start, length, coeffs = axis_coeffs(in_size, out_size, lo, hi)
    r0, r1 = int(start.min()), int((start + length).max())
    k = coeffs.shape[1]
    index, weight = np.zeros((n, k), np.int64), np.zeros((n, k), np.int64)
    inside = slice(lo - first, hi - first)
    index[inside] = np.minimum(start[:, None] + np.arange(k), r1 - 1) - r0  # past a window: weight 0
    weight[inside] = coeffs
    return (r0, r1), index, weight


def plan_resize_crop(in_size: tuple[int, int], size: tuple[int, int], box: tuple[int, int, int, int],
                     vertical_first: bool) -> ResizeCropPlan:
    """Plan ``resize(size, BICUBIC).crop(box)`` of a photo, with the given pass order.

    Args:
        in_size: the photo's (w0, h0).
        size: the resized (w, h).
        box: (left, up, right, low) of the crop in the resized photo, pixels, y down, right and
            low excluded; may reach outside it (black there).
        vertical_first: the pass order (:func:`util.preprocess.pil_vertical_first`).

    Returns:
        The plan of a (low - up, right - left) crop.
    """
    (w0, h0), (w, h) = in_size, size
    left, up, right, low = box
    cols, h_index, h_weight = _axis_plan(w0, w, left, right - left)
    rows, v_index, v_weight = _axis_plan(h0, h, up, low - up)
    return ResizeCropPlan(rows, cols, vertical_first, h_index, h_weight, v_index, v_weight)


def identity_plan(width: int, height: int) -> ResizeCropPlan:
    """The plan that returns a region unchanged (weights of exactly 1.0).

    Args:
        width, height: the region's size in pixels.

    Returns:
        A plan whose rows and columns are the whole region and whose crop is the region itself.
    """
    def axis(n):
        return np.arange(n, dtype=np.int64)[:, None], np.full((n, 1), 1 << PRECISION_BITS, np.int64)

    (hi, hw), (vi, vw) = axis(width), axis(height)
    return ResizeCropPlan((0, height), (0, width), False, hi, hw, vi, vw)


@dataclass
class PlanBatch:
    """B plans and their regions as padded tensors (what a DataLoader worker collates).

    Attributes:
        regions: (B, R, C, 3) uint8, padded (with whatever: no weight reads it).
        h_index, h_weight: (B, W, Kh) int64, zero-padded (a zero weight reads nothing).
        v_index, v_weight: (B, H, Kv) int64, zero-padded.
        vertical_first: (B,) bool, kept on the CPU by :meth:`to`.
    """

    regions: torch.Tensor
    h_index: torch.Tensor
    h_weight: torch.Tensor
    v_index: torch.Tensor
    v_weight: torch.Tensor
    vertical_first: torch.Tensor

    @classmethod
    def collate(cls, regions: list[np.ndarray] | None, plans: list[ResizeCropPlan]) -> "PlanBatch":
        """Batch plans and their regions.

        Args:
            regions: B (R_i, C_i, 3) uint8 regions (:func:`pad_regions`), or None: the regions are
                then a (B, 0, 0, 3) placeholder for the caller to replace (their shape:
                :func:`region_shape`).
            plans: B plans, all of one crop size.

        Returns:
            The batch, on the CPU.
        """
        b = len(plans)
        reg = np.empty((b, 0, 0, 3), np.uint8) if regions is None else pad_regions(regions)

        def stack(key):
            arrays = [getattr(p, key) for p in plans]
            k = max(a.shape[1] for a in arrays)
            out = np.zeros((b, arrays[0].shape[0], k), np.int64)
            for i, a in enumerate(arrays):
                out[i, :, :a.shape[1]] = a
            return torch.from_numpy(out)

        return cls(torch.from_numpy(reg), stack("h_index"), stack("h_weight"), stack("v_index"), stack("v_weight"),
                   torch.tensor([p.vertical_first for p in plans]))

    def _map(self, fn) -> "PlanBatch":
        return PlanBatch(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "vertical_first"),
                         vertical_first=self.vertical_first)

    def with_regions(self, regions: torch.Tensor) -> "PlanBatch":
        """A copy with ``regions`` ((B, R, C, 3) uint8) in place of the current ones."""
        return dataclasses.replace(self, regions=regions)

    def select(self, keep: torch.Tensor) -> "PlanBatch":
        """The plans (and regions) at ``keep``.

        Args:
            keep: (B,) bool mask on any device.

        Returns:
            A new batch of the kept faces, each tensor on its own device (vertical_first stays on
            the CPU, where :meth:`to` leaves it).
        """
        return PlanBatch(*(getattr(self, f.name)[keep.to(getattr(self, f.name).device)]
                           for f in dataclasses.fields(self)))

    def pin_memory(self) -> "PlanBatch":
        """For the DataLoader's ``pin_memory`` (it calls this on custom batch types).

        Returns:
            A copy whose tensors (but ``vertical_first``) are in pinned memory.
        """
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "PlanBatch":
        """A copy on ``device`` (``vertical_first`` stays on the CPU), as ``Tensor.to``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def _band_product(index: np.ndarray, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One pass: (N, K) input rows and integer weights of each output row, times (L, M) int32
    pixels -> (N, M) int32 sums (repeated indices carry zero weights). K row gathers in numpy
    (the band is K = 5-13 rows wide for the test photos), without scipy's sparse matrices, whose
    import cost every fresh process 0.2-0.5 s."""
    w = weight.astype(np.int32)
    acc = x[index[:, 0]] * w[:, 0, None]
    for k in range(1, index.shape[1]):
        acc += x[index[:, k]] * w[:, k, None]
    return acc


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8`` of int32 fixed-point sums, in place: ((acc + half) >> 22) in 0..255, uint8."""
    acc += 1 << (PRECISION_BITS - 1)
    acc >>= PRECISION_BITS
    return np.clip(acc, 0, 255, out=acc).astype(np.uint8)


def _transposed(pixels: np.ndarray) -> np.ndarray:
    """(n, m, 3) uint8 -> (m, n, 3) uint8, by PIL (faster than numpy's copy of 3-byte pixels: docs/throughput.md)."""
    return np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.TRANSPOSE))


def resize_crop_array(img: Image.Image, plan: ResizeCropPlan) -> np.ndarray:
    """``plan`` on an RGB photo (PIL image, mode 'RGB'), on the CPU: the (H, W, 3) uint8 crop,
    Pillow's pixels, computing only the crop's own pixels (PIL's resize computes every pixel of
    the resized photo, 5x the work for a face a quarter of the photo's width).

    Each pass is the plan's band of integer weights times the pixels in int32
    (:func:`_band_product`) - the arithmetic of Pillow's C loops: integer sums, so exact in any
    order, that cannot overflow (at most 255 x the weights' absolute sum, below 2**31), then
    ``clip8``. The photo is
    transposed for the pass that runs along its rows; the region is all that is read.

    Args:
        img: the photo, a PIL image of mode 'RGB'.
        plan: the crop's plan (:func:`plan_resize_crop`).

    Returns:
        (H, W, 3) uint8 RGB crop, row 0 at the top.
    """
    (r0, r1), (c0, c1) = plan.rows, plan.cols
    region = img.crop((c0, r0, c1, r1))
    cols, rows = region.size
    w, h = plan.out_size
    across, down = (plan.h_index, plan.h_weight), (plan.v_index, plan.v_weight)
    if plan.vertical_first:
        tall = _clip8(_band_product(*down, np.asarray(region).reshape(rows, cols * 3).astype(np.int32)))  # (h, cols*3)
        wide = _transposed(tall.reshape(h, cols, 3)).reshape(cols, h * 3).astype(np.int32)
        return _transposed(_clip8(_band_product(*across, wide)).reshape(w, h, 3))
    flipped = np.asarray(region.transpose(Image.Transpose.TRANSPOSE)).reshape(cols, rows * 3).astype(np.int32)
    narrow = _clip8(_band_product(*across, flipped)).reshape(w, rows, 3)  # the horizontal pass, transposed
    return _clip8(_band_product(*down, _transposed(narrow).reshape(rows, w * 3).astype(np.int32))).reshape(h, w, 3)


def region_shape(plans: list[ResizeCropPlan]) -> tuple[int, int]:
    """The padded regions' size for a batch.

    Args:
        plans: one or more plans.

    Returns:
        (rows, cols), the largest region's rows and columns.
    """
    return max(p.rows[1] - p.rows[0] for p in plans), max(p.cols[1] - p.cols[0] for p in plans)


def pad_regions(regions: list[np.ndarray]) -> np.ndarray:
    """Stack regions of different sizes.

    Args:
        regions: n >= 1 (R_i, C_i, 3) uint8 arrays.

    Returns:
        One (n, max R_i, max C_i, 3) uint8 array; the padding holds whatever was in memory (it is
        only ever multiplied by zero weights).
    """
    rmax, cmax = max(r.shape[0] for r in regions), max(r.shape[1] for r in regions)
    out = np.empty((len(regions), rmax, cmax, 3), np.uint8)
    for i, r in enumerate(regions):
        out[i, :r.shape[0], :r.shape[1]] = r
    return out


def _band(index: torch.Tensor, weight: torch.Tensor, in_len: int) -> torch.Tensor:
    """(B, N, K) indices and weights -> (B, in_len, N) float64 matrices M[b, index, n] += weight."""
    b, n, _ = index.shape
    m = torch.zeros(b, in_len, n, dtype=torch.float64, device=index.device)
    return m.scatter_add_(1, index.transpose(1, 2), weight.transpose(1, 2).to(torch.float64))


def _round8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8`` of a fixed-point sum (float64 holding an integer): ((acc + half) >> 22)
    clipped to 0..255."""
    return torch.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def apply_plans(batch: PlanBatch, max_bytes: int = 1 << 28) -> torch.Tensor:
    """Make a batch's crops, equal to PIL's ``resize(BICUBIC).crop(box)``: a fixed number of
    kernels per batch (per chunk of at most ``max_bytes`` of float64 region), whatever B.

    Args:
        batch: the plans and their regions, on any device.
        max_bytes: bound on the float64 working memory of one chunk of faces.

    Returns:
        (B, 3, H, W) uint8 RGB crops on the regions' device.
    """
    regions = batch.regions
    b, r, c, _ = regions.shape
    out_w, out_h = batch.h_index.shape[1], batch.v_index.shape[1]
    out = torch.empty(b, 3, out_h, out_w, dtype=torch.uint8, device=regions.device)
    chunk = max(1, max_bytes // (3 * max(r, out_h) * max(c, out_w) * 8))
    for s in range(0, b, chunk):
        sl = slice(s, s + chunk)
        x = regions[sl].permute(0, 3, 1, 2).to(torch.float64)  # (b, 3, R, C)
        hm = _band(batch.h_index[sl], batch.h_weight[sl], c).unsqueeze(1)  # (b, 1, C, W)
        vt = _band(batch.v_index[sl], batch.v_weight[sl], r).transpose(1, 2).unsqueeze(1)  # (b, 1, H, R)
        vf = batch.vertical_first[sl]
        # both orders are computed only where the batch holds both (Pillow 13 picks per photo size)
        if bool(vf.all()):
            res = _round8(_round8(vt @ x) @ hm)
        elif not bool(vf.any()):
            res = _round8(vt @ _round8(x @ hm))
        else:
            res = torch.where(vf.to(x.device).view(-1, 1, 1, 1), _round8(_round8(vt @ x) @ hm),
                              _round8(vt @ _round8(x @ hm)))
        out[sl] = res.to(torch.uint8)
    return out


def apply_plan(region: torch.Tensor, plan: ResizeCropPlan) -> torch.Tensor:
    """One face's crop (:func:`apply_plans` of a batch of one).

    Args:
        region: (R, C, 3) uint8, ``plan.rows`` x ``plan.cols`` of the photo, on any device.
        plan: its plan.

    Returns:
        (3, H, W) uint8 RGB crop, on the region's device.
    """
    batch = PlanBatch.collate([region.cpu().numpy()], [plan]).to(region.device)
    return apply_plans(batch)[0]
