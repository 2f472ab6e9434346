"""Per-image fitting: refine predicted coefficients by analysis-by-synthesis (``test.py --fit_steps N``).

The network's coefficients are the starting point; Adam then minimises the training loss of
:mod:`models.losses` - landmark + photometric + coefficient/gamma/reflectance regularisation, with
the training weights, no identity term - through the differentiable renderer. All faces of a batch
are fitted at once: each face's coefficients only receive their own face's gradient (the terms'
batch-wide normalisation aside, which Adam's per-coefficient step sizes absorb). Landmarks are the
5 detected points or 68 points when given: test.py uses ``landmarks/<name>.txt`` (written by
``process_images.sh --landmarks68``) for the faces that have one (:func:`fit_batch`).

Schedule: ``steps`` Adam steps with cosine decay from ``lr`` to ``lr / 10``, learning rates per
group in the groups' own units (``lr_scale``): the default 0.05 (x2 for identity, expression and
albedo) moves a rotation by up to 3 degrees, a translation by up to 5 pixels at 224 and an
identity coefficient by a tenth of its standard deviation per step, at first. The first
``landmark_steps`` steps (default: a third) use only the landmark and regularisation terms, which
need no rendering: they settle pose (and, given 68 points, shape) cheaply before the photometric
term refines everything with albedo and lighting. With only 5 points that first stage moves the
pose alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from models.bfm import gather_vertices
from models.coeffs import COEFFS
from models.loss_weights import LossWeights
from models.losses import HybridLoss, coeff_reg_loss, gamma_loss, landmark_loss, reflectance_loss
from util.checks import check_shape

FIT_GROUPS = COEFFS.names  # id, exp, tex, angle, gamma, trans


@dataclass(frozen=True)
class FitConfig:
    """Fitting settings (see module docstring).

    Attributes:
        steps: number of Adam steps (:func:`fit_coeffs` overrides it with its ``steps``).
        lr: base learning rate.
        weights: the loss weights (training defaults; ``w_feat`` is not used).
        groups: coefficient groups that are optimised (names of :data:`FIT_GROUPS`); the others stay
            as predicted.
        lr_scale: per-group multipliers of ``lr``, as (name, factor) pairs (1 for a group not listed).
        landmark_steps: leading steps without the photometric term (None: steps // 3).
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        sparse_landmark_groups: the groups the landmark stage moves when only 5 points are given
            (5 points cannot pin down 144 shape coefficients: they would bend the face to fit them).
        front_only: the photometric term renders only the front-face triangles, once (test.py's
            fitting: half the rendering, and stable at the default rates); False: the training
            loss exactly (the whole face rendered, the front-face triangles' coverage as the mask),
            whose minimum is what ``experiments.recovery`` measures fitting against; it needs
            lower rates (docs/training.md).
        share: this phase's share of the steps when :func:`fit_coeffs` is given several configs,
            one after the other (the last phase takes what the others leave).
    """

    steps: int = 100
    lr: float = 0.05
    weights: LossWeights = LossWeights(w_feat=0.0)
    groups: tuple[str, ...] = FIT_GROUPS
    lr_scale: tuple[tuple[str, float], ...] = (("id", 2.0), ("exp", 2.0), ("tex", 2.0), ("angle", 1.0),
                                                ("gamma", 1.0), ("trans", 1.0))
    landmark_steps: int | None = None
    min_lr_ratio: float = 0.1
    sparse_landmark_groups: tuple[str, ...] = ("angle", "trans")
    front_only: bool = True
    share: float = 1.0


FIT_LOSSES = ("front", "train", "staged")  # test.py --fit_loss

FitPlan = FitConfig | tuple[FitConfig, ...]  # one config, or phases run one after the other


def fit_config(loss: str = "front") -> FitPlan:
    """test.py's fitting settings for ``--fit_loss``.

    Args:
        loss: ``front``: :class:`FitConfig`'s defaults (front-face triangles only; x2 rates for
            identity, expression and albedo; a landmark-only third; cosine to a tenth): good in a few
            hundred steps. ``train``: the training loss exactly, one rate of 0.005 for every group,
            cosine to 0, no landmark-only stage: slower at first, but on the synthetic recovery
            experiment it came within 1.12x of the loss's per-face optimum after 1500 steps and 1.06x
            after 3000, where ``front`` levels off at 1.3-1.5x (one H200; docs/training.md).
            ``staged``: three phases, the way ``experiments.recovery`` finds the loss's optimum from
            the mean face: 5 % of the steps of ``front`` at 0.02 (its landmark third first), then the
            training loss exactly at one rate for every group, 13 % of the steps at 0.003 and the
            rest at 0.005, each cosine-decayed to 0 with a fresh Adam: in 3000 steps from a trained
            regressor it reached the optimum's loss and 1.04-1.045x its vertex error in two runs.

    Raises:
        ValueError: an unknown ``loss``.
    """
    if loss == "front":
        return FitConfig()
    uniform = tuple((k, 1.0) for k in FIT_GROUPS)
    train = FitConfig(lr=0.005, lr_scale=uniform, landmark_steps=0, min_lr_ratio=0.0, front_only=False)
    if loss == "train":
        return train
    if loss == "staged":
        return (FitConfig(lr=0.02, share=0.05), dataclasses.replace(train, lr=0.003, share=0.13), train)
    raise ValueError(f"unknown fitting loss {loss!r}; choose from {FIT_LOSSES}")


def landmark_stage_loss(face_model, coeffs: torch.Tensor, target: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """The hybrid loss without its image terms: landmark, regularisation, gamma and reflectance
    (no rendering: a cheaper face model pass). Fitting's first stage and a training curriculum's.

    Args:
        face_model: a :class:`models.bfm.ParametricFaceModel`.
        coeffs: (B, 257) coefficients.
        target: (B, 68, 2) or (B, 5, 2) landmarks, crop pixels, y up.
        w: the weights (``w_lm``, ``w_reg`` with ``w_id``/``w_exp``/``w_tex``, ``w_gamma``, ``w_reflc``).

    Returns:
        () the weighted sum of those terms.
    """
    c = COEFFS.split(coeffs)
    shape = face_model.compute_shape(c["id"], c["exp"])
    rot = face_model.compute_rotation(c["angle"])
    kp = face_model.to_camera(gather_vertices(shape, face_model.keypoints) @ rot + c["trans"].unsqueeze(1))
    lm = face_model.project(kp)
    tex = face_model.compute_texture(c["tex"])
    return (w.w_lm * landmark_loss(lm, target) + w.w_reg * coeff_reg_loss(c, w.w_id, w.w_exp, w.w_tex)
            + w.w_gamma * gamma_loss(c["gamma"]) + w.w_reflc * reflectance_loss(tex, face_model.skin_mask))


def plan_phases(plan: FitPlan | None) -> tuple[FitConfig, ...]:
    """A plan as its phases: a tuple as it is, one config (None: the defaults) as one phase.

    Raises:
        ValueError: an empty tuple.
    """
    phases = plan if isinstance(plan, tuple) else (plan or FitConfig(),)
    if not phases:
        raise ValueError("a fitting plan needs at least one phase (got an empty tuple)")
    return phases


def plan_record(plan: FitPlan | None, steps: int) -> list[dict]:
    """Each phase's settings for a results file, with the steps it takes of ``steps``
    (:func:`phase_steps`) as its ``steps``."""
    phases = plan_phases(plan)
    return [dataclasses.asdict(dataclasses.replace(cfg, steps=n)) for cfg, n in zip(phases, phase_steps(steps, phases))]


def phase_steps(steps: int, phases: tuple[FitConfig, ...]) -> list[int]:
    """How many of ``steps`` each phase takes: ``round(share * steps)`` in order, the last phase
    what is left (never below 0)."""
    counts, left = [], int(steps)
    for cfg in phases[:-1]:
        n = min(left, int(round(cfg.share * steps)))
        counts.append(n)
        left -= n
    return counts + [left]


def fit_coeffs(model, coeffs: torch.Tensor, images: torch.Tensor, lm: torch.Tensor | None = None,
               steps: int = 100, lm68: torch.Tensor | None = None, atten_mask: torch.Tensor | None = None,
               config: FitPlan | None = None, callback=None) -> torch.Tensor:
    """Refine coefficients of B faces.

    Args:
        model: a :class:`models.facerecon.FaceReconModel` (its face model and renderer are used).
        coeffs: (B, 257) starting coefficients (e.g. the network's prediction).
        images: (B, 3, H, W) aligned crops, RGB 0..1.
        lm: (B, 5, 2) detected points, crop pixels, y up (ignored when ``lm68`` is given).
        steps: number of Adam steps (overrides ``config.steps``); 0 returns ``coeffs`` unchanged.
        lm68: optional (B, 68, 2) landmarks, crop pixels, y up (weighted 68-point loss).
        atten_mask: optional (B, 1, H, W) skin attention for the photometric term.
        config: the settings (None: :class:`FitConfig` defaults); its ``steps`` is replaced by ``steps``.
            A tuple of configs runs them as phases, one after the other from where the last ended,
            each with a fresh Adam and its ``share`` of the steps (:func:`phase_steps`).
        callback: optional ``f(step, coeffs)`` called before each step (for figures), with the
            (B, 257) detached coefficients of that step (steps counted across phases).

    Returns:
        (B, 257) refined coefficients, detached, same device and dtype as ``coeffs`` (a detached
        copy of ``coeffs`` when ``steps`` <= 0).

    Raises:
        ValueError: neither ``lm`` nor ``lm68`` is given; ``coeffs`` is not (B, 257); the batch sizes
            of coefficients, images and landmarks differ; ``config.groups`` names an unknown group.
    """
    phases = plan_phases(config)
    target = lm68 if lm68 is not None else lm
    if target is None:
        raise ValueError("fit_coeffs needs landmarks: lm (B, 5, 2) or lm68 (B, 68, 2)")
    check_shape(coeffs, ("B", COEFFS.total), "coeffs")
    if target.shape[0] != coeffs.shape[0] or images.shape[0] != coeffs.shape[0]:
        raise ValueError(f"batch sizes differ: coeffs {coeffs.shape[0]}, images {images.shape[0]}, "
                         f"landmarks {target.shape[0]}")
    unknown = set().union(*(cfg.groups for cfg in phases)) - set(FIT_GROUPS)
    if unknown:
        raise ValueError(f"unknown coefficient groups {sorted(unknown)}; choose from {FIT_GROUPS}")
    out, first = coeffs.detach().clone(), 0
    for cfg, n in zip(phases, phase_steps(steps, phases)):
        if n > 0:
            out = _fit_phase(model, out, images, target, dataclasses.replace(cfg, steps=n), atten_mask, callback,
                             first)
        first += n
    return out


def _fit_phase(model, coeffs: torch.Tensor, images: torch.Tensor, target: torch.Tensor, cfg: FitConfig,
               atten_mask: torch.Tensor | None, callback, first: int) -> torch.Tensor:
    """One phase of :func:`fit_coeffs`: ``cfg.steps`` (> 0) Adam steps from ``coeffs`` (checked
    there); ``callback`` sees steps ``first``, ``first + 1``, ..."""
    dtype = coeffs.dtype
    start = {k: v.detach().clone() for k, v in COEFFS.split(coeffs.detach()).items()}
    params = {k: start[k].clone().requires_grad_(True) for k in cfg.groups}
    scale = dict(cfg.lr_scale)
    opt = torch.optim.Adam([{"params": [params[k]], "lr": cfg.lr * scale.get(k, 1.0), "base": scale.get(k, 1.0)}
                            for k in cfg.groups])
    loss_fn = HybridLoss(model.face_model, model.renderer, dataclasses.replace(cfg.weights, w_feat=0.0),
                         front_only=cfg.front_only)
    images = images.to(dtype)
    target = target.to(dtype)
    n_lm = cfg.steps // 3 if cfg.landmark_steps is None else min(cfg.landmark_steps, cfg.steps)

    def current(frozen: tuple[str, ...] = ()) -> torch.Tensor:
        return COEFFS.merge({k: params[k].detach() if k in frozen else params.get(k, start[k])
                             for k in COEFFS.names})

    sparse = target.shape[1] < 68
    lm_frozen = tuple(k for k in cfg.groups if sparse and k not in cfg.sparse_landmark_groups)

    with torch.enable_grad():
        for step in range(cfg.steps):
            frac = step / max(1, cfg.steps - 1)
            decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * group["base"] * decay
            c = current(lm_frozen if step < n_lm else ())
            if callback is not None:
                callback(first + step, c.detach())
            if step < n_lm:
                loss = landmark_stage_loss(model.face_model, c, target, loss_fn.weights)
            else:
                loss = loss_fn(c, images, target, atten_mask=atten_mask).terms.total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return current().detach()


def fit_batch(model, coeffs: torch.Tensor, images: torch.Tensor, lm: torch.Tensor, steps: int,
              lm68: torch.Tensor | None = None, has_lm68: torch.Tensor | None = None,
              config: FitPlan | None = None) -> torch.Tensor:
    """:func:`fit_coeffs` for a batch in which only some faces may have 68 landmarks.

    Faces with 68 landmarks are fitted to them, the rest to their 5 points (two fits, each batched).

    Args:
        model: a :class:`models.facerecon.FaceReconModel`.
        coeffs: (B, 257) starting coefficients.
        images: (B, 3, H, W) aligned crops, RGB 0..1.
        lm: (B, 5, 2) detected points, crop pixels, y up.
        steps: number of Adam steps.
        lm68: optional (B, 68, 2) landmarks, crop pixels, y up.
        has_lm68: optional (B,) bool (any device) marking the rows of ``lm68`` that hold real
            landmarks (the others are ignored).
        config: as :func:`fit_coeffs`.

    Returns:
        (B, 257) refined coefficients, detached, on ``coeffs``' device and dtype.

    Raises:
        ValueError: as :func:`fit_coeffs`.
    """
    if lm68 is None or has_lm68 is None or not bool(has_lm68.any()):
        return fit_coeffs(model, coeffs, images, lm, steps=steps, config=config)
    has = has_lm68.to(coeffs.device, torch.bool)
    if bool(has.all()):
        return fit_coeffs(model, coeffs, images, lm, steps=steps, lm68=lm68, config=config)
    out = coeffs.detach().clone()
    out[has] = fit_coeffs(model, coeffs[has], images[has], lm[has], steps=steps, lm68=lm68[has], config=config)
    out[~has] = fit_coeffs(model, coeffs[~has], images[~has], lm[~has], steps=steps, config=config)
    return out
