"""The coefficient regressor: a ResNet (18/34/50) backbone with one 1x1-conv head per coefficient group.

Parameter names follow the original Deep3DFaceRecon_pytorch (and torchvision's ResNet), so its
``epoch_N.pth`` files load unchanged: ``{'net_recon': {'backbone.conv1.weight', ...,
'final_layers.0.weight' ... 'final_layers.6.bias'}}``. Written here so the project does not
depend on torchvision.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Any

import torch
from torch import nn

from models.coeffs import COEFFS, CoeffLayout


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution without bias, padding 1: (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride))."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution, no padding: (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride))."""
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions with batch norm, plus the (downsampled) input.

    forward: (B, cin, H, W) -> (B, planes, H/stride, W/stride) (rounded up).

    Args:
        cin: input channels.
        planes: output channels (``expansion`` = 1).
        stride: the first convolution's stride.
        downsample: maps the input to the output's shape when they differ (None: identity).
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, planes, H', W'), H' = ceil(H / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution.

    forward: (B, cin, H, W) -> (B, 4 * planes, H/stride, W/stride) (rounded up).

    Args:
        cin: input channels.
        planes: channels of the inner 3x3 convolution (output: 4 * planes, ``expansion``).
        stride: the 3x3 convolution's stride.
        downsample: maps the input to the output's shape when they differ (None: identity).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, 4 * planes, H', W'), H' = ceil(H / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet without the classifier unless ``use_last_fc``.

    forward: (B, 3, H, W) -> (B, C, 1, 1) pooled features (C = :attr:`out_dim`, 512 * expansion),
    or (B, num_classes) with ``use_last_fc``.
    Built on the meta device (``with torch.device("meta")``), it skips the weight initialisation:
    there are no values to set, a state dict will provide them (and initialising meta tensors
    would import torch._dynamo, which is slow to load).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: the number of blocks of each of the 4 stages.
        num_classes: outputs of the fc layer (only with ``use_last_fc``).
        use_last_fc: keep the fc layer after pooling.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000,
                 use_last_fc: bool = False):
        super().__init__()
        self.use_last_fc = use_last_fc
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = 512 * block.expansion
        if use_last_fc:
            self.fc = nn.Linear(self.out_dim, num_classes)
        if not self.conv1.weight.is_meta:  # meta: no values to initialise (built to be loaded)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim, 1, 1), or (B, num_classes) with ``use_last_fc``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        if self.use_last_fc:
            x = self.fc(torch.flatten(x, 1))
        return x


ARCHITECTURES: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ReconNet(nn.Module):
    """Image (B, 3, 224, 224) RGB in 0..1 -> coefficients (B, 257).

    Built on the meta device, nothing is initialised (see :class:`ResNet`, :func:`load_recon_net`).

    Args:
        net_recon: 'resnet18' | 'resnet34' | 'resnet50'.
        use_last_fc: the original's alternative head (the backbone's fc predicts all 257).
        layout: the coefficient groups; one zero-initialised 1x1-conv head per entry of its
            ``head_sizes``.

    Raises:
        ValueError: ``net_recon`` is not one of :data:`ARCHITECTURES`.
    """

    def __init__(self, net_recon: str = "resnet50", use_last_fc: bool = False, layout: CoeffLayout = COEFFS):
        super().__init__()
        if net_recon not in ARCHITECTURES:
            raise ValueError(f"unknown --net_recon {net_recon!r}; choose one of {sorted(ARCHITECTURES)}")
        block, layers = ARCHITECTURES[net_recon]
        self.use_last_fc = use_last_fc
        self.backbone = ResNet(block, layers, num_classes=layout.total, use_last_fc=use_last_fc)
        if not use_last_fc:
            self.final_layers = nn.ModuleList(
                [conv1x1(self.backbone.out_dim, n, bias=True) for n in layout.head_sizes])
            if not self.final_layers[0].weight.is_meta:
                for m in self.final_layers:
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict coefficients.

        Args:
            x: (B, 3, 224, 224) RGB in 0..1, on the network's device and dtype.

        Returns:
            (B, 257) coefficients in :data:`models.coeffs.COEFFS` order (heads concatenated).
        """
        x = self.backbone(x)
        if self.use_last_fc:
            return x
        return torch.cat([head(x) for head in self.final_layers], dim=1).flatten(1)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the network."""


