"""The paper's weakly-supervised hybrid loss, one module shared by training and per-image fitting.

Deng et al. 2019, Sec. 3 and the original PyTorch implementation (``models/losses.py``,
``facerecon_model.py``). Each term below is the original's definition; the weights are its
defaults (:class:`LossWeights`):

* photometric (``w_color`` 1.92): per pixel the L2 norm of the RGB difference,
  ``sqrt(eps + |I - I'|^2)``, weighted by ``attention * face_mask`` and divided by the weight sum.
  ``face_mask`` is the (detached) coverage of the front-face triangles (``use_crop_face``);
  ``attention`` is the per-image skin mask (ones when none is given).
* landmarks (``w_lm`` 1.6e-3): squared pixel distance of the 68 projected landmarks to the
  detected ones, weight 20 on landmarks 28-30 (0-based: the lower nose bridge) and 60-67 (inner
  mouth), else 1, summed and divided by ``B * 68``. With a 5-point target, the 68 predicted points
  are reduced to 5 first (:func:`lm68_to_5`) and all weights are 1 (new here, for ``--fit_steps``).
* identity (``w_feat`` 0.2): ``1 - cos`` of the face-recognition features of the rendered face
  and of the input, both warped to the recogniser's 112x112 crop (:mod:`models.recog`).
* coefficient regularisation (``w_reg`` 3e-4): ``(w_id |id|^2 + w_exp |exp|^2 + w_tex |tex|^2) / B``
  with ``w_id, w_exp, w_tex = 1, 0.8, 1.7e-2``.
* gamma (``w_gamma`` 10): variance of the SH lighting over the RGB channels (near-white light).
* reflectance (``w_reflc`` 5): variance of the albedo over the skin region of the face model.

Landmarks are crop pixels with **y up**, images (B, 3, H, W) RGB in 0..1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.bfm import FaceOutput, ParametricFaceModel
from models.coeffs import COEFFS
from models.loss_weights import LossWeights
from util.checks import check_shape, check_shapes
from util.landmarks import lm68_to_5  # the one 68 -> 5 mapping (also imported from here)

# 0-based landmark indices that the original weights 20x: weight[28:31] and weight[-8:]
LM_HEAVY = tuple(range(28, 31)) + tuple(range(60, 68))
LM_HEAVY_WEIGHT = 20.0


def landmark_weights(n: int = 68, device=None, dtype=torch.float32) -> torch.Tensor:
    """The landmark loss's per-point weights.

    Args:
        n: number of landmarks (68 or 5).
        device, dtype: of the result.

    Returns:
        (n,) weights: 20 on the lower nose bridge and inner mouth (:data:`LM_HEAVY`) when n is 68,
        else ones.
    """
    w = torch.ones(n, device=device, dtype=dtype)
    if n == 68:
        w[list(LM_HEAVY)] = LM_HEAVY_WEIGHT
    return w


# --------------------------------------------------------------------------- the terms
def photo_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Robust photometric loss: sum of ``mask * sqrt(eps + |pred - target|^2)`` over pixels
    divided by ``max(sum(mask), 1)`` (the whole batch at once, as the original).

    Args:
        pred, target: (B, C, H, W) images.
        mask: (B, 1, H, W) weights in 0..1 (attention times face mask).
        eps: added under the square root (a finite gradient at zero difference).

    Returns:
        () the loss.

    Raises:
        ValueError: a shape differs from the above (the message names the argument).
    """
    check_shapes(pred=(pred, ("B", "C", "H", "W")), target=(target, ("B", "C", "H", "W")),
                 mask=(mask, ("B", 1, "H", "W")))
    dist = torch.sqrt(eps + ((pred - target) ** 2).sum(dim=1, keepdim=True)) * mask
    return dist.sum() / mask.sum().clamp_min(1.0)


