"""The identity network behind the perceptual loss: pluggable, loaded from a user-given file.

The original trains with InsightFace's ArcFace ``iresnet`` r50 (``ms1mv3_arcface_r50_fp16/backbone.pth``).
:class:`IResNet` here uses InsightFace's parameter names, so such a ``backbone.pth`` (r18, r34, r50
or r100) loads with ``weights_only=True`` and ``strict=True``. Any other recogniser mapping
(B, 3, 112, 112) images in -1..1 to (B, D) features can be given as a ``torch.export`` program
(``.pt2``, ``--net_recog export``; export it in eval mode with a dynamic batch size) or a TorchScript
file (``--net_recog torchscript``). Nothing is downloaded: without a file, training runs with ``w_feat = 0``.

Input framing follows the original: the 5 points derived from the 68 landmarks are mapped by a
similarity transform (least squares, Umeyama) onto InsightFace's 112x112 ArcFace template, the
image is warped with it (kornia ``warp_affine``, bilinear, zero padding) and scaled to -1..1.
"""
from __future__ import annotations

import logging
import os
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from util.landmarks import lm68_to_5

log = logging.getLogger(__name__)

# InsightFace's ArcFace 112x112 template: left eye, right eye, nose tip, mouth corners (x, y down)
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                    (41.5493, 92.3655), (70.7299, 92.2041))
RECOG_INPUT = 112
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
RECOG_CHOICES = tuple(IRESNET_LAYERS) + ("torchscript", "export")


class RecogError(RuntimeError):
    """The recogniser file is missing, unreadable or does not fit the architecture."""