def load_checkpoint(path: str, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing or bad files.

    With ``mmap``, the tensors of a zip-format checkpoint (every ``torch.save`` since torch 1.6)
    are memory-mapped from the file (copy-on-write) instead of read into memory: no copy until
    a page is used. Only for read-only use of a file that is replaced, not rewritten in place,
    while mapped (this project's writers save to a temporary name and rename it).

    Args:
        path: the checkpoint, an ``epoch_N.pth``.
        mmap: memory-map the tensors (zip format only; ignored for older files).

    Returns:
        The checkpoint dict, tensors on the CPU; it holds at least ``'net_recon'``.

    Raises:
        CheckpointError: the path is missing, a folder or not a regular file; the file cannot be
            read or holds objects other than tensors (refused, never executed); or it is not a
            dict with ``'net_recon'``. One line naming ``path``.
    """
    expected = ("Expected the original's checkpoints/<name>/epoch_<N>.pth (e.g. the authors' epoch_20.pth) "
                "or run `python -m tools.standin` for the stand-in model.")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file. {expected}")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}. {expected}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO or device?). {expected}")
    try:  # weights_only: tensors and plain containers only; a pickle that would run code is refused
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # truncated zip, pickle of other objects, ...
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text) if "Weights only load failed" in text else None
        if found:  # torch's own text would suggest weights_only=False, which would run it
            raise CheckpointError(f"refused checkpoint {path}: it holds objects other than tensors "
                                  f"({found.group(1)}), which loading would have to run as code; a Deep3DFaceRecon "
                                  "epoch_N.pth holds only tensors. Nothing of it was executed.") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if "Weights only load failed" in text:  # say what the unpickler met, not torch's advice
            lines = [ln for ln in lines if "Weights only" not in ln and "WeightsUnpickler" not in ln
                     and "Please file an issue" not in ln and "documentation" not in ln] or ["not a pickle of tensors"]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}. "
                              "Is the file complete (re-download it) and a Deep3DFaceRecon epoch_N.pth?") from None
    if not isinstance(ckpt, dict) or "net_recon" not in ckpt:
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a Deep3DFaceRecon checkpoint: expected a dict with key "
                              f"'net_recon' (the regressor's state dict), found {keys}")
    return ckpt


def load_recon_net(path: str, net_recon: str = "resnet50", use_last_fc: bool = False) -> ReconNet:
    """Build a :class:`ReconNet` and load ``path``'s ``net_recon`` state dict strictly.

    The network is built on the meta device (no memory, no random initialisation: the
    checkpoint sets every parameter and buffer, ``strict`` checks that) and takes the
    checkpoint's tensors themselves (``assign=True``), memory-mapped from the file: the weights
    are never copied on the host. Floating-point tensors are float32 as with a copy into a
    freshly built network (``Tensor.float()`` is a no-op for float32). A ``module.`` prefix
    (a DataParallel save) is dropped from the names.

    Args:
        path: the checkpoint (``checkpoints/<name>/epoch_<N>.pth``).
        net_recon: 'resnet18' | 'resnet34' | 'resnet50', as the checkpoint was trained.
        use_last_fc: as the checkpoint was trained.

    Returns:
        The network on the CPU, in eval mode.

    Raises:
        CheckpointError: as :func:`load_checkpoint`; ``'net_recon'`` is not a state dict; or its
            names or shapes do not fit ``net_recon`` and ``use_last_fc`` (``strict``).
        ValueError: ``net_recon`` is unknown.
    """
    with torch.device("meta"):
        net = ReconNet(net_recon, use_last_fc=use_last_fc)
    state = load_checkpoint(path, mmap=True)["net_recon"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: 'net_recon' is not a state dict (names -> tensors), found "
                              f"{type(state).__name__}; is it a Deep3DFaceRecon epoch_N.pth?")
    state = {k[len("module."):] if k.startswith("module.") else k: v.float() if v.is_floating_point() else v
             for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path} does not fit --net_recon {net_recon} --use_last_fc {use_last_fc}: "
                              + " ".join(lines[1:3])[:300]) from None
    return net.eval()


def graphed_for_training(net: nn.Module, example: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """Replay ``net``'s training-mode forward and backward from CUDA graphs (fewer kernel launches).

    Wraps :func:`torch.cuda.make_graphed_callables`: ``net`` is patched in place and returned.
    While ``net.training`` is True each call copies its input into the graph's static input and
    replays the captured kernels (gradients reach the parameters through autograd as usual); in
    eval mode the module runs eagerly, as before. The capture's warm-up passes would move the
    batch-norm statistics: every buffer is restored to its value before the capture.

    Args:
        net: a module on a CUDA device whose parameters are never replaced afterwards (an
            optimizer updating them in place is fine); no hooks on ``net`` itself (hooks on its
            submodules run during the capture and are replayed with it).
        example: (B, ...) an input of the exact shape, dtype and memory format of every training
            call (other batch sizes fail at the copy).
        autocast_dtype: the autocast dtype the module runs under (bf16/fp16), captured with
            autocast's weight cache off as CUDA graphs require; None: full precision.

    Returns:
        ``net`` itself (already graphed for inputs of ``example``'s shape: unchanged).

    Raises:
        ValueError: ``example`` is not on a CUDA device, or ``net`` was graphed for another shape.
    """
    import contextlib

    if example.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
    shape = getattr(net, "graphed_input_shape", None)
    if shape is not None:
        if shape != tuple(example.shape):
            raise ValueError(f"the network is already graphed for inputs of shape {shape}, not {tuple(example.shape)}")
        return net
    saved = [b.detach().clone() for b in net.buffers()]
    net.train()
    ctx = (torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        torch.cuda.make_graphed_callables(net, (example,))
    with torch.no_grad():
        for b, v in zip(net.buffers(), saved):
            b.copy_(v)
    net.graphed_input_shape = tuple(example.shape)
    return net
