"""Per-image fitting (test.py --fit_steps): recovers landmarks on a tiny face model, batched,
returns detached coefficients, leaves unfitted groups alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.bfm import ParametricFaceModel
from models.coeffs import COEFFS
from models.facerecon import FaceReconModel
from models.fitting import FitConfig, fit_coeffs
from models.losses import lm68_to_5
from models.renderer import create_renderer

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tiny_model_dict):
    center, focal = SIZE / 2, 1015.0 * SIZE / 224
    fm = ParametricFaceModel(tiny_model_dict, focal=focal, center=center)
    model = FaceReconModel(nn.Identity(), fm, create_renderer("cpu", focal=focal, center=center))
    g = torch.Generator().manual_seed(0)
    true = torch.zeros(3, COEFFS.total)
    sl = COEFFS.slices()
    true[:, sl["id"]] = torch.randn(3, COEFFS.id, generator=g)
    true[:, sl["angle"]] = torch.randn(3, 3, generator=g) * 0.15
    true[:, sl["trans"]] = torch.randn(3, 3, generator=g) * torch.tensor([0.05, 0.05, 0.3])
    with torch.no_grad():
        face = fm(true)
        out = model.renderer(face.vertex, fm.face_buf, feat=face.color)
    images = out.image * out.mask + 0.5 * (1 - out.mask)
    return model, true, images, face.landmark


def lm_err(model, coeffs, target):
    with torch.no_grad():
        lm = model.face_model(coeffs).landmark
    if target.shape[1] == 5:
        lm = lm68_to_5(lm)
    return float((lm - target).norm(dim=-1).mean())


def test_fit_68_points_recovers_landmarks(tiny):
    model, true, images, lm68 = tiny
    start = torch.zeros_like(true)
    before = lm_err(model, start, lm68)
    fitted = fit_coeffs(model, start, images, steps=60, lm68=lm68, config=FitConfig(lr=0.05))
    after = lm_err(model, fitted, lm68)
    assert before > 3.0 and after < 0.25 * before, (before, after)
    assert fitted.shape == true.shape and fitted.dtype == true.dtype and not fitted.requires_grad


def test_fit_5_points_as_test_py(tiny):
    model, true, images, lm68 = tiny
    lm5 = lm68_to_5(lm68)
    start = torch.zeros_like(true)
    # the network's coefficients come from inference mode in test.py
    with torch.inference_mode():
        start = start + 0
    before = lm_err(model, start, lm5)
    fitted = fit_coeffs(model, start, images, lm5, steps=40, config=FitConfig(lr=0.05))
    assert lm_err(model, fitted, lm5) < 0.25 * before


def test_fit_batch_elements_are_independent(tiny):
    model, true, images, lm68 = tiny
    cfg = FitConfig(lr=0.05, landmark_steps=20)
    both = fit_coeffs(model, torch.zeros_like(true), images, steps=20, lm68=lm68, config=cfg)
    one = fit_coeffs(model, torch.zeros_like(true[:1]), images[:1], steps=20, lm68=lm68[:1], config=cfg)
    # regularisation terms divide by B, so compare with a tolerance rather than exactly
    assert torch.allclose(both[:1, COEFFS.slices()["angle"]], one[:, COEFFS.slices()["angle"]], atol=0.05)


def test_fit_steps_zero_groups_and_errors(tiny):
    model, true, images, lm68 = tiny
    start = torch.randn(3, COEFFS.total) * 0.1
    same = fit_coeffs(model, start, images, lm68_to_5(lm68), steps=0)
    assert torch.equal(same, start) and same is not start
    pose_only = fit_coeffs(model, start, images, steps=5, lm68=lm68,
                           config=FitConfig(groups=("angle", "trans"), landmark_steps=3))
    moved = {k for k, s in COEFFS.slices().items() if not torch.equal(pose_only[:, s], start[:, s])}
    assert moved == {"angle", "trans"}
    # with 5 points the landmark stage moves the pose only; 68 points move the shape too
    five = fit_coeffs(model, start, images, lm68_to_5(lm68), steps=5, config=FitConfig(landmark_steps=5))
    sixty_eight = fit_coeffs(model, start, images, steps=5, lm68=lm68, config=FitConfig(landmark_steps=5))
    ids = COEFFS.slices()["id"]
    assert torch.equal(five[:, ids], start[:, ids]) and not torch.equal(sixty_eight[:, ids], start[:, ids])
    assert not torch.equal(five[:, COEFFS.slices()["angle"]], start[:, COEFFS.slices()["angle"]])
    with pytest.raises(ValueError, match="landmarks"):
        fit_coeffs(model, start, images, None, steps=3)
    with pytest.raises(ValueError, match="coeffs"):
        fit_coeffs(model, start[:, :100], images, lm68_to_5(lm68), steps=3)
    with pytest.raises(ValueError, match="batch"):
        fit_coeffs(model, start[:2], images, lm68_to_5(lm68), steps=3)
    with pytest.raises(ValueError, match="groups"):
        fit_coeffs(model, start, images, lm68_to_5(lm68), steps=3, config=FitConfig(groups=("shape",)))


@pytest.mark.parametrize("front_only", [True, False])
def test_fit_minimises_the_loss_it_is_told(tiny, front_only, monkeypatch):
    """Fitting (no landmark stage, one rate for all groups) is Adam on HybridLoss with the same
    ``front_only``, step for step: the same coefficients as Adam run here independently."""
    import dataclasses
    import math

    from models.losses import HybridLoss

    model, true, images, lm68 = tiny
    start = true + 0.1 * torch.randn(true.shape, generator=torch.Generator().manual_seed(1))
    steps = 3
    cfg = FitConfig(lr=0.01, landmark_steps=0, lr_scale=tuple((k, 1.0) for k in COEFFS.names), front_only=front_only)
    fitted = fit_coeffs(model, start, images, steps=steps, lm68=lm68, config=cfg)
    loss_fn = HybridLoss(model.face_model, model.renderer, dataclasses.replace(cfg.weights, w_feat=0.0),
                         front_only=front_only)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    for t in range(steps):  # the cosine schedule from lr to lr * min_lr_ratio
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / (steps - 1)))
        opt.param_groups[0]["lr"] = cfg.lr * decay
        opt.zero_grad()
        loss_fn(x, images, lm68).terms.total.backward()
        opt.step()
    assert torch.allclose(fitted, x.detach(), atol=1e-6)
    # the two losses differ only where a non-front triangle hides a front one (none on this tiny
    # model), so which one fitting built is read from its construction
    import models.fitting as fitting

    built = []
    monkeypatch.setattr(fitting, "HybridLoss", lambda *a, **kw: built.append(kw) or HybridLoss(*a, **kw))
    fit_coeffs(model, start, images, steps=1, lm68=lm68, config=cfg)
    assert [kw.get("front_only") for kw in built] == [front_only]


def test_phases_run_one_after_the_other(tiny):
    """A tuple of configs is fitted as phases: the same coefficients as fitting with the first
    config for its share of the steps and then with the second from there (each call its own
    Adam); the callback counts steps across the phases; the shares round, the last phase takes
    the rest."""
    from models.fitting import phase_steps

    model, true, images, lm68 = tiny
    start = true + 0.1 * torch.randn(true.shape, generator=torch.Generator().manual_seed(2))
    first = FitConfig(lr=0.02, landmark_steps=1, share=0.4)
    second = FitConfig(lr=0.005, landmark_steps=0, min_lr_ratio=0.0, front_only=False)
    seen = []
    both = fit_coeffs(model, start, images, steps=5, lm68=lm68, config=(first, second),
                      callback=lambda step, c: seen.append(step))
    by_hand = fit_coeffs(model, fit_coeffs(model, start, images, steps=2, lm68=lm68, config=first), images, steps=3,
                         lm68=lm68, config=second)
    assert torch.equal(both, by_hand) and not torch.equal(both, start)
    assert seen == [0, 1, 2, 3, 4]
    assert phase_steps(5, (first, second)) == [2, 3]
    assert phase_steps(3000, (FitConfig(share=0.05), FitConfig(share=0.13), FitConfig())) == [150, 390, 2460]
    assert phase_steps(1, (FitConfig(share=0.9), FitConfig())) == [1, 0]
    assert torch.equal(fit_coeffs(model, start, images, steps=0, lm68=lm68, config=(first, second)), start)
    with pytest.raises(ValueError, match="empty"):
        fit_coeffs(model, start, images, steps=3, lm68=lm68, config=())


def test_staged_plan_is_the_optimum_search_from_a_start():
    """test.py --fit_loss staged: a short front-only phase, then the training loss exactly (one
    rate, cosine to 0) at 0.003, then at 0.005."""
    from models.fitting import fit_config

    front, slow, train = fit_config("staged")
    assert front.front_only and front.lr == 0.02 and front.share == 0.05
    assert not slow.front_only and not train.front_only and (slow.lr, train.lr) == (0.003, 0.005)
    assert {v for _, v in slow.lr_scale} == {v for _, v in train.lr_scale} == {1.0}
    assert slow.landmark_steps == train.landmark_steps == 0 and slow.min_lr_ratio == train.min_lr_ratio == 0.0
    assert train == fit_config("train")


def test_fitting_eval_records_a_staged_plan(standin, tmp_path):
    """experiments.fitting_eval --loss staged fits with test.py's three phases and records each
    phase's settings; the fitted landmarks move towards the given 68 points."""
    import json

    import numpy as np

    from conftest import golden_lm5, make_photo_folder
    from experiments.fitting_eval import main
    from models.fitting import fit_config
    from util.detections_io import LANDMARKS_DIR, detection_path, write_points

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    five = np.array(golden_lm5()["000002.jpg"], dtype=np.float64)
    # 68 points spread around the detected 5 (any 68 points will do: the check is that fitting moves to them)
    ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 68)), np.sin(np.linspace(0, 2 * np.pi, 68))], 1)
    lm68 = five.mean(0) + ring * np.ptp(five, 0) * 0.6
    write_points(detection_path(folder, "000002.jpg", subdir=LANDMARKS_DIR), lm68)
    out = tmp_path / "out"
    assert main(["--device", "cpu", "--img_folder", folder, "--targets", "68", "--steps", "20", "--loss", "staged",
                 "--name", standin["name"], "--checkpoints_dir", standin["checkpoints_dir"],
                 "--bfm_folder", standin["bfm_folder"], "--out", str(out), "--image", ""]) == 0
    res = json.load(open(out / "fitting_eval.json"))
    phases = fit_config("staged")
    assert [p["lr"] for p in res["fit_config"]] == [p.lr for p in phases]
    assert [p["share"] for p in res["fit_config"]] == [p.share for p in phases]
    assert [p["front_only"] for p in res["fit_config"]] == [True, False, False]
    assert [p["steps"] for p in res["fit_config"]] == [1, 3, 16]  # 5 % and 13 % of the 20 steps, the rest
    before, fitted = res["per_face"]["000002"]["before"], res["per_face"]["000002"]["fit68"]
    assert np.isfinite([before, fitted]).all() and fitted < before
