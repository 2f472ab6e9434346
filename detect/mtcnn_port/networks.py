"""PNet, RNet and ONet of MTCNN as torch modules that take the ``mtcnn`` package's Keras weights."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _KerasPort(nn.Module):
    """A network whose parameters come from the package's Keras weight list.

    ``keras_layers`` names the layers that own weights, in Keras' order; a ``flatten_chw``
    of ``(C, H, W)`` says that the first ``nn.Linear`` reads a feature map that Keras flattened
    after ``Permute((2, 1, 3))`` of an NHWC tensor, i.e. in ``(W, H, C)`` order, while torch
    flattens NCHW in ``(C, H, W)`` order; its input columns are reordered once at load time.
    """

    keras_layers: tuple[str, ...] = ()
    flatten_chw: tuple[int, int, int] | None = None

    def _add_conv_prelus(self, *specs: tuple[int, int, int]) -> None:
        """Layers ``conv1, prelu1, conv2, prelu2, ...``: one ``(in, out, kernel)`` per pair."""
        for i, (cin, cout, kernel) in enumerate(specs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel))
            setattr(self, f"prelu{i}", nn.PReLU(cout))

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
        self._add_conv_prelus((3, 10, 3), (10, 16, 3), (16, 32, 3))
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
        self._add_conv_prelus((3, 28, 3), (28, 48, 3), (48, 64, 2))
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
        self._add_conv_prelus((3, 32, 3), (32, 64, 3), (64, 64, 3), (64, 128, 2))
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
