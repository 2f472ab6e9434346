"""The image side of the port: pyramid scales, TensorFlow's ``ResizeArea`` and
``crop_and_resize``, and the packing of pyramid levels into PNet canvases."""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from util.checks import check_shape

PNET_WINDOW = 12  # PNet's receptive field, the package's ``min_size``
PNET_STRIDE = 2


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> np.ndarray:
    """The package's ``build_scale_pyramid``: float64 scales, largest first (may be empty)."""
    min_dim = min(width, height)
    if min_dim < PNET_WINDOW:  # the formula gives no level (and fails for an empty image)
        return np.zeros(0)
    count = round(-((np.log(min_dim / PNET_WINDOW) / np.log(scale_factor)) + 1))
    return (PNET_WINDOW / min_face_size) * scale_factor ** np.arange(count)


def level_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size of a pyramid level: the package passes ``shape * scale`` and TF truncates it."""
    h, w = np.asarray([height, width]) * scale
    return int(h), int(w)


def pnet_output_size(height: int, width: int) -> tuple[int, int]:
    """PNet's output map size for an input of ``height x width``."""
    return math.ceil((height - 2) / 2) - 4, math.ceil((width - 2) / 2) - 4


@functools.lru_cache(maxsize=1024)
def _area_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32]:
    """TF ``ResizeArea`` along one axis as a CSR matrix (n_out x n_in): (crow, col, value, step).

    Output cell ``i`` covers ``[i * s, (i + 1) * s)`` with ``s = n_in / n_out``; every input cell
    it touches gets its overlap as weight, computed in float32 with the kernel's own formula.
    A cell index past the end reads the last pixel (TF's ``Bound``); that weight is merged into
    the last pixel's.
    """
    s = np.float32(n_in) / np.float32(n_out)
    a = np.arange(n_out, dtype=np.float32) * s
    b = np.arange(1, n_out + 1, dtype=np.float32) * s
    first = np.floor(a).astype(np.int64)
    stop = np.ceil(b).astype(np.int64)
    k = first[:, None] + np.arange(int((stop - first).max()))[None, :]
    kf = k.astype(np.float32)
    a, b = a[:, None], b[:, None]
    one = np.float32(1)
    w = np.where(kf < a, np.where(kf + one > b, s, kf + one - a), np.where(kf + one > b, b - kf, one))
    w = np.where(k < stop[:, None], w, np.float32(0))
    past = k >= n_in
    if past.any():
        rows = np.flatnonzero(past.any(axis=1))
        last = np.argmax(k[rows] == n_in - 1, axis=1)
        w[rows, last] += (w[rows] * past[rows]).sum(axis=1)
        w[past] = 0
    keep = (k < stop[:, None]) & ~past
    crow = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return crow, k[keep], w[keep].astype(np.float32), s


def _area_matrix(n_in: int, n_out: int, device: torch.device, sparse: bool) -> torch.Tensor:
    """The ``_area_weights`` matrix (n_out, n_in) on ``device``, sparse CSR or dense."""
    crow, col, value, _ = _area_weights(n_in, n_out)
    if not sparse:
        row = np.repeat(np.arange(n_out), np.diff(crow))
        dense = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
        dense[torch.from_numpy(row).to(device), torch.from_numpy(col).to(device)] = (
            torch.from_numpy(value).to(device))
        return dense
    with _sparse_beta_quiet():
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(value),
            size=(n_out, n_in), check_invariants=False,
        ).to(device)