def landmark_loss(pred_lm: torch.Tensor, gt_lm: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean squared landmark distance in pixels^2: ``sum(w * |p - q|^2) / (B * K)``.

    Args:
        pred_lm: (B, 68, 2) projected landmarks, pixels.
        gt_lm: (B, K, 2) target landmarks with K 68, or 5 (then ``pred_lm`` is reduced with
            :func:`lm68_to_5`).
        weight: (K,) or (B, K); default :func:`landmark_weights` ``(K)``.

    Returns:
        () the loss, pixels^2.

    Raises:
        ValueError: a shape differs from the above, or K is neither 68 nor 5.
    """
    sizes = check_shapes(pred_lm=(pred_lm, ("B", 68, 2)), gt_lm=(gt_lm, ("B", "K", 2)))
    if sizes["K"] not in (68, 5):
        raise ValueError(f"gt_lm must have shape (B, 68 or 5, 2), got {tuple(gt_lm.shape)}")
    if gt_lm.shape[1] == 5:
        pred_lm = lm68_to_5(pred_lm)
    k = gt_lm.shape[1]
    if weight is None:
        weight = landmark_weights(k, device=pred_lm.device, dtype=pred_lm.dtype)
    sq = ((pred_lm - gt_lm.to(pred_lm.dtype)) ** 2).sum(dim=-1) * weight
    return sq.sum() / (pred_lm.shape[0] * k)


def coeff_reg_loss(coeffs: dict[str, torch.Tensor], w_id: float = 1.0, w_exp: float = 1.0,
                   w_tex: float = 1.0) -> torch.Tensor:
    """Coefficient regularisation ``(w_id |id|^2 + w_exp |exp|^2 + w_tex |tex|^2) / B``.

    Args:
        coeffs: the parts of :meth:`models.coeffs.CoeffLayout.split`: ``id`` (B, 80), ``exp`` (B, 64),
            ``tex`` (B, 80) (other keys unused).
        w_id, w_exp, w_tex: the parts' weights.

    Returns:
        () the loss.
    """
    b = coeffs["id"].shape[0]
    return (w_id * coeffs["id"].pow(2).sum() + w_exp * coeffs["exp"].pow(2).sum()
            + w_tex * coeffs["tex"].pow(2).sum()) / b


def gamma_loss(gamma: torch.Tensor) -> torch.Tensor:
    """Lighting prior: the mean squared deviation of each SH band from its mean over RGB.

    Args:
        gamma: (B, 27) SH lighting coefficients (3 channels x 9 bands).

    Returns:
        () the loss.

    Raises:
        ValueError: ``gamma`` is not (B, 27).
    """
    check_shape(gamma, ("B", 27), "gamma")
    g = gamma.reshape(-1, 3, 9)
    return ((g - g.mean(dim=1, keepdim=True)) ** 2).mean()


def reflectance_loss(texture: torch.Tensor, skin_mask: torch.Tensor) -> torch.Tensor:
    """Albedo variance over the skin region, exactly as the original:
    ``sum(((T - mean_skin(T)) * m)^2) / (B * sum(m))`` with the mean per channel over the whole
    batch's skin vertices.

    Args:
        texture: (B, N, 3) albedo in 0..1.
        skin_mask: (N,) 0/1 skin vertices of the face model.

    Returns:
        () the loss.

    Raises:
        ValueError: the shapes differ from the above.
    """
    check_shapes(texture=(texture, ("B", "N", 3)), skin_mask=(skin_mask, ("N",)))
    m = skin_mask.to(texture.dtype).reshape(1, -1, 1)
    total = m.sum()
    mean = (m * texture).sum(dim=1, keepdim=True) / total
    return (((texture - mean) * m) ** 2).sum() / (texture.shape[0] * total)


def perceptual_loss(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Identity loss: the mean of ``1 - cos`` between two sets of features.

    Args:
        feat_a, feat_b: (B, D) L2-normalised identity features.

    Returns:
        () the loss.

    Raises:
        ValueError: the shapes differ from (B, D).
    """
    check_shapes(feat_a=(feat_a, ("B", "D")), feat_b=(feat_b, ("B", "D")))
    return (1.0 - (feat_a * feat_b).sum(dim=-1)).mean()


# --------------------------------------------------------------------------- the hybrid loss
TERMS = ("feat", "color", "lm", "reg", "gamma", "reflc")


@dataclass(frozen=True)
class LossTerms:
    """Weighted loss terms of a batch. ``total`` is their sum, the original's ``loss_all``.

    Attributes:
        feat: () identity term (0 without a recogniser).
        color: () photometric term.
        lm: () landmark term.
        reg: () coefficient regularisation.
        gamma: () lighting prior.
        reflc: () albedo variance over the skin.
        All are 0-dimensional tensors on the inputs' device, each already times its weight.
    """

    feat: torch.Tensor
    color: torch.Tensor
    lm: torch.Tensor
    reg: torch.Tensor
    gamma: torch.Tensor
    reflc: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """() the sum of the six terms (differentiable)."""
        return self.feat + self.color + self.lm + self.reg + self.gamma + self.reflc

    def as_floats(self) -> dict[str, float]:
        """The terms as Python floats, for logging (one device sync).

        Returns:
            ``{'all': total, 'feat': ..., 'color': ..., 'lm': ..., 'reg': ..., 'gamma': ..., 'reflc': ...}``.
        """
        vals = torch.stack([self.total.detach()] + [getattr(self, k).detach() for k in TERMS]).float().cpu()
        return dict(zip(("all",) + TERMS, vals.tolist()))


@dataclass(frozen=True)
class HybridOutput:
    """What :class:`HybridLoss` computed for a batch of B faces.

    Attributes:
        terms: :class:`LossTerms`.
        face: :class:`FaceOutput` of the coefficients.
        render: (B,3,H,W) lit face where covered, 0 elsewhere.
        mask: (B,1,H,W) coverage of ``render``, {0, 1}.
        face_mask: (B,1,H,W) the photometric loss's region (front triangles), detached.
    """

    terms: LossTerms
    face: FaceOutput
    render: torch.Tensor
    mask: torch.Tensor
    face_mask: torch.Tensor


class HybridLoss(nn.Module):
    """Coefficients + images + landmarks -> the weighted loss terms (the original's ``forward`` +
    ``compute_losses`` for a given coefficient tensor).

    Args:
        face_model, renderer: as in :class:`models.facerecon.FaceReconModel`.
        weights: :class:`LossWeights`; ``w_feat`` is ignored (0) without ``recog``.
        recog: a frozen recogniser or None: a module ``recog(image (B,3,H,W), trans_m (B,2,3)) -> (B,D)``
            L2-normalised features with ``recog.crop_transform(lm68 (B,68,2) y up, height) -> (B,2,3)``,
            as :class:`models.recog.RecogNet` (this module does not import it: the recogniser's
            framing is its own).
        use_crop_face: photometric loss only on the front-face triangles (the original's training
            default), else on the whole rendered face.
        front_only: render only the front-face triangles, once, for both the image and the mask
            (half the rendering cost; used by fitting, which has no identity term). The render then
            differs from the full one only where a non-front triangle would hide a front one.
        use_predef_M: warp the render to the recogniser's crop with the input's transform (from the
            target landmarks) instead of one estimated from the predicted landmarks (the original's
            ``--use_predef_M``, default False).

    Raises:
        ValueError: ``front_only`` with a recogniser and ``weights.w_feat`` > 0.
    """

    def __init__(self, face_model: ParametricFaceModel, renderer: nn.Module, weights: LossWeights = LossWeights(),
                 recog: nn.Module | None = None, use_crop_face: bool = True, front_only: bool = False,
                 use_predef_M: bool = False):
        super().__init__()
        if front_only and recog is not None and weights.w_feat > 0:
            raise ValueError("front_only rendering cannot feed the identity loss; use front_only=False")
        self.face_model, self.renderer, self.recog = face_model, renderer, recog
        self.weights = weights
        self.use_crop_face, self.front_only, self.use_predef_M = use_crop_face, front_only, use_predef_M

    def forward(self, coeffs: torch.Tensor, images: torch.Tensor, gt_lm: torch.Tensor,
                atten_mask: torch.Tensor | None = None, gt_trans_m: torch.Tensor | None = None,
                gt_feat: torch.Tensor | None = None) -> HybridOutput:
        """The weighted terms for a batch.

        Args:
            coeffs: (B, 257) coefficients (:data:`models.coeffs.COEFFS`).
            images: (B, 3, H, W) RGB in 0..1, the aligned crops.
            gt_lm: (B, 68, 2) or (B, 5, 2) target landmarks, crop pixels, y up.
            atten_mask: optional (B, 1, H, W) skin attention in 0..1 (ones when None).
            gt_trans_m: optional (B, 2, 3) warp of the input to the recogniser's crop (estimated
                from ``gt_lm`` when None).
            gt_feat: optional (B, D) precomputed identity features of ``images``.

        Returns:
            :class:`HybridOutput`.

        Raises:
            ValueError: a shape differs from the above, or the identity term is on with 5 target
                landmarks and no ``gt_trans_m``.
        """
        w, fm = self.weights, self.face_model
        check_shapes(coeffs=(coeffs, ("B", COEFFS.total)), images=(images, ("B", 3, "H", "W")))
        face = fm(coeffs)
        if self.front_only:
            out = self.renderer(face.vertex, fm.front_face_buf, feat=face.color)
            face_mask = out.mask.detach()
        else:
            out = self.renderer(face.vertex, fm.face_buf, feat=face.color)
            face_mask = out.mask
            if self.use_crop_face:
                with torch.no_grad():  # a region, never differentiated: no autograd graph for it
                    face_mask = self.renderer(face.vertex, fm.front_face_buf).mask
            face_mask = face_mask.detach()
        render, mask = out.image, out.mask

        zero = coeffs.new_zeros(())
        feat = zero
        if self.recog is not None and w.w_feat > 0:
            feat = w.w_feat * self._identity_loss(render, images, face.landmark, gt_lm, gt_trans_m, gt_feat)

        region = face_mask if atten_mask is None else atten_mask.to(face_mask.dtype) * face_mask
        color = w.w_color * photo_loss(render, images, region)
        parts = COEFFS.split(coeffs)
        reg = w.w_reg * coeff_reg_loss(parts, w.w_id, w.w_exp, w.w_tex)
        gamma = w.w_gamma * gamma_loss(parts["gamma"])
        lm = w.w_lm * landmark_loss(face.landmark, gt_lm)
        reflc = w.w_reflc * reflectance_loss(face.texture, fm.skin_mask)
        terms = LossTerms(feat=feat, color=color, lm=lm, reg=reg, gamma=gamma, reflc=reflc)
        return HybridOutput(terms=terms, face=face, render=render, mask=mask, face_mask=face_mask)

    def _identity_loss(self, render, images, pred_lm, gt_lm, gt_trans_m, gt_feat) -> torch.Tensor:
        size = images.shape[-2]
        if gt_trans_m is None and (gt_feat is None or self.use_predef_M):
            if gt_lm.shape[1] != 68:
                raise ValueError("the identity loss needs 68 target landmarks or gt_trans_m")
            gt_trans_m = self.recog.crop_transform(gt_lm, size)
        pred_m = gt_trans_m if self.use_predef_M else self.recog.crop_transform(pred_lm.detach(), size)
        if gt_feat is None:
            with torch.no_grad():
                gt_feat = self.recog(images, gt_trans_m)
        return perceptual_loss(self.recog(render, pred_m), gt_feat)


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Zero the gradients, back-propagate ``loss`` (through ``scaler`` for fp16) and step.

    Args:
        loss: () the loss to minimise.
        optimizer: steps the parameters.
        scaler: a ``torch.amp.GradScaler`` (fp16) or None.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
