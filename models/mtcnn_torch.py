"""MTCNN face detection in PyTorch that reproduces the ``mtcnn`` package, version 1.0.0.

The three networks (PNet, RNet, ONet) load the package's own weight files
(``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``: joblib lists of float32 Keras arrays), and the
pipeline around them follows the package step by step, so that boxes, scores and the five
landmarks agree with ``mtcnn.MTCNN().detect_faces(..., output_type="numpy")`` up to float32
round-off. TensorFlow is never imported; the package does not even need to be importable, only
its weight folder (pass ``weights_dir`` to use a copy elsewhere).

What the package does, and what is reproduced here (``mtcnn/stages``, ``mtcnn/utils``):

* Normalisation ``(pixel - 127.5) / 128``, then an image pyramid with scales
  ``(12 / min_face_size) * scale_factor ** k`` for
  ``k < round(log(min(H, W) / 12) / -log(scale_factor) - 1)``; level ``k`` has size
  ``int(H * s) x int(W * s)`` (truncated) and is made with ``tf.image.resize(method=AREA)``,
  i.e. TensorFlow's ``ResizeArea`` kernel: every output pixel is the exact average of the source
  rectangle ``[y * H / h, (y + 1) * H / h) x [x * W / w, (x + 1) * W / w)`` with fractional
  border weights. :func:`area_resize` applies the kernel's weights as two matrix products
  (sparse on the CPU, dense on CUDA).
  (Torch's ``interpolate(mode="area")`` is adaptive average pooling with whole-pixel bins: with it
  the landmarks on tests/data/faces move by 3.1 px on average, 15.5 px at worst, and one photo
  gets a different number of faces; antialiased bilinear is worse. Hence the exact weights.)
* PNet on every level; a cell is a candidate when its face probability is ``> thresholds[0]``;
  its box is ``(2x + 1, 2y + 1, 2x + 12, 2y + 12) + 11 * regression``, divided by the scale
  (regression is applied at once, and nothing is rounded, unlike the original MTCNN).
* The package's NMS is not the greedy one: a box is dropped when *any* earlier box in score
  order overlaps it by more than the threshold, even a box that was itself dropped
  (:func:`earlier_overlap_nms`). Overlap is ``inter / union`` or ``inter / min`` with areas
  ``(x2 - x1) * (y2 - y1)`` (no ``+ 1``). PNet: 0.5 per level, then 0.7 over all levels;
  RNet: 0.7; ONet: 0.7 with ``min``. Score order is ``np.argsort(scores)[::-1]``, done here
  with NumPy on the same arrays so that ties (saturated scores of exactly 1.0) break the same way.
* Boxes are made square around their centre (floats, no rounding, no padding step); crops
  for RNet (24 x 24) and ONet (48 x 48) use ``tf.image.crop_and_resize`` semantics
  (:func:`crop_and_resize`: bilinear, box corners sampled exactly, samples outside the image are 0).
* RNet/ONet replace the score, keep ``score > threshold`` and refine the box with
  ``box += offset * (w, h, w, h)``, ``w = x2 - x1 + 1``. ONet landmarks are
  ``x = w * lx + x1 - 1`` (``y`` likewise) on the box *before* refinement, in the column layout
  ``x1..x5, y1..y5`` (the package's ``to_json`` docstring says interleaved; its code is not).
* Finally boxes (not landmarks) are clipped to ``[0, W - 1] x [0, H - 1]``.

The per-image result order is the package's: descending ONet score.

Two deliberate differences: :meth:`TorchMTCNN.detect_batch` treats every image as if it were
alone (the package pads a batch to its largest image, which changes the results, and its
``fix_bboxes_offsets`` shifts an image's boxes by another image's padding when an earlier image
has no face), and pyramid levels smaller than PNet's window are skipped (the package then raises
inside TensorFlow and returns no face at all; with the default ``min_face_size=20`` every level is
at least 12 px).

Batching: all pyramid levels of all images of a batch are packed into one (or a few) canvases and
PNet runs once per canvas; RNet and ONet run once on all crops of all images. Tiles start at even
offsets and, where a tile's ``conv1`` output has an odd height or width, the ``conv1`` cells just
past it are set to ``-inf`` before the 2 x 2 max pool, which reproduces TensorFlow's ``same``
pooling there, so every valid PNet output cell equals the one computed on the level alone.

The weight files are pickles (joblib): load only the package's own, or copies you trust.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from util.assets import require_file
from util.precision import ieee_fp32

logger = logging.getLogger(__name__)

WEIGHT_FILES = {"pnet": "pnet.lz4", "rnet": "rnet.lz4", "onet": "onet.lz4"}
WEIGHTS_HELP = (
    "The MTCNN weights ship with the `mtcnn` pip package: `pip install mtcnn==1.0.0` (it needs "
    "only joblib and lz4; TensorFlow is an optional extra), or pass weights_dir= a folder "
    "holding pnet.lz4, rnet.lz4 and onet.lz4."
)

# PNet, RNet, ONet face-probability thresholds: those of the pre-1.0 `mtcnn` that
# Deep3DFaceRecon used; mtcnn 1.0.0's detect_faces defaults to (0.6, 0.7, 0.8).
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)

# Fixed parts of mtcnn 1.0.0's pipeline (its detect_faces keyword defaults).
PNET_WINDOW = 12  # PNet's receptive field, the package's ``min_size``
PNET_STRIDE = 2
NMS_PNET_LEVEL = 0.5  # union, within one pyramid level
NMS_PNET_ALL = 0.7  # union, over all levels of an image
NMS_RNET = 0.7  # union
NMS_ONET = 0.7  # min
PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0

# Pyramid tiles per PNet canvas (pixels); bounds the memory of one PNet call.
CANVAS_PIXELS = {"cpu": 1_000_000, "cuda": 32_000_000}
# Resize weights kept per detector (bytes): enough for the pyramids of a few hundred image sizes.
AREA_CACHE_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


# --------------------------------------------------------------------------- networks


class _KerasPort(nn.Module):
    """A network whose parameters come from the package's Keras weight list.

    ``keras_layers`` names the layers that own weights, in Keras' order; a ``flatten_chw``
    of ``(C, H, W)`` says that the first ``nn.Linear`` reads a feature map that Keras flattened
    after ``Permute((2, 1, 3))`` of an NHWC tensor, i.e. in ``(W, H, C)`` order, while torch
    flattens NCHW in ``(C, H, W)`` order; its input columns are reordered once at load time.
    """

    keras_layers: tuple[str, ...] = ()
    flatten_chw: tuple[int, int, int] | None = None

    def keras_weight_count(self) -> int:
        return sum(1 if isinstance(getattr(self, n), nn.PReLU) else 2 for n in self.keras_layers)

    def load_keras_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Copy Keras arrays (HWIO conv kernels, (in, out) dense kernels, PReLU alphas) in."""
        name = type(self).__name__
        if len(arrays) != self.keras_weight_count():
            raise ValueError(
                f"{name}: expected {self.keras_weight_count()} Keras arrays, got {len(arrays)}"
            )
        state: dict[str, torch.Tensor] = {}
        it = iter(arrays)
        first_linear = True
        for layer_name in self.keras_layers:
            layer = getattr(self, layer_name)
            if isinstance(layer, nn.Conv2d):
                kernel, bias = next(it), next(it)
                weight = np.transpose(kernel, (3, 2, 0, 1))  # HWIO -> OIHW
            elif isinstance(layer, nn.Linear):
                kernel, bias = next(it), next(it)
                if first_linear and self.flatten_chw is not None:
                    c, h, w = self.flatten_chw
                    if kernel.shape[0] != c * h * w:
                        raise ValueError(
                            f"{name}.{layer_name}: kernel {kernel.shape} does not read a "
                            f"{c}x{h}x{w} feature map"
                        )
                    kernel = kernel.reshape(w, h, c, -1).transpose(2, 1, 0, 3).reshape(c * h * w, -1)
                first_linear = False
                weight = kernel.T
            elif isinstance(layer, nn.PReLU):
                weight, bias = next(it).reshape(-1), None
            else:  # pragma: no cover - keras_layers only names the three kinds above
                raise TypeError(f"{name}.{layer_name}: no Keras mapping for {type(layer).__name__}")
            state[f"{layer_name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
            if bias is not None:
                state[f"{layer_name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, np.float32))
        own = self.state_dict()
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"{name}: weight {key} has shape {tuple(value.shape)}, "
                    f"the network expects {tuple(own[key].shape)}"
                )
        self.load_state_dict(state, strict=True)


def _pool_same(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Keras ``MaxPooling2D(kernel, strides=2, padding="same")`` for these networks' sizes.

    TensorFlow pads only at the end (the inputs here need a total padding of 0 or 1) and ignores
    padded cells, which is torch's ``ceil_mode``.
    """
    return F.max_pool2d(x, kernel, 2, ceil_mode=True)


class PNet(_KerasPort):
    """Proposal network: fully convolutional, a 12 x 12 window with stride 2.

    ``forward(x)`` with ``x`` of shape (N, 3, H, W), float32, normalised pixels, returns the box
    regression (N, 4, h, w) as offsets (x1, y1, x2, y2) in units of the 11-pixel window and the
    face probability (N, h, w), with ``h = ceil((H - 2) / 2) - 4``.
    """

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "conv4_2")

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)
        self.conv4_2 = nn.Conv2d(32, 2, 1)

    def forward(
        self, x: torch.Tensor, pool_edges: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pool_edges`` (2, M) int64: (y, x) cells of the conv1 output (all images, all
        channels) that the first max pool must ignore, as if the image ended there."""
        x = self.prelu1(self.conv1(x))
        if pool_edges is not None and pool_edges.shape[1] > 0:
            x[:, :, pool_edges[0], pool_edges[1]] = float("-inf")
        if x.shape[2] % 2 or x.shape[3] % 2:
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        else:  # same result, several times faster on channels-last CPU tensors
            x = torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                              torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        # Both 1x1 heads in one convolution.
        weight = torch.cat([self.conv4_1.weight, self.conv4_2.weight])
        x = F.conv2d(x, weight, torch.cat([self.conv4_1.bias, self.conv4_2.bias]))
        return x[:, :4], torch.softmax(x[:, 4:], dim=1)[:, 1]


class RNet(_KerasPort):
    """Refinement network on 24 x 24 crops: (N, 3, 24, 24) -> box offsets (N, 4), face prob (N,)."""

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4", "prelu4",
                    "fc5_1", "fc5_2")
    flatten_chw = (64, 3, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.fc4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.fc5_1 = nn.Linear(128, 4)
        self.fc5_2 = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _pool_same(self.prelu1(self.conv1(x)), 3)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.fc4(x.flatten(1)))
        return self.fc5_1(x), torch.softmax(self.fc5_2(x), dim=1)[:, 1]


class ONet(_KerasPort):
    """Output network on 48 x 48 crops: (N, 3, 48, 48) -> box offsets (N, 4), landmarks (N, 10)
    as ``x1..x5, y1..y5`` in box units, face prob (N,)."""

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4",
                    "fc5", "prelu5", "fc6_1", "fc6_2", "fc6_3")
    flatten_chw = (128, 3, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.fc5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.fc6_1 = nn.Linear(256, 4)
        self.fc6_2 = nn.Linear(256, 10)
        self.fc6_3 = nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _pool_same(self.prelu1(self.conv1(x)), 3)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = _pool_same(self.prelu3(self.conv3(x)), 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.fc5(x.flatten(1)))
        return self.fc6_1(x), self.fc6_2(x), torch.softmax(self.fc6_3(x), dim=1)[:, 1]


NETWORKS: dict[str, type[_KerasPort]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def package_weights_dir() -> str:
    """The ``assets/weights`` folder of the installed ``mtcnn`` package, found without importing it
    (importing ``mtcnn`` imports TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MTCNN weights: the `mtcnn` package is not installed. {WEIGHTS_HELP}")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def load_keras_arrays(name: str, weights_dir: str | None = None) -> list[np.ndarray]:
    """The package's weight list for ``name`` in ``("pnet", "rnet", "onet")``."""
    import joblib  # noqa: PLC0415 - only needed here

    folder = weights_dir if weights_dir is not None else package_weights_dir()
    path = require_file(os.path.join(folder, WEIGHT_FILES[name]), f"MTCNN {name} weights", WEIGHTS_HELP)
    arrays = joblib.load(path)
    if not isinstance(arrays, list) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise ValueError(f"{path}: expected a list of numpy arrays, got {type(arrays).__name__}")
    return arrays


def load_network(name: str, weights_dir: str | None = None) -> _KerasPort:
    """A PNet/RNet/ONet in eval mode with the package's weights, on the CPU."""
    net = NETWORKS[name]()
    net.load_keras_weights(load_keras_arrays(name, weights_dir))
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------- image ops


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
    """
    if image.ndim != 3:
        raise ValueError(f"area_resize expects an (H, W, C) image, got shape {tuple(image.shape)}")
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


# --------------------------------------------------------------------------- boxes


def box_overlap(a: torch.Tensor, b: torch.Tensor, method: str = "union") -> torch.Tensor:
    """Pairwise overlap (len(a), len(b)) of (x1, y1, x2, y2) boxes as the package computes it:
    areas ``(x2 - x1) * (y2 - y1)``, ``inter / union`` or ``inter / min(area)``."""
    if method not in ("union", "min"):
        raise ValueError(f"overlap method must be 'union' or 'min', got {method!r}")
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    iw = torch.minimum(a[:, None, 2], b[None, :, 2]).sub_(torch.maximum(a[:, None, 0], b[None, :, 0]))
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]).sub_(torch.maximum(a[:, None, 1], b[None, :, 1]))
    inter = iw.clamp_(min=0).mul_(ih.clamp_(min=0))
    if method == "union":
        return inter / (area_a + area_b - inter)
    return inter / torch.minimum(area_a, area_b)


def earlier_overlap_nms(
    boxes: torch.Tensor, groups: torch.Tensor, threshold: float, method: str = "union", chunk: int = 512
) -> torch.Tensor:
    """The package's NMS, batched over groups: keep box ``j`` unless an earlier box ``i < j`` of the
    same group overlaps it by more than ``threshold`` (suppressed boxes still suppress).

    boxes: (N, 4) sorted by descending score within each group; groups: (N,) int64, equal values
    contiguous. Returns a (N,) bool keep mask. Boxes ``j`` are taken ``chunk`` at a time against
    the boxes from their group's start to ``j``, so the work is about the sum of squared group
    sizes over two.
    """
    n = boxes.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    if n == 0:
        return keep
    groups = groups.contiguous()
    starts = torch.searchsorted(groups, groups).cpu().numpy()  # first index of each one's group
    index = torch.arange(n, device=boxes.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        lo = int(starts[a])
        ov = box_overlap(boxes[a:b], boxes[lo:b], method)
        earlier = index[lo:b][None, :] < index[a:b, None]
        if starts[b - 1] != lo:  # several groups in this block
            earlier &= groups[lo:b][None, :] == groups[a:b, None]
        keep[a:b] = ~((ov > threshold) & earlier).any(dim=1)
    return keep


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The package's ``resize_to_square``: side ``max(w, h)`` around the same centre, floats."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def refine_boxes(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The package's ``adjust_bboxes``: ``box += offset * (w, h, w, h)`` with ``w = x2 - x1 + 1``."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets.double() * torch.stack([w, h, w, h], dim=1)


def _descending_within_groups(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Permutation sorting each contiguous group by descending score, as the package does
    (``np.argsort(scores)[::-1]``, ties included)."""
    if scores.size == 0:
        return np.zeros(0, np.int64)
    cuts = np.flatnonzero(np.diff(groups)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [scores.size]])
    return np.concatenate([s + np.argsort(scores[s:e])[::-1] for s, e in zip(starts, ends)])


@dataclass
class _Candidates:
    """Boxes of all images of a batch, image ids non-decreasing. boxes (N, 4) float64
    (x1, y1, x2, y2) image pixels; scores (N,) float64; image (N,) int64; landmarks (N, 10) or None."""

    boxes: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor
    landmarks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def take(self, index: torch.Tensor) -> "_Candidates":
        lm = None if self.landmarks is None else self.landmarks[index]
        return _Candidates(self.boxes[index], self.scores[index], self.image[index], lm)

    def sorted_nms(self, threshold: float, method: str) -> "_Candidates":
        """Sort each image's boxes by descending score (on the host, NumPy's tie order), then NMS."""
        perm = _descending_within_groups(self.scores.cpu().numpy(), self.image.cpu().numpy())
        ordered = self.take(torch.from_numpy(perm).to(self.boxes.device))
        return ordered.take(earlier_overlap_nms(ordered.boxes, ordered.image, threshold, method))


# --------------------------------------------------------------------------- PNet canvas


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


# --------------------------------------------------------------------------- detector


class TorchMTCNN:
    """Face detector equal to ``mtcnn.MTCNN`` 1.0.0 (float32 round-off aside), in PyTorch.

    Args:
        device: where the networks and image work run ("cpu", "cuda", "cuda:1", torch.device).
        min_face_size: smallest face (pixels) the pyramid looks for; the package's default 20.
        thresholds: face-probability thresholds of PNet, RNet and ONet. The package's own
            ``detect_faces`` defaults are (0.6, 0.7, 0.8); (0.6, 0.7, 0.7) are those of the
            pre-1.0 package that Deep3DFaceRecon used.
        scale_factor: pyramid step.
        weights_dir: folder with pnet.lz4, rnet.lz4, onet.lz4; default: the installed package's.

    Each detection is a dict: ``box`` [x, y, w, h] (floats, image pixels, clipped to the image),
    ``confidence`` (float, ONet face probability), ``keypoints`` (5, 2) float64 array of (x, y)
    image pixels (y down, pixel centres at integers) for left eye, right eye, nose, mouth left,
    mouth right, in the package's order (descending confidence).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        scale_factor: float = 0.709,
        weights_dir: str | None = None,
    ) -> None:
        if len(thresholds) != 3:
            raise ValueError(f"thresholds must be 3 values (PNet, RNet, ONet), got {thresholds!r}")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = scale_factor
        self.pnet, self.rnet, self.onet = (
            load_network(name, weights_dir).to(self.device, memory_format=torch.channels_last)
            for name in ("pnet", "rnet", "onet")
        )
        # How the work is cut, per device; results do not depend on it beyond float round-off.
        self.canvas_pixels = CANVAS_PIXELS.get(self.device.type, CANVAS_PIXELS["cuda"])
        self.area_matrices = AreaMatrices(self.device, max_bytes=AREA_CACHE_BYTES.get(self.device.type, 512 << 20))

    def detect(self, image: np.ndarray) -> list[dict]:
        """Faces in one (H, W, 3) uint8 RGB image; see the class docstring for the dicts."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        """Faces in each image; every image's result is what :meth:`detect` gives for it alone."""
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
                got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
                raise ValueError(f"image {i}: expected an (H, W, 3) RGB array, got {got}")
            if image.dtype != np.uint8:
                raise TypeError(f"image {i}: expected dtype uint8, got {image.dtype}")
        if not images:
            return []
        with torch.inference_mode(), ieee_fp32(self.device):
            batch = _Batch(images, self.device)
            found = self._stage_pnet(batch)
            found = self._stage_rnet(batch, found)
            found = self._stage_onet(batch, found)
        return _to_dicts(found, len(images))

    # The three stages ----------------------------------------------------------------

    def _stage_pnet(self, batch: "_Batch") -> _Candidates:
        tiles = []
        for b, (h, w) in enumerate(batch.shapes):
            for s in pyramid_scales(h, w, self.min_face_size, self.scale_factor):
                lh, lw = level_size(h, w, s)
                if min(pnet_output_size(lh, lw)) > 0:
                    tiles.append(_Tile(b, float(s), lh, lw))
        if not tiles:
            return batch.empty()
        tiles, shapes = _pack(tiles, self.canvas_pixels)
        logger.debug("PNet: %d levels of %d images on canvases %s", len(tiles), len(batch.shapes), shapes)
        parts = [self._pnet_canvas(batch, tiles, c, shape) for c, shape in enumerate(shapes)]
        tile_id, cell_y, cell_x, reg, score = (torch.cat(p) for p in zip(*parts))
        # The package's order: tile by tile (image, then level), each tile row-major.
        width = max(pnet_output_size(t.height, t.width)[1] for t in tiles)
        height = max(pnet_output_size(t.height, t.width)[0] for t in tiles)
        order = torch.argsort((tile_id * height + cell_y) * width + cell_x)
        tile_id, cell_y, cell_x, reg, score = (v[order] for v in (tile_id, cell_y, cell_x, reg, score))
        dev = self.device
        scale = torch.tensor([t.scale for t in tiles], dtype=torch.float64, device=dev)[tile_id]
        image = torch.tensor([t.image for t in tiles], dtype=torch.int64, device=dev)[tile_id]
        x = (PNET_STRIDE * cell_x + 1).double()
        y = (PNET_STRIDE * cell_y + 1).double()
        size = PNET_WINDOW - 1
        reg = reg.double() * size
        boxes = torch.stack([x + reg[:, 0], y + reg[:, 1], x + size + reg[:, 2], y + size + reg[:, 3]], 1)
        found = _Candidates(boxes / scale[:, None], score.double(), image)
        # Per level: score order, NMS 0.5; levels stay in order.
        perm = _descending_within_groups(found.scores.cpu().numpy(), tile_id.cpu().numpy())
        perm_t = torch.from_numpy(perm).to(dev)
        found, tile_id = found.take(perm_t), tile_id[perm_t]
        found = found.take(earlier_overlap_nms(found.boxes, tile_id, NMS_PNET_LEVEL, "union"))
        found = found.sorted_nms(NMS_PNET_ALL, "union")
        return _Candidates(square_boxes(found.boxes), found.scores, found.image)

    def _pnet_canvas(
        self, batch: "_Batch", tiles: list[_Tile], c: int, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        """Run PNet on canvas ``c``; candidates as (tile, cell y, cell x, reg (n, 4), score)."""
        dev = self.device
        members = [t for t, tile in enumerate(tiles) if tile.canvas == c]
        canvas = torch.zeros(*shape, 3, dtype=torch.float32, device=dev)
        cell_tile = torch.full(pnet_output_size(*shape), -1, dtype=torch.int64, device=dev)
        edges = []
        by_image: dict[int, list[int]] = {}
        for t in members:
            by_image.setdefault(tiles[t].image, []).append(t)
        for b, ts in by_image.items():
            image = batch.image(b)
            transposed = image.permute(1, 0, 2).reshape(image.shape[1], -1)
            for t in ts:
                tile = tiles[t]
                level = area_resize(image, tile.height, tile.width, transposed=transposed,
                                    matrices=self.area_matrices)
                canvas[tile.oy:tile.oy + tile.height, tile.ox:tile.ox + tile.width] = level
                edges.append(_pool_edge_cells(tile))
                oh, ow = pnet_output_size(tile.height, tile.width)
                cell_tile[tile.oy // 2:tile.oy // 2 + oh, tile.ox // 2:tile.ox // 2 + ow] = t
            del transposed
        pool_edges = torch.from_numpy(np.concatenate(edges, axis=1)).to(dev)
        reg, prob = self.pnet(canvas.permute(2, 0, 1)[None].contiguous(), pool_edges)
        hit = (prob[0] > self.thresholds[0]) & (cell_tile >= 0)
        ys, xs = hit.nonzero(as_tuple=True)
        tile_id = cell_tile[ys, xs]
        oy = torch.tensor([tile.oy // 2 for tile in tiles], device=dev)[tile_id]
        ox = torch.tensor([tile.ox // 2 for tile in tiles], device=dev)[tile_id]
        return tile_id, ys - oy, xs - ox, reg[0][:, ys, xs].T, prob[0, ys, xs]

    def _stage_rnet(self, batch: "_Batch", found: _Candidates) -> _Candidates:
        if len(found) == 0:
            return found
        crops = batch.crops(found.boxes, found.image, 24)
        offsets, prob = self.rnet(crops)
        found = _Candidates(refine_boxes(found.boxes, offsets), prob.double(), found.image)
        found = found.take(found.scores > self.thresholds[1]).sorted_nms(NMS_RNET, "union")
        return _Candidates(square_boxes(found.boxes), found.scores, found.image)

    def _stage_onet(self, batch: "_Batch", found: _Candidates) -> _Candidates:
        if len(found) == 0:
            return found
        crops = batch.crops(found.boxes, found.image, 48)
        offsets, marks, prob = self.onet(crops)
        boxes = found.boxes
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        marks = marks.double()
        # The package writes these into a float32 array.
        marks = torch.cat([w * marks[:, :5] + boxes[:, :1] - 1, h * marks[:, 5:] + boxes[:, 1:2] - 1], 1)
        marks = marks.float().double()
        found = _Candidates(refine_boxes(boxes, offsets), prob.double(), found.image, marks)
        found = found.take(found.scores > self.thresholds[2]).sorted_nms(NMS_ONET, "min")
        # fit_to_image: boxes (not landmarks) into [0, W - 1] x [0, H - 1].
        limit = (batch.sizes[found.image] - 1).double()  # (n, 2) as (H - 1, W - 1)
        upper = torch.stack([limit[:, 1], limit[:, 0], limit[:, 1], limit[:, 0]], 1)
        boxes = torch.minimum(found.boxes.clamp(min=0), upper)
        return _Candidates(boxes, found.scores, found.image, found.landmarks)


class _Batch:
    """The images of one ``detect_batch`` call on the device, normalised to ``(p - 127.5) / 128``."""

    def __init__(self, images: Sequence[np.ndarray], device: torch.device) -> None:
        self.device = device
        self.shapes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        counts = np.asarray([h * w for h, w in self.shapes], np.int64)
        flat = np.concatenate([np.ascontiguousarray(im).reshape(-1, 3) for im in images])
        pixels = torch.from_numpy(flat).to(device)
        self.pixels = (pixels.float() - PIXEL_MEAN) / PIXEL_SCALE  # (P, 3), exact in float32
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(device)
        self.sizes = torch.tensor(self.shapes, dtype=torch.int64, device=device)
        self._starts = np.concatenate([[0], np.cumsum(counts)])

    def image(self, b: int) -> torch.Tensor:
        h, w = self.shapes[b]
        return self.pixels[self._starts[b]:self._starts[b + 1]].view(h, w, 3)

    def crops(self, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        return crop_and_resize(self.pixels, self.offsets, self.sizes, boxes, image_ids, size)

    def empty(self) -> _Candidates:
        z = torch.zeros(0, dtype=torch.float64, device=self.device)
        return _Candidates(z.view(0, 4), z, torch.zeros(0, dtype=torch.int64, device=self.device))


def _to_dicts(found: _Candidates, n_images: int) -> list[list[dict]]:
    results: list[list[dict]] = [[] for _ in range(n_images)]
    if len(found) == 0:
        return results
    boxes = found.boxes.cpu().numpy()
    scores = found.scores.cpu().numpy()
    image = found.image.cpu().numpy()
    marks = found.landmarks.cpu().numpy()
    for i in range(len(found)):
        x1, y1, x2, y2 = boxes[i]
        results[image[i]].append({
            "box": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "confidence": float(scores[i]),
            "keypoints": np.stack([marks[i, :5], marks[i, 5:]], axis=1),
        })
    return results