@contextlib.contextmanager
def _sparse_beta_quiet():
    """A block in which torch's notes that its sparse tensors are "in beta" (at construction and,
    in some versions, at the first product) are not shown: they are about torch, not the photos."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?i).*sparse", category=UserWarning)
        yield


class AreaMatrices:
    """Least-recently-used cache of ``ResizeArea`` weight matrices on one device, bounded in bytes.

    ``sparse``: CSR matrices (the CPU default: MKL makes them fast) or dense ones (the default
    elsewhere: cuBLAS is fast and needs no sparse kernels).
    """

    def __init__(self, device: torch.device, sparse: bool | None = None, max_bytes: int = 256 << 20):
        self.device = torch.device(device)
        self.sparse = self.device.type == "cpu" if sparse is None else sparse
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[torch.Tensor, int]] = OrderedDict()
        self._bytes = 0

    def __call__(self, n_in: int, n_out: int) -> torch.Tensor:
        key = (n_in, n_out)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        matrix = _area_matrix(n_in, n_out, self.device, self.sparse)
        size = (matrix.values().numel() * 12 if self.sparse else matrix.numel() * 4)
        self._cache[key] = (matrix, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1][1]
        return matrix


def area_resize(
    image: torch.Tensor,
    out_h: int,
    out_w: int,
    *,
    transposed: torch.Tensor | None = None,
    matrices: AreaMatrices | None = None,
) -> torch.Tensor:
    """TensorFlow's ``resize(method=AREA)`` of an (H, W, C) float32 image: (out_h, out_w, C) float32.

    Two matrix products with the kernel's weights, along x then y as the kernel sums, scaled at
    the end by ``1 / (sy * sx)`` as the kernel does; only float32 summation order differs.
    ``transposed``: the image as (W, H * C), to share between the levels of a pyramid;
    ``matrices``: a weight cache for the image's device (default: a fresh one).
    Raises ValueError when ``image`` is not (H, W, C).
    """
    check_shape(image, ("H", "W", "C"), "image")
    height, width, channels = image.shape
    if transposed is None:
        transposed = image.permute(1, 0, 2).reshape(width, height * channels)
    if matrices is None:
        matrices = AreaMatrices(image.device)
    with _sparse_beta_quiet() if matrices.sparse else contextlib.nullcontext():
        rows = (matrices(width, out_w) @ transposed).view(out_w, height, channels)
        rows = rows.permute(1, 0, 2).reshape(height, out_w * channels)
        out = (matrices(height, out_h) @ rows).view(out_h, out_w, channels)
    sy, sx = _area_weights(height, out_h)[3], _area_weights(width, out_w)[3]
    return out * float(np.float32(1.0 / np.float64(sy * sx)))  # TF: float scale = 1.0 / (hs * ws)


def crop_and_resize(
    images: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    boxes: torch.Tensor,
    image_ids: torch.Tensor,
    crop: int,
) -> torch.Tensor:
    """``tf.image.crop_and_resize`` as the package calls it, for boxes on several images.

    images: (P, 3) float32, all images' pixels in row-major (H, W) order, concatenated.
    offsets: (B,) int64, first row of each image; sizes: (B, 2) int64 (H, W).
    boxes: (N, 4) float64 pixel boxes (x1, y1, x2, y2); image_ids: (N,) int64.
    The package normalises the box by (H, W) (float64, then float32 for TF) and TF samples
    ``y1n * (H - 1) + i * (y2n - y1n) * (H - 1) / (crop - 1)`` in float32, bilinearly; a sample
    outside ``[0, H - 1] x [0, W - 1]`` is 0. Returns (N, 3, crop, crop) float32.
    """
    h = sizes[image_ids, 0]
    w = sizes[image_ids, 1]
    y1 = (boxes[:, 1] / h).float()
    x1 = (boxes[:, 0] / w).float()
    y2 = (boxes[:, 3] / h).float()
    x2 = (boxes[:, 2] / w).float()
    hm1 = (h - 1).float()
    wm1 = (w - 1).float()
    steps = torch.arange(crop, device=boxes.device, dtype=torch.float32)
    in_y = (y1 * hm1)[:, None] + steps * ((y2 - y1) * hm1 / (crop - 1))[:, None]  # (N, crop)
    in_x = (x1 * wm1)[:, None] + steps * ((x2 - x1) * wm1 / (crop - 1))[:, None]
    inside = ((in_y >= 0) & (in_y <= hm1[:, None]))[:, :, None] & (
        (in_x >= 0) & (in_x <= wm1[:, None])
    )[:, None, :]
    top = torch.floor(in_y)
    left = torch.floor(in_x)
    y_lerp = (in_y - top)[:, :, None, None]
    x_lerp = (in_x - left)[:, None, :, None]

    def index(v: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        return torch.minimum(v.clamp(min=0).long(), (limit - 1)[:, None])

    top_i, bottom_i = index(top, h), index(torch.ceil(in_y), h)
    left_i, right_i = index(left, w), index(torch.ceil(in_x), w)
    base = offsets[image_ids][:, None, None]
    row_t = base + (top_i * w[:, None])[:, :, None]
    row_b = base + (bottom_i * w[:, None])[:, :, None]

    def pick(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return images[(rows + cols[:, None, :]).reshape(-1)].view(*inside.shape, 3)

    tl, tr = pick(row_t, left_i), pick(row_t, right_i)
    bl, br = pick(row_b, left_i), pick(row_b, right_i)
    top_v = tl + (tr - tl) * x_lerp
    bottom_v = bl + (br - bl) * x_lerp
    out = top_v + (bottom_v - top_v) * y_lerp
    out = out.masked_fill(~inside[..., None], 0.0)
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class _Tile:
    """One pyramid level of one image, placed at (oy, ox) (even) of canvas ``canvas``."""

    image: int
    scale: float
    height: int
    width: int
    canvas: int = 0
    oy: int = 0
    ox: int = 0


def _pool_edge_cells(tile: _Tile) -> np.ndarray:
    """Conv1 cells just past a tile whose conv1 output has odd height or width: TF's ``same``
    2 x 2 pool sees only the tile there, so these cells are set to -inf. (2, M) canvas (y, x).

    Every other cell a valid PNet output depends on lies inside the tile, so other neighbours
    need no masking.
    """
    h, w = tile.height - 2, tile.width - 2  # conv1 output of the tile
    ys, xs = [], []
    if h % 2:
        xs.append(np.arange(tile.ox, tile.ox + w + (w % 2)))
        ys.append(np.full(xs[-1].shape, tile.oy + h))
    if w % 2:
        ys.append(np.arange(tile.oy, tile.oy + h + (h % 2)))
        xs.append(np.full(ys[-1].shape, tile.ox + w))
    if not ys:
        return np.zeros((2, 0), np.int64)
    return np.stack([np.concatenate(ys), np.concatenate(xs)]).astype(np.int64)


def _even(v: int) -> int:
    return v + (v & 1)


def _pack(tiles: list[_Tile], max_pixels: int) -> tuple[list[_Tile], list[tuple[int, int]]]:
    """Shelf-pack tiles (tallest first) into canvases of at most ``max_pixels`` tile pixels.

    Returns the tiles (same order) with canvas and offsets set, and each canvas' (H, W). Offsets
    and canvas sizes are even, so PNet's 2 x 2 pool has no partial window: a tile's odd edge is
    always followed by a cell that can be masked.
    """
    order = sorted(range(len(tiles)), key=lambda t: (-tiles[t].height, -tiles[t].width))
    groups: list[list[int]] = [[]]
    area = 0
    for t in order:
        a = tiles[t].height * tiles[t].width
        if groups[-1] and area + a > max_pixels:
            groups.append([])
            area = 0
        groups[-1].append(t)
        area += a
    placed = list(tiles)
    shapes = []
    for c, group in enumerate(groups):
        total = sum(tiles[t].height * tiles[t].width for t in group)
        width = _even(max(max(tiles[t].width for t in group), math.isqrt(total)))
        x = y = shelf = canvas_w = 0
        for t in group:
            tile = tiles[t]
            if x + tile.width > width:
                y, x, shelf = y + _even(shelf), 0, 0
            placed[t] = _Tile(tile.image, tile.scale, tile.height, tile.width, c, y, x)
            canvas_w = max(canvas_w, x + tile.width)
            x += _even(tile.width)
            shelf = max(shelf, tile.height)
        shapes.append((_even(y + shelf), _even(canvas_w)))
    return placed, shapes
