"""The hybrid loss: each term against its definition, gradients, and one optimisation step on a
tiny synthetic face model that lowers every term and reaches the network."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from models.bfm import ParametricFaceModel
from models.coeffs import COEFFS
from models.loss_weights import LossWeights
from models.losses import (LM_HEAVY, HybridLoss, coeff_reg_loss, gamma_loss, landmark_loss, landmark_weights,
                           lm68_to_5, perceptual_loss, photo_loss, reflectance_loss)
from models.recog import RecogNet, estimate_norm, similarity_transform
from models.renderer import create_renderer
from util.landmarks import lm68_to_5 as lm68_to_5_any

needs_kornia = pytest.mark.skipif(importlib.util.find_spec("kornia") is None,
                                  reason='the identity loss needs kornia: pip install -e ".[train]"')

SIZE = 64  # small renders: camera scaled from the original 224


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_setup(model_dict):
    center, focal = SIZE / 2, 1015.0 * SIZE / 224
    fm = ParametricFaceModel(model_dict, focal=focal, center=center)
    return fm, create_renderer("cpu", focal=focal, center=center)


# ----------------------------------------------------------------------------- the terms
def test_photo_loss_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 5, 5, generator=g), torch.rand(2, 3, 5, 5, generator=g)
    m = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    want = (torch.sqrt(1e-6 + ((a - b) ** 2).sum(1, keepdim=True)) * m).sum() / m.sum()
    assert torch.allclose(photo_loss(a, b, m), want)
    assert photo_loss(a, a, m) == pytest.approx(1e-3, rel=1e-4)  # sqrt(eps) where masked
    assert photo_loss(a, b, torch.zeros_like(m)) == 0  # empty mask: divided by 1, not 0
    with pytest.raises(ValueError, match="mask"):
        photo_loss(a, b, m[:, :, :4])


def test_landmark_weights_and_loss():
    w = landmark_weights()
    assert w.shape == (68,) and set(np.flatnonzero(w.numpy() == 20).tolist()) == set(LM_HEAVY)
    assert LM_HEAVY == (28, 29, 30, 60, 61, 62, 63, 64, 65, 66, 67)  # the original's weight[28:31], weight[-8:]
    pred = torch.zeros(2, 68, 2)
    gt = torch.zeros(2, 68, 2)
    gt[:, 0, 0] = 1.0  # weight 1
    gt[:, 60, 1] = 2.0  # weight 20, squared distance 4
    assert landmark_loss(pred, gt) == pytest.approx((1 + 80) * 2 / (2 * 68))
    # 5-point targets: the prediction is reduced to 5 points, weights 1
    p68 = torch.randn(3, 68, 2)
    t5 = torch.randn(3, 5, 2)
    want = ((lm68_to_5(p68) - t5) ** 2).sum() / 15
    assert landmark_loss(p68, t5) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="gt_lm"):
        landmark_loss(p68, torch.zeros(3, 7, 2))


def test_lm68_to_5_matches_alignment_helper():
    lm = np.random.default_rng(0).normal(size=(68, 2)) * 50
    assert np.allclose(lm68_to_5(torch.from_numpy(lm)[None])[0].numpy(), lm68_to_5_any(lm))


def test_regularisers():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(4, COEFFS.total, generator=g)
    p = COEFFS.split(c)
    want = (1.0 * (p["id"] ** 2).sum() + 0.8 * (p["exp"] ** 2).sum() + 1.7e-2 * (p["tex"] ** 2).sum()) / 4
    assert torch.allclose(coeff_reg_loss(p, 1.0, 0.8, 1.7e-2), want)
    white = torch.randn(4, 1, 9, generator=g).expand(4, 3, 9).reshape(4, 27)
    assert gamma_loss(white) == pytest.approx(0.0, abs=1e-12)
    assert gamma_loss(p["gamma"]) > 0
    skin = torch.tensor([1.0, 1.0, 0.0, 1.0])
    flat = torch.full((2, 4, 3), 0.5)
    flat[:, 2] = 0.9  # outside the skin: ignored
    assert reflectance_loss(flat, skin) == pytest.approx(0.0, abs=1e-12)
    tex = torch.rand(2, 4, 3, generator=g)
    mean = (tex * skin[None, :, None]).sum(1, keepdim=True) / 3
    want = (((tex - mean) * skin[None, :, None]) ** 2).sum() / (2 * 3)
    assert torch.allclose(reflectance_loss(tex, skin), want)
    f = nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    assert perceptual_loss(f, f) == pytest.approx(0.0, abs=1e-6)
    assert perceptual_loss(f, -f) == pytest.approx(2.0)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 3, 3, 3, generator=g, dtype=torch.float64)
    m = torch.rand(1, 1, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: photo_loss(x, b, m), (a,))
    p = torch.randn(2, 68, 2, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 68, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: landmark_loss(x, q), (p,))
    assert torch.autograd.gradcheck(lambda x: landmark_loss(x, q[:, :5]), (p,))
    t = torch.rand(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reflectance_loss(x, torch.tensor([1.0, 0, 1, 1, 0], dtype=x.dtype)), (t,))


def test_similarity_transform_and_estimate_norm():
    g = torch.Generator().manual_seed(3)
    src = torch.rand(2, 5, 2, generator=g) * 100
    ang, s, t = 0.4, 1.3, torch.tensor([4.0, -2.0])
    rot = torch.tensor([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]], dtype=torch.float32) * s
    m = similarity_transform(src, src[0] @ rot.T + t)
    assert torch.allclose(m[0, :, :2], rot, atol=1e-4) and torch.allclose(m[0, :, 2], t, atol=1e-3)
    assert torch.equal(similarity_transform(torch.ones(1, 5, 2), src[0])[0], torch.eye(2, 3))  # degenerate
    # landmarks already on the ArcFace template (y up in a 112 crop) map with the identity
    from models.recog import ARCFACE_TEMPLATE

    tpl = torch.tensor(ARCFACE_TEMPLATE)
    lm68 = torch.zeros(1, 68, 2)
    for k, (i, j) in enumerate([(36, 39), (42, 45)]):
        lm68[0, i] = lm68[0, j] = tpl[k]
    lm68[0, 30], lm68[0, 48], lm68[0, 54] = tpl[2], tpl[3], tpl[4]
    lm68[..., 1] = 111 - lm68[..., 1]
    assert torch.allclose(estimate_norm(lm68, 112), torch.eye(2, 3)[None], atol=1e-4)


# ----------------------------------------------------------------------------- the hybrid loss
class TinyRecog(nn.Module):
    """A stand-in recogniser: (B,3,112,112) -> (B,16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8 * 27 * 27, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TinyNet(nn.Module):
    """A small regressor (B,3,H,W) -> (B,257) with a backbone and a head, for gradient checks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                      nn.Flatten())
        self.head = nn.Linear(128, COEFFS.total)
        nn.init.normal_(self.head.weight, std=1e-2)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.backbone(x))


def target_batch(fm, renderer, b: int = 2):
    """Images and 68 landmarks rendered from known coefficients (a posed, lit tiny face)."""
    g = torch.Generator().manual_seed(5)
    c = torch.zeros(b, COEFFS.total)
    sl = COEFFS.slices()
    c[:, sl["id"]] = torch.randn(b, COEFFS.id, generator=g)
    c[:, sl["tex"]] = torch.randn(b, COEFFS.tex, generator=g) * 0.5
    c[:, sl["angle"]] = torch.randn(b, 3, generator=g) * 0.1
    c[:, sl["gamma"]] = torch.randn(b, 27, generator=g) * 0.1
    with torch.no_grad():
        face = fm(c)
        out = renderer(face.vertex, fm.face_buf, feat=face.color)
    images = out.image * out.mask + 0.3 * (1 - out.mask)
    return images, face.landmark


@needs_kornia
def test_hybrid_loss_terms_and_one_step_lowers_each(tiny_model_dict):
    fm, renderer = tiny_setup(tiny_model_dict)
    images, lm = target_batch(fm, renderer)
    recog = RecogNet(TinyRecog())
    loss_fn = HybridLoss(fm, renderer, LossWeights(), recog=recog)
    net = TinyNet()
    out = loss_fn(net(images), images, lm)
    vals = out.terms.as_floats()
    assert set(vals) == {"all", "feat", "color", "lm", "reg", "gamma", "reflc"}
    assert all(np.isfinite(v) and v >= 0 for v in vals.values())
    assert vals["all"] == pytest.approx(sum(v for k, v in vals.items() if k != "all"), rel=1e-5)
    assert out.render.shape == (2, 3, SIZE, SIZE) and out.face_mask.shape == (2, 1, SIZE, SIZE)
    assert not out.face_mask.requires_grad
    predef = HybridLoss(fm, renderer, LossWeights(), recog=recog, use_predef_M=True)(net(images), images, lm)
    assert 0 < float(predef.terms.feat.detach()) < 2 * 0.2
    for term in ("feat", "color", "lm", "reg", "gamma", "reflc"):
        step_net = copy.deepcopy(net)
        opt = torch.optim.Adam(step_net.parameters(), lr=1e-4)
        before = getattr(loss_fn(step_net(images), images, lm).terms, term)
        opt.zero_grad()
        before.backward()
        assert step_net.head.weight.grad.abs().sum() > 0, term
        assert step_net.backbone[0].weight.grad.abs().sum() > 0, term  # reaches the backbone
        opt.step()
        with torch.no_grad():
            after = getattr(loss_fn(step_net(images), images, lm).terms, term)
        assert after < before.detach(), f"{term}: {float(before)} -> {float(after)}"


def test_total_loss_step_reaches_recon_net_heads(tiny_model_dict):
    """The project's ReconNet (zero-initialised heads, as the original): the first step moves the heads."""
    from models.networks import ReconNet

    fm, renderer = tiny_setup(tiny_model_dict)
    images, lm = target_batch(fm, renderer)
    net = ReconNet("resnet18")
    loss_fn = HybridLoss(fm, renderer, LossWeights(w_feat=0.0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()
    first = loss_fn(net(images), images, lm).terms.total
    opt.zero_grad()
    first.backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in net.final_layers)
    opt.step()
    net.eval()
    with torch.no_grad():
        assert loss_fn(net(images), images, lm).terms.total < first


def test_front_only_and_attention(tiny_model_dict):
    fm, renderer = tiny_setup(tiny_model_dict)
    images, lm = target_batch(fm, renderer)
    c = torch.zeros(2, COEFFS.total)
    full = HybridLoss(fm, renderer, LossWeights(w_feat=0.0))(c, images, lm)
    front = HybridLoss(fm, renderer, LossWeights(w_feat=0.0), front_only=True)(c, images, lm)
    assert torch.equal(full.face_mask, front.face_mask)  # both are the front triangles' coverage
    zero = HybridLoss(fm, renderer, LossWeights(w_feat=0.0))(c, images, lm, atten_mask=torch.zeros(2, 1, SIZE, SIZE))
    assert zero.terms.color == 0
    with pytest.raises(ValueError, match="front_only"):
        HybridLoss(fm, renderer, LossWeights(), recog=RecogNet(TinyRecog()), front_only=True)


# ----------------------------------------------------------------------------- the identity network
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@needs_kornia
def test_recog_loading_iresnet_torchscript_and_errors(tmp_path):
    from models.recog import RecogError, iresnet, load_recog_net

    net = iresnet("r18")
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)  # InsightFace's backbone.pth is a plain state dict
    rec = load_recog_net("r18", str(path))
    assert not rec.training and not any(p.requires_grad for p in rec.parameters())
    rec.train()
    assert not rec.training and not rec.net.training  # batch norm stays frozen
    img = torch.rand(1, 3, 224, 224, requires_grad=True)
    feat = rec(img, torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]]))
    assert feat.shape == (1, 512) and torch.allclose(feat.norm(dim=-1), torch.ones(1))
    feat.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(RecogError, match="does not fit --net_recog r34"):
        load_recog_net("r34", str(path))
    with pytest.raises(RecogError, match="not found"):
        load_recog_net("r50", str(tmp_path / "missing.pth"))
    ts = tmp_path / "recog.pt"
    torch.jit.script(TinyRecog()).save(str(ts))
    assert load_recog_net("r50", str(ts))(img, torch.eye(2, 3)[None]).shape == (1, 16)  # detected as TorchScript
    exported = torch.export.export(TinyRecog().eval(), (torch.rand(2, 3, 112, 112),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(exported, str(tmp_path / "recog.pt2"))
    assert load_recog_net("export", str(tmp_path / "recog.pt2"))(img, torch.eye(2, 3)[None]).shape == (1, 16)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RecogError, match="cannot read"):
        load_recog_net("r50", str(tmp_path / "junk.pth"))