# --------------------------------------------------------------------------- alignment
def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) from src to dst points.

    Umeyama 1991, reflections excluded. Degenerate inputs (all points equal) give the identity.
    Computed in float64 without gradient.

    Args:
        src: (B, K, 2) points, any coordinate convention (the same as ``dst``'s).
        dst: (K, 2) or (B, K, 2) points (moved to ``src``'s device).

    Returns:
        (B, 2, 3) ``M`` with ``dst ~ M @ [src; 1]``, in ``src``'s dtype (float32 for integer ``src``),
        on its device.
    """
    with torch.no_grad():
        s = src.detach().to(torch.float64)
        d = dst.detach().to(device=s.device, dtype=torch.float64).expand(s.shape[0], -1, -1)
        ms, md = s.mean(dim=1, keepdim=True), d.mean(dim=1, keepdim=True)
        sc, dc = s - ms, d - md
        cov = dc.transpose(1, 2) @ sc / s.shape[1]  # (B, 2, 2)
        u, sig, vt = torch.linalg.svd(cov)
        sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vt))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        diag = torch.stack([torch.ones_like(sign), sign], dim=-1)  # (B, 2)
        rot = u @ torch.diag_embed(diag) @ vt
        var = (sc ** 2).sum(dim=-1).mean(dim=1)  # (B,)
        ok = var > 1e-12
        scale = torch.where(ok, (sig * diag).sum(dim=-1) / torch.where(ok, var, torch.ones_like(var)),
                            torch.ones_like(var))
        a = scale[:, None, None] * rot
        t = md.transpose(1, 2) - a @ ms.transpose(1, 2)  # (B, 2, 1)
        m = torch.cat([a, t], dim=2)
        eye = torch.eye(2, 3, dtype=m.dtype, device=m.device).expand_as(m)
        m = torch.where(ok[:, None, None], m, eye)
    return m.to(src.dtype if src.is_floating_point() else torch.float32)


def estimate_norm(lm68: torch.Tensor, height: int) -> torch.Tensor:
    """The warp of a crop onto the ArcFace template (the original's ``estimate_norm_torch``).

    Args:
        lm68: (B, 68, 2) crop landmarks in pixels, **y up** (detached here).
        height: the crop's height in pixels.

    Returns:
        (B, 2, 3) float32 affine matrices, crop pixels (y down) -> 112x112 template pixels.
    """
    lm5 = lm68_to_5(lm68.detach())
    lm5 = torch.stack([lm5[..., 0], (height - 1) - lm5[..., 1]], dim=-1)  # y down
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64, device=lm68.device)
    return similarity_transform(lm5, template).to(torch.float32)


def warp_to_recog(image: torch.Tensor, trans_m: torch.Tensor, size: int = RECOG_INPUT) -> torch.Tensor:
    """The recogniser's input crop, with kornia's ``warp_affine`` (the original's resize_n_crop).

    Args:
        image: (B, 3, H, W).
        trans_m: (B, 2, 3) affine matrices (:func:`estimate_norm`).
        size: the output's side in pixels.

    Returns:
        (B, 3, size, size), bilinear, zeros outside ``image``.
    """
    from kornia.geometry.transform import warp_affine

    return warp_affine(image, trans_m.to(image.dtype), dsize=(size, size), align_corners=True)


# --------------------------------------------------------------------------- iresnet
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """InsightFace's pre-activation block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, + shortcut.

    forward: (B, cin, H, W) -> (B, planes, H', W'), H' = ceil(H / stride).

    Args:
        cin: input channels.
        planes: output channels.
        stride: the second convolution's stride.
        downsample: maps the input to the output's shape when they differ (None: identity).
    """

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, planes, H', W'), H' = ceil(H / stride)."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace backbone: (B, 3, 112, 112) in -1..1 -> (B, num_features) embedding (not normalised).

    Parameter names match InsightFace ``recognition/arcface_torch/backbones/iresnet.py``.

    Args:
        layers: the number of blocks of each of the 4 stages (each stage halves the size:
            112 -> 7, hence the fc's 512 * 7 * 7 inputs; other input sizes do not fit the fc).
        num_features: the embedding's size.
    """

    fc_scale = 7 * 7

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
                             nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, down)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in -1..1 -> (B, num_features) embedding, not normalised."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.bn2(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


def iresnet(name: str) -> IResNet:
    """A freshly initialised :class:`IResNet` of 512 features.

    Args:
        name: 'r18', 'r34', 'r50' or 'r100' (:data:`IRESNET_LAYERS`).

    Returns:
        The network (random weights, train mode).

    Raises:
        ValueError: ``name`` is not one of :data:`IRESNET_LAYERS`.
    """
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown --net_recog {name!r}; choose one of {RECOG_CHOICES}")
    return IResNet(IRESNET_LAYERS[name])


# --------------------------------------------------------------------------- wrapper and loading
class RecogNet(nn.Module):
    """A frozen recogniser with the original's input framing.

    forward(image (B,3,H,W) RGB 0..1, trans_m (B,2,3)) -> (B, D) L2-normalised features.
    Always in eval mode (batch norm frozen); gradients flow to the image only.

    Args:
        net: the backbone, (B, 3, input_size, input_size) in -1..1 -> (B, D); its parameters are
            frozen here (``requires_grad`` False).
        input_size: the side of the backbone's input in pixels (112).
    """

    def __init__(self, net: nn.Module, input_size: int = RECOG_INPUT):
        super().__init__()
        self.net = net
        self.input_size = input_size
        for p in self.net.parameters():
            p.requires_grad_(False)
        try:
            self.net.eval()
        except NotImplementedError:  # a torch.export module keeps the mode it was exported in
            pass
        self.training = False

    def train(self, mode: bool = True) -> "RecogNet":
        """Stays in eval mode (the recogniser's batch norm is frozen, as in the original).

        Args:
            mode: ignored.

        Returns:
            ``self``, unchanged.
        """
        return self

    def crop_transform(self, lm68: torch.Tensor, height: int) -> torch.Tensor:
        """The warp of a crop onto this recogniser's input: :func:`estimate_norm`.

        Args:
            lm68: (B, 68, 2) crop landmarks in pixels, **y up**.
            height: the crop's height in pixels.

        Returns:
            (B, 2, 3) float32 affine matrices for :meth:`forward`.
        """
        return estimate_norm(lm68, height)

    def forward(self, image: torch.Tensor, trans_m: torch.Tensor) -> torch.Tensor:
        """Identity features of images.

        Args:
            image: (B, 3, H, W) RGB in 0..1.
            trans_m: (B, 2, 3) warp of ``image`` onto the 112x112 input (:meth:`crop_transform`).

        Returns:
            (B, D) L2-normalised float32 features.
        """
        x = 2.0 * warp_to_recog(image, trans_m, self.input_size) - 1.0
        return F.normalize(self.net(x).float(), dim=-1, p=2)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_recog_net(name: str, path: str) -> RecogNet:
    """Load a recogniser.

    Args:
        name: r18/r34/r50/r100 for an InsightFace iresnet ``backbone.pth`` (loaded with
            ``weights_only`` and ``strict``), 'export' for a ``torch.export`` program (also any
            ``.pt2`` file), 'torchscript' for a TorchScript file (also detected from the file).
        path: the file.

    Returns:
        a frozen :class:`RecogNet`.

    Raises:
        RecogError: the file is missing, unreadable or does not fit ``name`` (one line).
        ValueError: ``name`` is none of the above (for a state-dict file).
    """
    if not os.path.isfile(path):
        raise RecogError(f"face recognition network not found: {path}. Give an InsightFace ArcFace "
                         "backbone.pth (e.g. ms1mv3_arcface_r50_fp16, --net_recog r50) or a TorchScript "
                         "recogniser (--net_recog torchscript) with --net_recog_path, or pass "
                         "--net_recog_path '' to train without the identity loss (w_feat 0)")
    if name == "export" or path.endswith(".pt2"):
        try:
            net = torch.export.load(path).module()
        except Exception as e:
            raise RecogError(f"cannot load exported recogniser {path}: {str(e).strip().splitlines()[0]}") from None
        return RecogNet(net)
    if name == "torchscript" or _is_torchscript(path):
        try:
            net = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise RecogError(f"cannot load TorchScript recogniser {path}: {str(e).splitlines()[0]}") from None
        return RecogNet(net)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RecogError(f"cannot read recogniser weights {path}: {str(e).strip().splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RecogError(f"{path} is not a state dict of an iresnet (found {type(state).__name__})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = iresnet(name)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise RecogError(f"{path} does not fit --net_recog {name}: " + " ".join(lines[1:3])[:300]) from None
    log.info("loaded face recognition network %s from %s", name, path)
    return RecogNet(net)
