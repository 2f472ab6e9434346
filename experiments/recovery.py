"""Synthetic recovery experiment: does training with the hybrid loss recover known faces?

    python -m experiments.recovery --bfm_folder standin/BFM --device cuda --minutes 9.5 \
        --net_recon resnet18 --amp none --lr 1e-3 --out docs/recovery      # the documented run
    python -m experiments.recovery --oracle_only true --device cpu --eval_size 128   # bounds only
    python -m experiments.recovery --train_only true --device cuda --out run          # the same in two calls:
    python -m experiments.recovery --from_run run --device cuda --fit_steps 300,2000 --out eval   # (train, evaluate)

Random faces of the (stand-in) face model are rendered on the fly on the device (random identity,
expression, albedo, pose, lighting and background; :mod:`data.synthetic`). The regressor is
trained from random initialisation with the paper's weakly-supervised loss only - photometric,
68-landmark, regularisation, gamma and reflectance terms through the differentiable renderer, no
coefficient supervision and no identity network - until ``--minutes`` (everything included:
set-up, rendering, training, evaluation) minus a reserve for the final evaluation.

Before training, the per-face optimum of the same loss is measured on the first ``--optimum_faces``
held-out faces (:func:`loss_optimum`: minimised from the truth and from the fitted mean face, the
lower end kept): the yardstick of the vertex target.

Evaluation on ``--eval_size`` held-out renders (a separate seed):
  * vertex error: mean distance between predicted and true model-space shapes (identity +
    expression, before pose), as a fraction of the same for the mean face; the target is the
    regressor's at most 1.25x the optimum's on the optimum's faces (1.05x with ``--fit_steps``);
  * pose error: geodesic angle between predicted and true head rotations, degrees (target <= 2);
  * landmark error: mean distance of the 68 projected landmarks, pixels at 224 (target <= 2).
Two geometric variants are reported beside them, because the stand-in's synthetic shape bases
(unlike the real BFM's, which are built from Procrustes-aligned scans) contain rigid motion:
about 45 % of their identity variance is a translation, rotation or scaling of the mean face
(``rigid_fraction`` in the results), a part of each basis that no image can tell apart from pose
(only the rest of the basis identifies its coefficient):
  * ``vertex_error_ratio_aligned``: the same ratio after a similarity (Procrustes) alignment of
    the predicted shape, and of the mean face, to the true shape - the usual protocol of 3D face
    benchmarks;
  * ``orientation_error_deg``: the angle between the true and predicted head orientations in
    camera space, each the rotation parameter composed with the rotation that best aligns the
    mean face to the shape (so a rotation carried by the shape bases counts as head pose).
Writes ``<out>/recovery.json`` (figures, hardware, settings, curve), ``<out>/learning_curve.png`` and
``<out>/samples.png`` (held-out renders | prediction overlaid, true landmarks blue, predicted red).
``--train_only`` writes the checkpoint and a partial recovery.json (no optimum, no final figures);
``--from_run`` evaluates such a run's folder (the same figures as one call from the same weights).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.loss_weights import LossWeights
from options.base_options import build_parser, opt
from data.synthetic import SyntheticConfig

log = logging.getLogger("recovery")

WEIGHTS, SYNTHETIC = LossWeights(), SyntheticConfig()  # defaults defined once, where they are used
# issue #19: the regressor's vertex error against the per-face optimum of its own loss, measured in
# the same run on the same faces; pose and landmarks absolute (degrees, pixels at 224)
TARGETS = {"vertex_vs_optimum": 1.25, "pose_error_deg": 2.0, "lm_error_px": 2.0}
FITTED_VERTEX_VS_OPTIMUM = 1.05  # with --fit_steps
PLANNED_FIT_LOSSES = ("staged",)  # --fit_loss values fitted with test.py's plan as it is (no --fit_* rates)
CURVE_KEYS = ("vertex_error_ratio", "pose_error_deg", "lm_error_px")  # the learning curve's figures
LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # lr x (batch / 32) ** power
GEOMETRY = ("id", "exp", "angle", "trans")  # what the appearance stage's photometric term does not train


def write_json(path: str, obj, indent: int = 2) -> None:
    """Write an experiment's results to ``path`` (its folder made as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


@dataclass
class RecoveryOptions:
    bfm_folder: str = opt("standin/BFM", "face model folder (python -m tools.standin builds standin/BFM)")
    bfm_model: str = opt("BFM_model_front.mat", "converted face model file in --bfm_folder")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    renderer: str = opt("auto", "auto (nvdiffrast on CUDA when installed, else the PyTorch rasterizer) | cpu | cuda",
                        choices=["auto", "cpu", "cuda", "opengl"])
    minutes: float = opt(9.5, "wall-clock budget for everything (set-up, training, evaluation)")
    eval_reserve_s: float = opt(40.0, "seconds kept for the final evaluation and writing the results")
    max_steps: int = opt(0, "stop training after this many steps (0 = only the time budget)")
    batch_size: int = opt(32, "synthetic faces per step")
    net_recon: str = opt("resnet18", "regressor backbone (resnet18: the best measured within the budget)",
                         choices=["resnet18", "resnet34", "resnet50"])
    lr: float = opt(1e-3, "Adam learning rate at batch 32 (peak; linear warm-up then cosine decay over the time "
                          "budget); other batch sizes scale it by --lr_rule")
    lr_rule: str = opt("none", "learning rate for other batch sizes: none (as given) | sqrt | linear: "
                               "lr x (batch_size / 32) ** (0, 0.5, 1)", choices=list(LR_RULES))
    channels_last: str = opt("auto", "network input and weights in channels_last memory format: auto (on CUDA) | "
                                     "true | false", choices=["auto", "true", "false"])
    curriculum: float = opt(0.0, "fraction of the training budget spent on the landmark, regularisation, gamma and "
                                 "reflectance terms alone (no render of the prediction), the photometric term after "
                                 "(0 = the whole loss from the start; 1 = landmarks only, texture and lighting "
                                 "untrained: in session 36 the best shape of any run)")
    curriculum_ramp: float = opt(0.0, "after --curriculum's landmark stage, fraction of the training budget over which "
                                      "the photometric term's weight rises linearly from 0 to --w_color (0 = at once; "
                                      "in session 34 it did not prevent the shape's rise when that term joins)")
    appearance_stage: float = opt(0.0, "after --curriculum's landmark stage, fraction of the training budget in which "
                                       "the photometric term trains only the appearance (texture and lighting "
                                       "coefficients: the render's geometry is detached, landmarks and "
                                       "regularisation still train it), the whole loss after (0 = none; "
                                       "--curriculum + this = 1: no whole-loss stage, the photometric term never "
                                       "trains the geometry)")
    appearance_grad: float = opt(1.0, "scale of the gradient that the texture and lighting heads pass back into the "
                                      "shared backbone (1 = the original's training; 0 = those heads read features "
                                      "that only the geometry's gradients train; in session 35 it learnt no "
                                      "appearance and lost the shape)")
    appearance_net: str = opt("shared", "shared: one backbone predicts all coefficients (the original) | separate: "
                                        "texture and lighting come from a second backbone of --net_recon "
                                        "(SplitReconNet), so the photometric term's appearance gradient never reaches "
                                        "the geometry's features (an experiment's checkpoint, not test.py's format)",
                              choices=["shared", "separate"])
    appearance_downscale: int = opt(1, "with --appearance_net separate: the appearance backbone reads the image "
                                       "averaged over NxN pixel blocks (2: 112 px of 224, about a quarter of its "
                                       "cost; texture and lighting are smooth); on the H200 in session 36: 43 "
                                       "steps/s in the whole-loss stage, 68 in the landmark stage (one shared "
                                       "backbone: 87)")
    cuda_graph: str = opt("auto", "replay the network's training forward and backward from CUDA graphs "
                                  "(models.networks.graphed_for_training; the same gradients, fewer kernel launches): "
                                  "auto (on CUDA with --amp none, as measured) | true (CUDA only; with --amp the "
                                  "capture runs under autocast, not measured) | false", choices=["auto", "true", "false"])
    fused_adam: str = opt("auto", "Adam's fused implementation (one kernel for all parameters) instead of PyTorch's "
                                  "default (foreach): auto (on CUDA) | true | false", choices=["auto", "true", "false"])
    data_chunk: int = opt(8, "draw and render the synthetic training faces this many batches at a time (1: one "
                             "batch per step, as before session 33)")
    warmup: float = opt(0.03, "fraction of the budget spent warming the learning rate up")
    amp: str = opt("none", "network precision: none (fp32; a bf16 run learnt no shape) | auto (bf16 on CUDA) "
                           "| bf16 | fp16", choices=["auto", "none", "bf16", "fp16"])
    size: int = opt(224, "image size (the camera is scaled with it; landmark errors are reported at 224)")
    eval_size: int = opt(512, "held-out renders for the final figures")
    eval_batch: int = opt(64, "batch size of evaluation")
    curve_size: int = opt(128, "held-out renders for the learning curve")
    curve_every_s: float = opt(20.0, "seconds between learning-curve points")
    profile_steps: int = opt(20, "time the phases of this many steps with device syncs (step_ms in the results)")
    profile_start: int = opt(10, "first step timed (after warm-up)")
    oracle_only: bool = opt(False, "only compute the landmark oracles (no training; writes <out>/oracles.json)")
    oracle_steps: int = opt(1500, "steps of the landmark oracle on the held-out faces (0 = off; see landmark_oracle)")
    loss_oracle_steps: int = opt(0, "with --oracle_only: also refine the held-out faces' TRUE coefficients this many "
                                    "steps on the training loss (0 = off; see training_loss_oracle)")
    fit_steps: str = opt("0", "also report the held-out figures after per-image fitting (test.py --fit_steps: "
                              "fit_coeffs with the true 68 landmarks) of this many steps, from the regressor's "
                              "prediction; a comma list (300,1000,2000) reports each count, the verdict uses the "
                              "largest; with --oracle_only from the mean face (0 = off; raise --eval_reserve_s)")
    fit_faces: int = opt(0, "fit only the first M held-out faces for those figures (0 = all --eval_size); the "
                            "optimum's faces, the first of them, are always fitted")
    optimum_faces: int = opt(32, "held-out faces (the first of the test set) whose per-face optimum of the training "
                                 "loss is measured before training, the yardstick of the vertex target (0 = off)")
    optimum_refine_steps: int = opt(400, "Adam steps at 3e-3 that start that minimisation (see loss_optimum)")
    optimum_steps: int = opt(1500, "Adam steps of each round of that minimisation after those")
    optimum_rounds: int = opt(1, "rounds of --optimum_steps")
    optimum_lr: float = opt(0.005, "peak learning rate of those rounds (cosine-decayed in each)")
    fit_lr: float = opt(0.02, "base learning rate of that fitting (test.py's FitConfig.lr is 0.05: tuned for an "
                              "untrained network's start on real photos; 0.02 fits these better from a trained one)")
    fit_min_lr: float = opt(0.1, "that fitting's rate decays (cosine) to this fraction of --fit_lr (test.py's 0.1)")
    fit_landmark_share: float = opt(-1.0, "share of that fitting's steps on the landmark terms alone (-1: test.py's "
                                          "third)")
    fit_loss: str = opt("front", "the loss that fitting minimises: 'front' (test.py's: only the front-face triangles "
                                 "rendered) or 'train' (the training loss exactly, whose optimum is the yardstick), "
                                 "each with the --fit_* settings below; 'staged': test.py's --fit_loss staged exactly "
                                 "(models.fitting.fit_config; the --fit_* rates do not apply); a comma list "
                                 "('train,staged') fits each from the same regressor (the first gives the verdict, "
                                 "the others' counts are reported as 'staged:N')")
    fit_mean_start: bool = opt(False, "also fit each face from the mean face (all coefficients 0) with the same "
                                      "settings and keep, per face, the end with the lower training loss (reported "
                                      "as '<key>+mean')")
    fit_uniform_rates: bool = opt(False, "one rate for every coefficient group in that fitting (test.py's fitting "
                                         "doubles it for identity, expression and albedo)")
    seed: int = opt(0, "seed of initialisation and training data (held-out data uses seed + 1000)")
    out: str = opt("docs/recovery", "folder for recovery.json and learning_curve.png")
    checkpoint: str = opt("", "also save the trained regressor here (original checkpoint format); with "
                              "--train_only the default is <out>/regressor.pth, with --from_run the file read")
    train_only: bool = opt(False, "train and save only: the checkpoint and a partial <out>/recovery.json (curve, "
                                  "steps, timings, options; no optimum, no final figures, no fitting), for a later "
                                  "--from_run call")
    from_run: str = opt("", "evaluate a --train_only run's folder without training: its recovery.json and "
                            "regressor.pth (or --checkpoint) are read, the optimum, final and fitted figures computed "
                            "and written with its curve to --out; the training options come from the run")
    ema: float = opt(0.0, "exponential moving average of the network's weights with this decay (e.g. 0.999), "
                          "updated every step; evaluation, the curve, fitting and the checkpoint use it (0 = off)")
    id_std: float = opt(SYNTHETIC.id_std, "synthetic identity coefficient std")
    exp_std: float = opt(SYNTHETIC.exp_std, "synthetic expression coefficient std")
    tex_std: float = opt(SYNTHETIC.tex_std, "synthetic albedo coefficient std")
    yaw: float = opt(SYNTHETIC.yaw, "synthetic yaw half-range, degrees")
    pitch: float = opt(SYNTHETIC.pitch, "synthetic pitch half-range, degrees")
    roll: float = opt(SYNTHETIC.roll, "synthetic roll half-range, degrees")
    light_ambient: float = opt(SYNTHETIC.light_ambient, "synthetic ambient light half-range")
    light_dir: float = opt(SYNTHETIC.light_dir, "synthetic directional light std")
    light_high: float = opt(SYNTHETIC.light_high, "synthetic second-order light std")
    in_range: bool = opt(SYNTHETIC.in_range, "move each synthetic face's lighting toward neutral until its colours "
                                             "stay in 0..1 (no clipped renders; see data.synthetic)")
    w_color: float = opt(WEIGHTS.w_color, "photometric weight (the original's)")
    w_lm: float = opt(WEIGHTS.w_lm, "landmark weight (the original's)")
    w_reg: float = opt(WEIGHTS.w_reg, "coefficient regularisation weight (the original's)")
    w_gamma: float = opt(WEIGHTS.w_gamma, "gamma weight (the original's)")
    w_reflc: float = opt(WEIGHTS.w_reflc, "reflectance weight (the original's)")
    verbose: bool = opt(True, "log progress")


def parse_recovery_options(argv: list[str] | None = None) -> RecoveryOptions:
    """Parse and check the options (a bad combination exits with a one-line message)."""
    p = build_parser(RecoveryOptions, description=__doc__.splitlines()[0])
    o = RecoveryOptions(**vars(p.parse_args(argv)))
    try:
        fit_counts(o.fit_steps)
    except ValueError as e:
        p.error(str(e))
    if not 0.0 <= o.ema < 1.0:
        p.error(f"--ema must be in [0, 1) (a decay such as 0.999; 0 = off), got {o.ema}")
    from models.fitting import FIT_LOSSES

    losses = fit_losses(o.fit_loss)
    if not losses or any(v not in FIT_LOSSES for v in losses) or len(set(losses)) != len(losses):
        p.error(f"--fit_loss must be one or more of {', '.join(FIT_LOSSES)} separated by commas, got {o.fit_loss!r}")
    fractions = (o.curriculum, o.appearance_stage, o.curriculum_ramp)
    if not (all(f >= 0.0 for f in fractions) and o.curriculum + o.appearance_stage <= 1.0 + 1e-9
            and o.curriculum_ramp < 1.0):
        p.error(f"--curriculum, --appearance_stage and --curriculum_ramp are fractions of the training budget: "
                f"the first two in [0, 1] and summing to at most 1 (1: no whole-loss stage), the ramp in [0, 1), "
                f"got {', '.join(map(str, fractions))}")
    if o.appearance_grad < 0:
        p.error(f"--appearance_grad must be >= 0 (1 = the original's training), got {o.appearance_grad}")
    if o.appearance_grad != 1.0 and o.appearance_net == "separate":
        p.error("--appearance_grad scales what shared texture and lighting heads pass to the backbone: with "
                "--appearance_net separate nothing is shared, drop one of them")
    if o.appearance_downscale < 1 or (o.appearance_downscale > 1 and o.appearance_net != "separate"):
        p.error(f"--appearance_downscale must be >= 1, and above 1 only with --appearance_net separate, got "
                f"{o.appearance_downscale} with --appearance_net {o.appearance_net}")
    if o.data_chunk < 1:
        p.error(f"--data_chunk must be >= 1 (batches drawn at a time), got {o.data_chunk}")
    if o.cuda_graph == "true" and o.device == "cpu" and not o.from_run:
        p.error("--cuda_graph needs a CUDA device: drop it or give --device cuda")
    if o.train_only and o.from_run:
        p.error("--train_only and --from_run are the two calls of one run: give one of them")
    if o.oracle_only and (o.train_only or o.from_run):
        p.error("--oracle_only trains nothing and reads no run: drop --train_only / --from_run")
    return o


def fit_losses(spec: str) -> list[str]:
    """``--fit_loss`` as a list: "train, front" -> ["train", "front"] (the first gives the verdict)."""
    return [v.strip() for v in str(spec).split(",") if v.strip()]


def fit_counts(spec: str) -> list[int]:
    """``--fit_steps`` as a sorted list of distinct step counts: "300,1000" -> [300, 1000]; "0" -> [].

    Raises:
        ValueError: an entry is not a whole number >= 0.
    """
    counts = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--fit_steps takes step counts separated by commas (e.g. 300,1000,2000), got {spec!r}")
        counts.add(int(part))
    return sorted(c for c in counts if c > 0)


# --------------------------------------------------------------------------- metrics
@dataclass
class ErrorSums:
    """Running sums of the three figures over held-out faces."""

    shape: float = 0.0
    shape_mean_face: float = 0.0
    pose: list = dataclasses.field(default_factory=list)
    lm: list = dataclasses.field(default_factory=list)
    lm_zero: float = 0.0
    pose_zero: float = 0.0
    shape_aligned: float = 0.0
    shape_mean_face_aligned: float = 0.0
    orientation: list = dataclasses.field(default_factory=list)
    n: int = 0

    def add(self, face_model, pred: torch.Tensor, true: torch.Tensor, true_lm: torch.Tensor, lm_scale: float) -> None:
        from models.coeffs import COEFFS

        p, t = COEFFS.split(pred.float()), COEFFS.split(true.float())
        sp = face_model.compute_shape(p["id"], p["exp"])
        st = face_model.compute_shape(t["id"], t["exp"])
        mean = face_model.mean_shape.view(1, -1, 3)
        self.shape += float((sp - st).norm(dim=-1).mean(dim=1).sum())
        self.shape_mean_face += float((mean - st).norm(dim=-1).mean(dim=1).sum())
        rp, rt = face_model.compute_rotation(p["angle"]), face_model.compute_rotation(t["angle"])
        self.pose += rotation_error_deg(rp, rt).tolist()
        mean_b = mean.expand_as(st)
        mean_on_t, qt = similarity_align(mean_b, st)
        self.shape_aligned += float((similarity_align(sp, st)[0] - st).norm(dim=-1).mean(dim=1).sum())
        self.shape_mean_face_aligned += float((mean_on_t - st).norm(dim=-1).mean(dim=1).sum())
        # head orientation: the shape's own rotation (relative to the mean face), then the pose
        # (row-vector convention of the face model: x_cam = x @ R, so the shape's comes first)
        qp = similarity_align(mean_b, sp)[1]
        self.orientation += rotation_error_deg(qp @ rp, qt @ rt).tolist()
        self.pose_zero += float(rotation_error_deg(torch.eye(3, device=rt.device).expand_as(rt), rt).sum())
        lm = face_model(pred.float()).landmark
        self.lm += ((lm - true_lm).norm(dim=-1).mean(dim=1) * lm_scale).tolist()
        zero_lm = face_model(torch.zeros_like(pred, dtype=torch.float32)).landmark
        self.lm_zero += float((zero_lm - true_lm).norm(dim=-1).mean(dim=1).sum() * lm_scale)
        self.n += pred.shape[0]

    def figures(self) -> dict:
        n = max(1, self.n)
        return {
            "vertex_error_ratio": self.shape / max(self.shape_mean_face, 1e-12),
            "vertex_error_ratio_aligned": self.shape_aligned / max(self.shape_mean_face_aligned, 1e-12),
            "orientation_error_deg": float(np.mean(self.orientation)) if self.orientation else math.nan,
            "vertex_error_mm": 100.0 * self.shape / n,  # model units are decimetres
            "vertex_error_aligned_mm": 100.0 * self.shape_aligned / n,
            "mean_face_vertex_error_aligned_mm": 100.0 * self.shape_mean_face_aligned / n,
            "mean_face_vertex_error_mm": 100.0 * self.shape_mean_face / n,
            "pose_error_deg": float(np.mean(self.pose)) if self.pose else math.nan,
            "pose_error_deg_median": float(np.median(self.pose)) if self.pose else math.nan,
            "frontal_pose_error_deg": self.pose_zero / n,
            "lm_error_px": float(np.mean(self.lm)) if self.lm else math.nan,
            "lm_error_px_median": float(np.median(self.lm)) if self.lm else math.nan,
            "mean_face_lm_error_px": self.lm_zero / n,
            "faces": self.n,
        }


def similarity_align(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares similarity transform of ``src`` onto ``dst`` (Umeyama 1991).

    src, dst: (B, N, 3) corresponding points. Returns (aligned (B, N, 3), R (B, 3, 3)) with
    ``aligned = s * (src - mean(src)) @ R + mean(dst)`` (row vectors; R a proper rotation).
    """
    src, dst = src.double(), dst.double()
    ms, md = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    a, b = src - ms, dst - md
    u, sig, vh = torch.linalg.svd(a.transpose(1, 2) @ b)  # (B, 3, 3) cross-covariance
    d = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.ones_like(sig)
    fix[:, 2] = d
    r = u @ torch.diag_embed(fix) @ vh  # maximises trace(R^T a^T b) over rotations
    scale = (sig * fix).sum(dim=1) / a.pow(2).sum(dim=(1, 2)).clamp_min(1e-30)
    aligned = scale[:, None, None] * (a @ r) + md
    return aligned.float(), r.float()


def rigid_fraction(face_model) -> dict[str, float]:
    """Fraction of the identity / expression bases' variance that is a similarity motion
    (translation, rotation, uniform scaling) of the mean face, to first order."""
    mean = face_model.mean_shape.view(-1, 3).double()
    c = mean - mean.mean(dim=0)
    fields = [torch.zeros_like(c).index_fill_(1, torch.tensor([k], device=c.device), 1.0) for k in range(3)]
    fields += [torch.linalg.cross(torch.eye(3, dtype=c.dtype, device=c.device)[k].expand_as(c), c) for k in range(3)]
    fields.append(c)
    q, _ = torch.linalg.qr(torch.stack([f.reshape(-1) for f in fields], dim=1))
    out = {}
    for name, basis in (("id", face_model.id_base), ("exp", face_model.exp_base)):
        b = basis.double()
        out[name] = float((q.T @ b).pow(2).sum() / b.pow(2).sum())
    return out


ORACLE_GROUPS = {"all": ("id", "exp", "angle", "trans"), "pose_exp": ("exp", "angle", "trans"),
                 "pose_only": ("angle", "trans")}


def landmark_oracle(face_model, coeffs: torch.Tensor, steps: int, lr: float = 0.02,
                    groups: tuple[str, ...] = ORACLE_GROUPS["all"]) -> torch.Tensor:
    """What 68 perfect landmarks alone reveal: fit ``groups`` (default identity, expression, pose
    and translation) to the true faces' projected landmarks (no regularisation, from the mean
    face, Adam); the other coefficients stay zero.

    coeffs: (B, 257) true coefficients. Returns (B, 257) fitted coefficients. With all groups
    its figures bound what any method gets from landmarks alone on this face model; with
    ``("angle", "trans")`` it is a regressor that gets the pose right and learns no shape.
    """
    from models.coeffs import COEFFS
    from models.losses import landmark_loss

    target = face_model.landmarks(coeffs.float()).detach()
    mask = torch.zeros(COEFFS.total, device=coeffs.device)
    for name, sl in COEFFS.slices().items():
        if name in groups:
            mask[sl] = 1.0
    x = torch.zeros_like(coeffs, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            landmark_loss(face_model.landmarks(x * mask), target).backward()
            optimizer.step()
    return (x * mask).detach()


def oracle_figures(face_model, test_set: list, steps: int, lm_scale: float) -> dict:
    """Figures of :func:`landmark_oracle` with each of ``ORACLE_GROUPS`` on the held-out faces
    (all in one batch: cheap)."""
    true = torch.cat([b.coeffs for b in test_set])
    lm = torch.cat([b.lm68 for b in test_set])
    out = {}
    for name, groups in ORACLE_GROUPS.items():
        sums = ErrorSums()
        sums.add(face_model, landmark_oracle(face_model, true, steps, groups=groups), true, lm, lm_scale)
        out[name] = {"steps": steps, "groups": list(groups), **sums.figures()}
    return out


def training_loss_oracle(loss_fn, batch, steps: int, lr: float = 3e-3) -> torch.Tensor:
    """Where the training loss's minimum lies: the faces' TRUE (B, 257) coefficients refined by
    ``steps`` Adam steps (cosine-decayed ``lr``) on ``loss_fn`` (the training's terms and
    weights) against their renders and true 68 landmarks. A regressor that minimised the loss
    perfectly would predict these; their figures are the floor the loss itself sets (its
    regularisation and the stand-in's ambiguities), whatever the network."""
    x = batch.coeffs.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for i in range(steps):
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
            optimizer.zero_grad(set_to_none=True)
            loss_fn(x, batch.images, batch.lm68).terms.total.backward()
            optimizer.step()
    return x.detach()


def per_face_loss(loss_fn, coeffs: torch.Tensor, images: torch.Tensor, lm68: torch.Tensor) -> torch.Tensor:
    """The training loss of each face on its own.

    Args:
        loss_fn: a :class:`models.losses.HybridLoss`.
        coeffs: (B, 257); images: (B, 3, H, W); lm68: (B, 68, 2).

    Returns:
        (B,) float32: ``loss_fn`` of each face as a batch of one (its photometric term normalised
        by its own face region).
    """
    with torch.no_grad():
        return torch.stack([loss_fn(coeffs[i:i + 1], images[i:i + 1], lm68[i:i + 1]).terms.total.float()
                            for i in range(coeffs.shape[0])])


def loss_optimum(loss_fn, batch, fit_steps: int = 150, fit_lr: float = 0.02, refine_steps: int = 400,
                 steps: int = 1500, rounds: int = 1, lr: float = 0.005) -> tuple[torch.Tensor, dict]:
    """The per-face optimum of the training loss, the way docs/training.md ("Where the loss settles")
    found it: each face's loss minimised from two starts, its true coefficients and the mean face,
    and the lower end kept.

    The mean-face start is first fitted as ``test.py --fit_steps`` does (``fit_steps`` steps of
    :func:`models.fitting.fit_coeffs` to the true 68 landmarks, rate ``fit_lr``). Both starts are
    then refined together in one batch (the loss's batch normalisation only scales each face's
    gradient, which Adam ignores): ``refine_steps`` steps at 3e-3, then ``rounds`` rounds of
    ``steps`` steps at ``lr``, each cosine-decayed (:func:`training_loss_oracle`).

    Args:
        loss_fn: a :class:`models.losses.HybridLoss` (the training's terms and weights).
        batch: a :class:`data.synthetic.SyntheticBatch` of B faces (images, true coeffs, lm68).

    Returns:
        ((B, 257) the lower-loss end of each face, detached; a dict with the mean per-face loss
        at the truth, at each end and at the kept one, and ``from_truth``: the share of faces
        whose kept end started at the truth).
    """
    from types import SimpleNamespace

    from models.fitting import FitConfig, fit_coeffs

    n = batch.coeffs.shape[0]
    truth = batch.coeffs.detach().float()
    fm = loss_fn.face_model
    fitted = fit_coeffs(SimpleNamespace(face_model=fm, renderer=loss_fn.renderer), torch.zeros_like(truth),
                        batch.images, lm68=batch.lm68, steps=fit_steps, config=FitConfig(lr=fit_lr))
    both = dataclasses.replace(batch, coeffs=torch.cat([truth, fitted]), images=batch.images.repeat(2, 1, 1, 1),
                               lm68=batch.lm68.repeat(2, 1, 1), mask=batch.mask.repeat(2, 1, 1, 1))
    x = training_loss_oracle(loss_fn, both, refine_steps)
    for _ in range(rounds):
        x = training_loss_oracle(loss_fn, dataclasses.replace(both, coeffs=x), steps, lr=lr)
    losses = per_face_loss(loss_fn, x, both.images, both.lm68)
    from_truth = losses[:n] <= losses[n:]
    best = torch.where(from_truth[:, None], x[:n], x[n:])
    at_truth = per_face_loss(loss_fn, truth, batch.images, batch.lm68)
    return best, {"loss_at_truth": float(at_truth.mean()), "loss_from_truth": float(losses[:n].mean()),
                  "loss_from_mean_face": float(losses[n:].mean()),
                  "loss": float(torch.minimum(losses[:n], losses[n:]).mean()),
                  "from_truth": float(from_truth.float().mean())}


def first_faces(test_set: list, n: int):
    """The first ``n`` faces of a list of batches, as one batch."""
    fields = {f.name: torch.cat([getattr(b, f.name) for b in test_set])[:n] for f in dataclasses.fields(test_set[0])}
    return type(test_set[0])(**fields)


def optimum_figures(o: "RecoveryOptions", loss_fn, test_set: list, lm_scale: float) -> tuple:
    """:func:`loss_optimum` on the first ``o.optimum_faces`` held-out faces: (their batch, figures
    of the optimum with its losses and seconds)."""
    t = time.perf_counter()
    batch = first_faces(test_set, o.optimum_faces)
    best, losses = loss_optimum(loss_fn, batch, fit_lr=o.fit_lr, refine_steps=o.optimum_refine_steps,
                                steps=o.optimum_steps, rounds=o.optimum_rounds, lr=o.optimum_lr)
    sums = ErrorSums()
    sums.add(loss_fn.face_model, best, batch.coeffs, batch.lm68, lm_scale)
    sync(batch.images.device)
    return batch, {**sums.figures(), **losses, "steps": [o.optimum_refine_steps, *[o.optimum_steps] * o.optimum_rounds],
                   "lr": o.optimum_lr, "seconds": round(time.perf_counter() - t, 1)}


def against_optimum(optimum: dict, regressor: dict, fitted: dict | None) -> dict:
    """Vertex errors on the optimum's faces as multiples of the optimum's, with the targets'
    verdicts (regressor <= 1.25x, with fitting <= 1.05x).

    Args:
        optimum: :func:`optimum_figures`' figures.
        regressor: the regressor's figures on the optimum's faces.
        fitted: None, or the figures on the optimum's faces after each fitting, keyed as
            :func:`evaluate_trained` keys them (the step count, or ``loss:count`` for a second
            ``--fit_loss``); the largest plain count gives ``fitted`` and ``fitted_vertex_vs_optimum``.
    """
    v = max(optimum["vertex_error_ratio"], 1e-12)
    out = {"regressor": {k: regressor[k] for k in CURVE_KEYS}, "regressor_vertex_vs_optimum":
           regressor["vertex_error_ratio"] / v, "target": TARGETS["vertex_vs_optimum"]}
    if fitted:
        by_steps = {n: {**{k: f[k] for k in (*CURVE_KEYS, "loss") if k in f},
                        "vertex_vs_optimum": f["vertex_error_ratio"] / v} for n, f in fitted.items()}
        last = by_steps[max((n for n in by_steps if n.isdigit()), key=int)]  # the first --fit_loss's largest count
        out.update({"fitted": {k: last[k] for k in CURVE_KEYS}, "fitted_vertex_vs_optimum": last["vertex_vs_optimum"],
                    "fitted_target": FITTED_VERTEX_VS_OPTIMUM, "fitted_by_steps": by_steps})
    return out


def fitted_figures(model, test_set: list, steps: int, lm_scale: float, lr: float, start=None, faces: int = 0,
                   optimum_faces: int = 0, min_lr: float = 0.1, landmark_share: float = -1.0,
                   front_only: bool = True, uniform_rates: bool = False, plan=None, loss_fn=None,
                   mean_start: bool = False) -> dict:
    """Figures of the held-out faces after per-image fitting as ``test.py --fit_steps`` does it
    (:func:`models.fitting.fit_coeffs`, each face's true 68 landmarks as its ``landmarks/`` file).

    Args:
        model: a FaceReconModel (its face model and renderer fit; its network gives the start) or,
            with ``start``, anything with ``face_model`` and ``renderer``.
        test_set: held-out batches (SyntheticBatch), fitted batch by batch.
        steps, lr: fitting steps and base learning rate (:class:`models.fitting.FitConfig`).
        start: optional function batch -> (B, 257) starting coefficients (default: the network's
            prediction).
        faces: fit only the first ``faces`` faces for the figures (0 = all).
        optimum_faces: also fit the first ``optimum_faces`` faces if ``faces`` stops short of them,
            and report their figures (``CURVE_KEYS``) as ``on_optimum_faces``.
        min_lr, landmark_share: the schedule's end rate (a fraction of ``lr``) and share of
            landmark-only steps (negative: FitConfig's default, a third).
        front_only, uniform_rates: :class:`models.fitting.FitConfig`'s ``front_only``, and one
            rate for all groups instead of its ``lr_scale``.
        plan: optional :data:`models.fitting.FitPlan` used as it is (``lr``, ``min_lr``,
            ``landmark_share``, ``front_only`` and ``uniform_rates`` are then not used).
        loss_fn: optional :class:`models.losses.HybridLoss` (the training loss): with it the mean
            per-face loss of the fitted faces is reported (``loss``, and in ``on_optimum_faces``).
        mean_start: also fit every face from the mean face (coefficients 0) and keep, per face, the
            end with the lower ``loss_fn`` (which it needs); ``from_mean_face`` is the share of faces
            that kept that end.

    Returns:
        The figures (:meth:`ErrorSums.figures`) of the first ``faces`` faces fitted, with ``steps``,
        ``lr``, ``seconds`` (of fitting, device synchronised) and ``start`` (the start's figures).
    """
    from models.fitting import FitConfig, fit_coeffs, plan_record

    if mean_start and loss_fn is None:
        raise ValueError("fitted_figures(mean_start=True) needs loss_fn to choose each face's end")

    dev = test_set[0].images.device
    total = sum(b.coeffs.shape[0] for b in test_set)
    n_fig = min(faces, total) if faces > 0 else total
    n_fit = max(n_fig, min(optimum_faces, total))
    config = plan
    if plan is None:
        config = FitConfig(lr=lr, min_lr_ratio=min_lr, front_only=front_only,
                           landmark_steps=None if landmark_share < 0 else int(round(landmark_share * steps)))
        if uniform_rates:
            config = dataclasses.replace(config, lr_scale=tuple((k, 1.0) for k, _ in config.lr_scale))
    fitted, starts, losses, seconds, done, from_mean = [], [], [], 0.0, 0, 0
    for b in test_set:
        if done >= n_fit:
            break
        b = first_faces([b], n_fit - done)
        with torch.no_grad():
            if start is None:
                model.net.eval()
                c0 = model.predict_coeffs(b.images).float()
            else:
                c0 = start(b)
        sync(dev)
        t = time.perf_counter()
        if mean_start:  # both starts in one batch: each face's gradient is its own (fit_coeffs)
            images2, lm2, k = b.images.repeat(2, 1, 1, 1), b.lm68.repeat(2, 1, 1), c0.shape[0]
            both = fit_coeffs(model, torch.cat([c0, torch.zeros_like(c0)]), images2, lm68=lm2, steps=steps,
                              config=config)
            ends = per_face_loss(loss_fn, both, images2, lm2)
            mean_won = ends[k:] < ends[:k]
            fitted.append(torch.where(mean_won[:, None], both[k:], both[:k]))
            losses.append(torch.minimum(ends[:k], ends[k:]))
            from_mean += int(mean_won.sum())
        else:
            fitted.append(fit_coeffs(model, c0, b.images, lm68=b.lm68, steps=steps, config=config))
        sync(dev)
        seconds += time.perf_counter() - t
        if loss_fn is not None and not mean_start:
            losses.append(per_face_loss(loss_fn, fitted[-1], b.images, b.lm68))
        starts.append(c0)
        done += b.coeffs.shape[0]
    fitted, starts, truth = torch.cat(fitted), torch.cat(starts), first_faces(test_set, n_fit)
    losses = torch.cat(losses) if losses else None

    def figures(coeffs: torch.Tensor, n: int) -> dict:
        sums = ErrorSums()
        sums.add(model.face_model, coeffs[:n], truth.coeffs[:n], truth.lm68[:n], lm_scale)
        return sums.figures()

    if plan is None:
        out = {"steps": steps, "lr": lr, "min_lr": min_lr, "landmark_steps": steps // 3
               if config.landmark_steps is None else config.landmark_steps, "front_only": front_only,
               "uniform_rates": uniform_rates}
    else:
        out = {"steps": steps, "plan": plan_record(plan, steps)}
    out.update({"seconds": round(seconds, 2), **figures(fitted, n_fig),
                "start": {k: v for k, v in figures(starts, n_fig).items() if k in CURVE_KEYS}})
    if mean_start:
        out["from_mean_face"] = from_mean / n_fit
    if losses is not None:
        out["loss"] = float(losses[:n_fig].mean())
    if optimum_faces > 0:
        out["on_optimum_faces"] = {k: v for k, v in figures(fitted, optimum_faces).items() if k in CURVE_KEYS}
        if losses is not None:
            out["on_optimum_faces"]["loss"] = float(losses[:optimum_faces].mean())
    return out


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing elsewhere. For timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotation_error_deg(r_pred: torch.Tensor, r_true: torch.Tensor) -> torch.Tensor:
    """(B,3,3), (B,3,3) -> (B,) geodesic angle between the rotations in degrees."""
    cos = ((r_pred.transpose(1, 2) @ r_true).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


@torch.no_grad()
def evaluate(model, batches, lm_scale: float) -> dict:
    """Figures over held-out ``batches`` (iterable of SyntheticBatch)."""
    was_training = model.net.training
    model.net.eval()
    sums = ErrorSums()
    for b in batches:
        sums.add(model.face_model, model.predict_coeffs(b.images), b.coeffs, b.lm68, lm_scale)
    model.net.train(was_training)
    return sums.figures()


def heldout(gen, n: int, batch: int, seed: int):
    """Yield n held-out faces in batches, reproducibly (seeded generator on the device)."""
    g = torch.Generator(device=gen.device).manual_seed(seed)
    done = 0
    while done < n:
        k = min(batch, n - done)
        yield gen.sample(k, g)
        done += k


def held_out_test_set(o, gen) -> list:
    """The ``--eval_size`` held-out faces of the final figures and the oracles (seed + 1000)."""
    return list(heldout(gen, o.eval_size, o.eval_batch, o.seed + 1000))


def profiled_step(model, loss_fn, optimizer, batches, scaler=None) -> tuple:
    """One training step (as :func:`train.train_step`) on the next of ``batches`` (an iterator of
    SyntheticBatch) with the device synchronised between its phases; returns (output, {phase: seconds})."""
    from models.losses import backward_step

    dev = next(model.net.parameters()).device
    sync(dev)
    t = [time.perf_counter()]
    batch = next(batches)
    sync(dev)
    t.append(time.perf_counter())
    model.net.train()
    coeffs = model.predict_coeffs(batch.images)
    sync(dev)
    t.append(time.perf_counter())
    out = loss_fn(coeffs, batch.images, batch.lm68)
    sync(dev)
    t.append(time.perf_counter())
    backward_step(out.terms.total, optimizer, scaler)
    sync(dev)
    t.append(time.perf_counter())
    names = ("render_data", "network_forward", "face_model_render_loss", "backward_step")
    return out, {k: b - a for k, a, b in zip(names, t[:-1], t[1:])}


# --------------------------------------------------------------------------- learning curve picture
def stage_changes(curve: list[dict]) -> list[tuple[int, str]]:
    """``(step, stage)`` of each curve point whose ``stage`` differs from the previous point's
    (the first point, and points without a stage, excluded): where a curriculum's stages begin,
    to the curve's resolution."""
    out, last = [], None
    for c in curve:
        stage = c.get("stage")
        if stage is None:
            continue
        if last is not None and stage != last:
            out.append((c["step"], stage))
        last = stage
    return out


def plot_curves(path: str, curve: list[dict], lines: dict, title: str = "",
                stages: list[tuple[int, str]] = ()) -> None:
    """A small PNG with one panel per series (loss, vertex ratio, pose, landmarks) against step.

    Drawn with PIL (no plotting library needed).

    Args:
        path: the PNG written.
        curve: points ``{"step", "loss", "vertex_error_ratio", "pose_error_deg", "lm_error_px"}``.
        lines: per series key, horizontal dashed lines ``[(value, label, (r, g, b)), ...]``
            (targets, the loss's optimum).
        title: a line of text on top.
        stages: vertical dotted lines in every panel, ``[(step, label), ...]`` (:func:`stage_changes`).
    """
    from PIL import Image, ImageDraw

    panels = [("loss", "training loss (all terms)", True), ("vertex_error_ratio", "vertex error / mean face", False),
              ("pose_error_deg", "pose error (deg)", False), ("lm_error_px", "landmark error (px @224)", False)]
    w, h, pad = 420, 260, 46
    img = Image.new("RGB", (2 * w, 2 * h + (24 if title else 0)), "white")
    draw = ImageDraw.Draw(img)
    top = 24 if title else 0
    if title:
        draw.text((10, 6), title, fill="black")
    steps = [c["step"] for c in curve]
    for k, (key, label, logy) in enumerate(panels):
        ox, oy = (k % 2) * w, top + (k // 2) * h
        pts = [(c["step"], c[key]) for c in curve if key in c and c[key] is not None and math.isfinite(c[key])]
        draw.rectangle([ox + pad, oy + 20, ox + w - 12, oy + h - 30], outline="black")
        draw.text((ox + pad, oy + 4), label, fill="black")
        if not pts:
            continue
        marks = lines.get(key, [])
        ys = [p[1] for p in pts] + [m[0] for m in marks]
        tf = (lambda v: math.log10(max(v, 1e-8))) if logy else (lambda v: v)
        lo, hi = min(tf(v) for v in ys), max(tf(v) for v in ys)
        if not logy:
            lo = min(lo, 0.0)
        hi = hi if hi > lo else lo + 1.0
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(s, v):
            return (ox + pad + (s - x0) / (x1 - x0) * (w - pad - 12),
                    oy + h - 30 - (tf(v) - lo) / (hi - lo) * (h - 50))

        for value, text, colour in marks:
            ty = xy(x0, value)[1]
            for xs in range(ox + pad, ox + w - 12, 10):
                draw.line([(xs, ty), (xs + 5, ty)], fill=colour)
            draw.text((ox + w - 130, ty - 12), f"{text} {value:.3g}", fill=colour)
        for i, (step, text) in enumerate(stages):  # labels on alternate rows: short stages' do not overlap
            sx = xy(step, lo if not logy else 10 ** lo)[0]
            for ys_ in range(oy + 20, oy + h - 30, 6):
                draw.line([(sx, ys_), (sx, ys_ + 2)], fill=(120, 120, 120))
            draw.text((sx + 3, oy + 22 + 12 * (i % 2)), text, fill=(120, 120, 120))
        draw.line([xy(s, v) for s, v in pts] if len(pts) > 1 else [xy(*pts[0]), xy(*pts[0])], fill=(0, 70, 200), width=2)
        for v in (lo, hi):
            val = 10 ** v if logy else v
            draw.text((ox + 2, xy(x0, val)[1] - 6), f"{val:.3g}", fill="black")
        draw.text((ox + pad, oy + h - 26), f"step {x0}", fill="black")
        draw.text((ox + w - 90, oy + h - 26), f"step {x1}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


# --------------------------------------------------------------------------- the experiment
@torch.no_grad()
def samples_picture(path: str, model, batch, n: int = 6) -> None:
    """Held-out renders (top) and the prediction rendered over them (bottom), landmarks drawn."""
    from PIL import Image

    from util.visualize import BLUE, RED, draw_landmarks

    model.net.eval()
    b = min(n, batch.images.shape[0])
    images = batch.images[:b]
    rec = model.reconstruct(model.predict_coeffs(images))
    hwc = lambda x: x.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    img, render, mask = hwc(images), hwc(rec.render), hwc(rec.mask)
    top = draw_landmarks(img * 255.0, batch.lm68[:b].cpu().numpy(), BLUE, step=1)
    over = (render * mask + (1 - mask) * img) * 255.0
    over = draw_landmarks(draw_landmarks(over, batch.lm68[:b].cpu().numpy(), BLUE, step=1),
                          rec.face.landmark.cpu().numpy(), RED, step=1)
    grid = np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(over), axis=1)], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).quantize(colors=256).save(path, optimize=True)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def training_weights(o: RecoveryOptions) -> LossWeights:
    """The loss weights of the experiment (no identity network: w_feat 0)."""
    return LossWeights(w_feat=0.0, w_color=o.w_color, w_lm=o.w_lm, w_reg=o.w_reg, w_gamma=o.w_gamma,
                       w_reflc=o.w_reflc)


def synthetic_setup(o: RecoveryOptions, device: torch.device) -> tuple:
    """(face model, renderer, SyntheticConfig, SyntheticFaces) on ``device`` for ``o``'s image size."""
    from models.bfm import ParametricFaceModel
    from models.renderer import create_renderer, nvdiffrast_available
    from data.synthetic import SyntheticFaces

    center, focal = o.size / 2.0, 1015.0 * o.size / 224.0
    backend = o.renderer
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" and nvdiffrast_available() else "cpu"
    face_model = ParametricFaceModel.from_folder(o.bfm_folder, o.bfm_model, focal=focal, center=center).to(device)
    renderer = create_renderer(backend, focal=focal, center=center, device=device)
    syn = SyntheticConfig(id_std=o.id_std, exp_std=o.exp_std, tex_std=o.tex_std, yaw=o.yaw, pitch=o.pitch, roll=o.roll,
                          light_ambient=o.light_ambient, light_dir=o.light_dir, light_high=o.light_high,
                          in_range=o.in_range)
    return face_model, renderer, syn, SyntheticFaces(face_model, renderer, syn)


def lr_for_batch(o: RecoveryOptions) -> float:
    """The peak learning rate: ``--lr`` (at batch 32) scaled by ``--lr_rule`` for ``--batch_size``."""
    return o.lr * (o.batch_size / 32.0) ** LR_RULES[o.lr_rule]


def stage_at(frac: float, curriculum: float, appearance: float, ramp: float) -> tuple[str, float]:
    """The training stage at ``frac`` of the budget and the photometric weight, as a fraction of
    ``--w_color``: ``"landmarks"`` (weight 0) before ``curriculum``, then ``"appearance"`` for
    ``appearance`` of the budget, then ``"all"``; after the landmark stage the weight rises
    linearly over ``ramp`` of the budget (at once when 0), then stays 1."""
    if frac < curriculum:
        return "landmarks", 0.0
    scale = 1.0 if ramp <= 0 else min(1.0, (frac - curriculum) / ramp)
    return ("appearance" if frac < curriculum + appearance else "all"), scale


def detach_geometry(coeffs: torch.Tensor) -> torch.Tensor:
    """(B, 257) ``coeffs`` with the geometry groups (:data:`GEOMETRY`) detached: the same values,
    gradients only to texture and lighting."""
    from models.coeffs import COEFFS

    return COEFFS.merge({k: v.detach() if k in GEOMETRY else v for k, v in COEFFS.split(coeffs).items()})


def scale_appearance_gradient(net: torch.nn.Module, alpha: float) -> list:
    """Make the texture and lighting heads of a :class:`models.networks.ReconNet` pass ``alpha``
    times their gradient back to the backbone, whichever term it comes from (the photometric
    term, and the texture, gamma and reflectance regularisers); forward values unchanged, the
    heads' own weights get their whole gradient. Forward pre-hooks on those heads, registered
    before any graph capture; returns their handles (``.remove()`` undoes it).

    Raises:
        ValueError: ``net`` has no per-group heads (``use_last_fc``).
    """
    from models.coeffs import COEFFS

    heads = getattr(net, "final_layers", None)
    if heads is None:
        raise ValueError("--appearance_grad needs the network's per-group heads (not --use_last_fc)")

    def hook(_module, args):
        (x,) = args
        return (x * alpha + x.detach() * (1.0 - alpha),)

    return [heads[COEFFS.names.index(name)].register_forward_pre_hook(hook) for name in ("tex", "gamma")]


class SplitReconNet(torch.nn.Module):
    """Two regressors of one architecture: the geometry groups (:data:`GEOMETRY`) from
    :attr:`geometry`, texture and lighting from :attr:`appearance`. Each is trained only by the
    terms of its own groups; the unused heads of each get no gradient.

    forward: (B, 3, H, W) RGB in 0..1 -> (B, 257) coefficients in :data:`models.coeffs.COEFFS` order.

    Args:
        net_recon: 'resnet18' | 'resnet34' | 'resnet50'.
        appearance_downscale: the appearance network reads the image averaged over blocks of this
            many pixels a side (1: the image itself; H and W divisible by it).
    """

    def __init__(self, net_recon: str, appearance_downscale: int = 1):
        from models.coeffs import COEFFS
        from models.networks import ReconNet

        super().__init__()
        self.appearance_downscale = int(appearance_downscale)
        self.geometry, self.appearance = ReconNet(net_recon), ReconNet(net_recon)
        mask = torch.zeros(COEFFS.total, dtype=torch.bool)
        for name, where in COEFFS.slices().items():
            mask[where] = name not in GEOMETRY
        self.register_buffer("appearance_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 257)."""
        d = self.appearance_downscale
        small = x if d == 1 else torch.nn.functional.avg_pool2d(x, d)
        return torch.where(self.appearance_mask, self.appearance(small), self.geometry(x))


def appearance_step(model, loss_fn, optimizer, images: torch.Tensor, lm68: torch.Tensor, scaler=None):
    """One step of the appearance stage: the landmark stage's terms
    (:func:`models.fitting.landmark_stage_loss`) plus ``loss_fn``'s photometric term on a render
    whose geometry is detached (:func:`detach_geometry`). Returns (() loss detached, LossTerms
    whose ``color`` is that term and the rest the render's, as the whole loss would weigh them)."""
    from models.fitting import landmark_stage_loss
    from models.losses import backward_step

    model.net.train()
    coeffs = model.predict_coeffs(images).float()
    terms = loss_fn(detach_geometry(coeffs), images, lm68).terms
    loss = landmark_stage_loss(model.face_model, coeffs, lm68, loss_fn.weights) + terms.color
    backward_step(loss, optimizer, scaler)
    return loss.detach(), terms


class WeightEma:
    """Exponential moving average of a network's weights: after each :meth:`update`,
    ``avg = decay * avg + (1 - decay) * current`` for every parameter and floating-point buffer
    (batch-norm statistics; integer buffers are copied), starting from a copy of the network.

    Written on ``torch._foreach_lerp_`` rather than ``torch.optim.swa_utils.AveragedModel``, whose
    update reads a device counter on the host each call (a CUDA sync per step).

    Args:
        net: the network averaged; :attr:`module` is its copy holding the average (eval mode,
            no gradients).
        decay: in [0, 1).
    """

    def __init__(self, net: torch.nn.Module, decay: float):
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    @staticmethod
    def _tensors(net: torch.nn.Module) -> tuple[list, list]:
        ts = [t.detach() for t in (*net.parameters(), *net.buffers())]
        return [t for t in ts if t.is_floating_point()], [t for t in ts if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        """Move the average toward ``net``'s current weights (same architecture as at creation)."""
        (avg_f, avg_i), (cur_f, cur_i) = self._tensors(self.module), self._tensors(net)
        torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)
        for a, c in zip(avg_i, cur_i):
            a.copy_(c)


@dataclass
class Session:
    """What the phases of a run share: the synthetic data, the model and the loss on the device."""

    device: torch.device
    face_model: object
    renderer: object
    syn: SyntheticConfig
    gen: object  # data.synthetic.SyntheticFaces
    net: torch.nn.Module  # the trained network
    model: object  # FaceReconModel around ``net``
    loss_fn: object  # HybridLoss (the training's terms and weights)
    amp: str | None
    channels_last: bool
    cuda_graph: bool  # --cuda_graph resolved for the device
    fused_adam: bool
    lm_scale: float
    curve_set: list
    test_set: list


def make_session(o: RecoveryOptions) -> Session:
    """Build the face model, renderer, regressor, loss and held-out sets of ``o`` on its device."""
    from models.facerecon import FaceReconModel
    from models.losses import HybridLoss
    from models.networks import ReconNet
    from pipeline.runtime import resolve_device

    device = resolve_device(o.device)
    if o.cuda_graph == "true" and device.type != "cuda" and not o.from_run:
        raise ValueError(f"--cuda_graph needs a CUDA device, the run is on {device}")
    torch.manual_seed(o.seed)
    face_model, renderer, syn, gen = synthetic_setup(o, device)
    amp = ("bf16" if device.type == "cuda" else None) if o.amp == "auto" else (None if o.amp == "none" else o.amp)
    channels_last, cuda_graph, fused_adam = (device.type == "cuda" if v == "auto" else v == "true"
                                             for v in (o.channels_last, o.cuda_graph, o.fused_adam))
    cuda_graph = cuda_graph and (amp is None or o.cuda_graph == "true")  # auto: measured in float32 only
    net = (ReconNet(o.net_recon) if o.appearance_net == "shared"
           else SplitReconNet(o.net_recon, o.appearance_downscale))
    if o.appearance_grad != 1.0:  # once, where the network is built: train() may run more than once on it
        scale_appearance_gradient(net, o.appearance_grad)
    model = FaceReconModel(net, face_model, renderer, amp=amp, channels_last=channels_last).to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
    curve_set = list(heldout(gen, o.curve_size, o.eval_batch, o.seed + 2000))
    return Session(device, face_model, renderer, syn, gen, net, model, loss_fn, amp, channels_last, cuda_graph,
                   fused_adam, 224.0 / o.size, curve_set, held_out_test_set(o, gen))


def train(o: RecoveryOptions, s: Session, deadline: float) -> dict:
    """Train ``s.net`` until ``deadline`` (perf_counter seconds) or ``--max_steps``; with ``--ema``
    ``s.net`` ends holding the average. Returns the training's record (curve, steps, timings)."""
    from train import landmark_step, train_step

    weights, model, gen = training_weights(o), s.model, s.gen
    peak_lr = lr_for_batch(o)
    optimizer = torch.optim.Adam(s.net.parameters(), lr=peak_lr, **({"fused": True} if s.fused_adam else {}))
    scaler = torch.amp.GradScaler("cuda") if s.amp == "fp16" else None
    ema = WeightEma(s.net, o.ema) if o.ema > 0 else None  # copied before any graph capture patches the network
    watched = model if ema is None else _with_net(model, ema.module)  # the curve follows the average
    g = torch.Generator(device=s.device).manual_seed(o.seed)
    batches = gen.batches(o.batch_size, g, o.data_chunk)
    if s.cuda_graph:
        graph_network(s, o.batch_size, o.size)
    train_start = time.perf_counter()
    train_budget = max(1.0, deadline - train_start)
    curve, step, loss_acc, loss_n = [], 0, 0.0, 0
    last_curve = -math.inf
    diverged = False
    profile: dict[str, float] = {}
    landmark_steps = appearance_steps = 0
    while True:
        now = time.perf_counter()
        frac = (now - train_start) / train_budget
        if frac >= 1.0 or (o.max_steps and step >= o.max_steps):
            break
        lr_frac = (frac / o.warmup if frac < o.warmup
                   else 0.5 * (1 + math.cos(math.pi * (frac - o.warmup) / (1 - o.warmup))))
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * max(lr_frac, 0.01)
        terms = None
        stage, scale = stage_at(frac, o.curriculum, o.appearance_stage, o.curriculum_ramp)
        s.loss_fn.weights = weights if scale == 1.0 else dataclasses.replace(weights, w_color=weights.w_color * scale)
        if stage == "landmarks":
            batch = next(batches)
            loss = landmark_step(model, weights, optimizer, batch.images, batch.lm68, scaler)
            landmark_steps += 1
        elif stage == "appearance":
            batch = next(batches)
            loss, terms = appearance_step(model, s.loss_fn, optimizer, batch.images, batch.lm68, scaler)
            appearance_steps += 1
        elif o.profile_start <= step - landmark_steps - appearance_steps < o.profile_start + o.profile_steps:
            out, times = profiled_step(model, s.loss_fn, optimizer, batches, scaler)
            for k, v in times.items():
                profile[k] = profile.get(k, 0.0) + v / o.profile_steps
            loss, terms = out.terms.total.detach(), out.terms
        else:
            batch = next(batches)
            out = train_step(model, s.loss_fn, optimizer, batch.images, batch.lm68, scaler=scaler)
            loss, terms = out.terms.total.detach(), out.terms
        if ema is not None:
            ema.update(s.net)
        loss_acc = loss_acc + loss  # summed on the device: no sync per step
        loss_n += 1
        step += 1
        if now - last_curve >= o.curve_every_s or step == 1:
            point = {"step": step, "seconds": round(now - train_start, 1), "loss": float(loss_acc) / max(1, loss_n),
                     "lr": optimizer.param_groups[0]["lr"], "stage": stage, "w_color_scale": scale,
                     **(terms.as_floats() if terms is not None else {})}
            point.update({k: v for k, v in evaluate(watched, s.curve_set, s.lm_scale).items() if k in CURVE_KEYS})
            curve.append(point)
            if not math.isfinite(point["loss"]):
                log.error("the training loss is not finite at step %d: stopping early", step)
                diverged = True
                break
            loss_acc, loss_n, last_curve = 0.0, 0, time.perf_counter()
            if o.verbose:
                log.info("step %d (%.0f s): loss %.4f vertex %.3f pose %.2f deg lm %.2f px", step, point["seconds"],
                         point["loss"], point["vertex_error_ratio"], point["pose_error_deg"], point["lm_error_px"])
    train_seconds = time.perf_counter() - train_start
    s.loss_fn.weights = weights  # what evaluation and fitting measure: the whole loss
    sync(s.device)
    if ema is not None:  # from here on the network is the average
        s.net.load_state_dict(ema.module.state_dict())
    curve.append({"step": step, "seconds": round(train_seconds, 1), "loss": float(loss_acc) / loss_n if loss_n else
                  (curve[-1]["loss"] if curve else math.nan),
                  **{k: v for k, v in evaluate(model, s.curve_set, s.lm_scale).items() if k in CURVE_KEYS}})
    return {"hardware": hardware(s.device), "renderer": s.renderer.backend, "amp": s.amp or "none",
            "channels_last": s.channels_last, "cuda_graph": s.cuda_graph, "fused_adam": s.fused_adam,
            "data_chunk": o.data_chunk, "appearance_grad": o.appearance_grad, "appearance_net": o.appearance_net,
            "appearance_downscale": o.appearance_downscale, "peak_lr": peak_lr, "ema": o.ema, "torch": torch.__version__,
            "steps": step, "landmark_steps": landmark_steps,
            "appearance_steps": appearance_steps, "diverged": diverged, "faces_seen": step * o.batch_size,
            "step_ms": {k: round(1000 * v, 2) for k, v in profile.items()}, "train_seconds": round(train_seconds, 1),
            "synthetic": dataclasses.asdict(s.syn), "curve": curve}


def graph_network(s: Session, batch_size: int, size: int) -> None:
    """Capture ``s.net``'s training forward and backward as CUDA graphs for batches of
    ``batch_size`` images of ``size`` (in the model's input format and precision; CUDA only, as
    :func:`models.networks.graphed_for_training`)."""
    from models.networks import graphed_for_training

    example = torch.rand(batch_size, 3, size, size, device=s.device)
    if s.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    graphed_for_training(s.net, example, s.model.amp_dtype)


def _with_net(model, net: torch.nn.Module):
    """A FaceReconModel like ``model`` around another network (same face model and renderer)."""
    from models.facerecon import FaceReconModel

    return FaceReconModel(net, model.face_model, model.renderer, amp=model.amp, channels_last=model.channels_last)


def evaluate_trained(o: RecoveryOptions, s: Session, optimum: dict | None, opt_batch) -> dict:
    """The final figures of the trained ``s.model`` on the held-out faces: figures, landmark
    oracles, fitted figures for each ``--fit_steps`` count, ratios against ``optimum`` and verdicts."""
    from models.fitting import fit_config

    counts = fit_counts(o.fit_steps)
    final = evaluate(s.model, s.test_set, s.lm_scale)
    oracle = oracle_figures(s.face_model, s.test_set, o.oracle_steps, s.lm_scale) if o.oracle_steps > 0 else None
    fitted_by_steps = {}
    losses = fit_losses(o.fit_loss)
    for loss in losses:
        for n in counts:
            for mean_start in (False, True) if o.fit_mean_start else (False,):
                f = fitted_figures(s.model, s.test_set, n, s.lm_scale, o.fit_lr, faces=o.fit_faces,
                                   optimum_faces=o.optimum_faces if optimum is not None else 0, min_lr=o.fit_min_lr,
                                   landmark_share=o.fit_landmark_share, front_only=loss == "front",
                                   uniform_rates=o.fit_uniform_rates, loss_fn=s.loss_fn, mean_start=mean_start,
                                   plan=fit_config(loss) if loss in PLANNED_FIT_LOSSES else None)
                key = (str(n) if loss == losses[0] else f"{loss}:{n}") + ("+mean" if mean_start else "")
                fitted_by_steps[key] = f
                if o.verbose:
                    log.info("fitting %s (%.0f s): vertex %.3f pose %.2f deg lm %.2f px loss %.4f", key,
                             f["seconds"], f["vertex_error_ratio"], f["pose_error_deg"], f["lm_error_px"], f["loss"])
    fitted = fitted_by_steps[str(counts[-1])] if counts else None
    vs_optimum = None
    if optimum is not None:
        on_opt = {n: f.pop("on_optimum_faces") for n, f in fitted_by_steps.items()}
        vs_optimum = against_optimum(optimum, evaluate(s.model, [opt_batch], s.lm_scale), on_opt)

    def verdict(figures: dict, vertex_ratio: float | None, vertex_target: float) -> dict:
        return {"vertex_vs_optimum": None if vertex_ratio is None else bool(vertex_ratio <= vertex_target),
                "pose_error_deg": bool(figures["pose_error_deg"] <= TARGETS["pose_error_deg"]),
                "lm_error_px": bool(figures["lm_error_px"] <= TARGETS["lm_error_px"])}

    return {
        "figures": final,
        "targets": {**TARGETS, "fitted_vertex_vs_optimum": FITTED_VERTEX_VS_OPTIMUM},
        "optimum": optimum,
        "vs_optimum": vs_optimum,
        "pass": verdict(final, vs_optimum and vs_optimum["regressor_vertex_vs_optimum"], TARGETS["vertex_vs_optimum"]),
        "pass_geometric": {"orientation_error_deg": bool(final["orientation_error_deg"] <= TARGETS["pose_error_deg"])},
        "rigid_fraction": rigid_fraction(s.face_model),
        "landmark_oracle": oracle,
        "fitted": fitted,
        "fitted_by_steps": fitted_by_steps or None,
        "pass_fitted": (verdict(fitted, vs_optimum and vs_optimum.get("fitted_vertex_vs_optimum"),
                                FITTED_VERTEX_VS_OPTIMUM) if fitted else None),
    }


def measure_optimum(o: RecoveryOptions, s: Session) -> tuple:
    """(the optimum's faces as one batch, :func:`optimum_figures`), or (None, None) without ``--optimum_faces``."""
    if o.optimum_faces <= 0:
        return None, None
    opt_batch, optimum = optimum_figures(o, s.loss_fn, s.test_set, s.lm_scale)
    log.info("per-face optimum of the loss on %d faces (%.0f s): vertex %.3f pose %.2f deg lm %.2f px, loss %.4f",
             optimum["faces"], optimum["seconds"], optimum["vertex_error_ratio"], optimum["pose_error_deg"],
             optimum["lm_error_px"], optimum["loss"])
    return opt_batch, optimum


CHECKPOINT_NAME = "regressor.pth"  # a --train_only run's checkpoint in its --out, unless --checkpoint
# options a --from_run call takes from its own command line; every other one comes from the run
EVAL_OPTIONS = ("bfm_folder", "bfm_model", "device", "renderer", "minutes", "eval_reserve_s", "eval_size",
                "eval_batch", "oracle_only", "oracle_steps", "loss_oracle_steps", "fit_steps", "fit_faces", "fit_lr",
                "fit_min_lr", "fit_landmark_share", "fit_loss", "fit_uniform_rates", "fit_mean_start",
                "optimum_faces", "optimum_refine_steps", "optimum_steps", "optimum_rounds", "optimum_lr", "out",
                "checkpoint", "train_only", "from_run", "verbose")


def read_trained_run(o: RecoveryOptions) -> tuple[RecoveryOptions, dict, str]:
    """The ``--from_run`` folder: (the options of the evaluation - the run's, with this call's
    ``EVAL_OPTIONS`` -, the run's recorded results, the checkpoint path).

    Raises:
        FileNotFoundError: the folder lacks recovery.json or the checkpoint.
        ValueError: its recovery.json holds no options or curve.
    """
    run_json = os.path.join(o.from_run, "recovery.json")
    ckpt = o.checkpoint or os.path.join(o.from_run, CHECKPOINT_NAME)
    for path, what in ((run_json, "the training call's results"), (ckpt, "the trained regressor")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--from_run: {path} ({what}) not found; run python -m experiments.recovery "
                                    f"--train_only true --out {o.from_run} first")
    with open(run_json, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record.get("options"), dict) or "curve" not in record:
        raise ValueError(f"--from_run: {run_json} holds no options or curve (not a recovery run's results)")
    known = {f.name for f in dataclasses.fields(RecoveryOptions)}
    trained = {k: v for k, v in record["options"].items() if k in known and k not in EVAL_OPTIONS}
    return dataclasses.replace(o, **trained), record, ckpt


def save_checkpoint(path: str, net: torch.nn.Module) -> None:
    """The regressor in the original's checkpoint format (``{"net_recon": state_dict, "epoch"}``), atomically."""
    from util.atomic_files import write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: torch.save({"net_recon": net.state_dict(), "epoch": 1}, f))


def run(o: RecoveryOptions) -> dict:
    """The experiment: one call (train, then evaluate), or one of its two calls (``--train_only``,
    ``--from_run``). Writes ``<out>/recovery.json``, ``learning_curve.png`` and (when evaluated)
    ``samples.png``; returns what recovery.json holds."""
    t0 = time.perf_counter()
    record = None
    if o.from_run:
        o, record, ckpt = read_trained_run(o)
    s = make_session(o)
    log.info("device %s (%s), renderer %s, amp %s, set-up %.1f s", s.device, hardware(s.device), s.renderer.backend,
             s.amp, time.perf_counter() - t0)
    if record is not None:
        state = torch.load(ckpt, map_location=s.device, weights_only=True)
        s.net.load_state_dict(state["net_recon"], strict=True)
    opt_batch, optimum = (None, None) if o.train_only else measure_optimum(o, s)
    if record is None:
        record = train(o, s, deadline=t0 + 60.0 * o.minutes - o.eval_reserve_s)
        if o.checkpoint or o.train_only:
            save_checkpoint(o.checkpoint or os.path.join(o.out, CHECKPOINT_NAME), s.net)
        train_total = round(time.perf_counter() - t0, 1)
    else:
        train_total = record.get("train_total_seconds", record.get("total_seconds"))
    if o.train_only:
        result = {"stage": "trained", **record, "options": dataclasses.asdict(o), "train_total_seconds": train_total}
    else:
        evaluated = evaluate_trained(o, s, optimum, opt_batch)
        result = {**evaluated, **{k: v for k, v in record.items() if k not in evaluated and k not in (
                  "options", "curve", "stage", "total_seconds", "train_total_seconds")}}
        if o.from_run:
            result.update({"stage": "evaluated", "from_run": o.from_run, "eval_hardware": hardware(s.device),
                           "train_total_seconds": train_total})
        result["options"], result["curve"] = dataclasses.asdict(o), record["curve"]
    os.makedirs(o.out, exist_ok=True)
    write_figures_picture(o, result)
    if not o.train_only:
        samples_picture(os.path.join(o.out, "samples.png"), s.model, s.curve_set[0])
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(os.path.join(o.out, "recovery.json"), result)
    return result


def write_figures_picture(o: RecoveryOptions, result: dict) -> None:
    """``<out>/learning_curve.png``: the curve with the targets and, when measured, the optimum and 1.25x it."""
    final = result.get("figures") or result["curve"][-1]
    title = (f"{o.net_recon}, {result['steps']} steps x {o.batch_size} in {result['train_seconds'] / 60:.1f} min on "
             f"{result['hardware']}; final: vertex {final['vertex_error_ratio']:.3f}, pose "
             f"{final['pose_error_deg']:.2f} deg, lm {final['lm_error_px']:.2f} px")
    lines = {"pose_error_deg": [(TARGETS["pose_error_deg"], "target", (200, 0, 0))],
             "lm_error_px": [(TARGETS["lm_error_px"], "target", (200, 0, 0))]}
    if result.get("optimum") is not None:
        v = result["optimum"]["vertex_error_ratio"]
        lines["vertex_error_ratio"] = [(v, "loss optimum", (0, 140, 0)),
                                       (TARGETS["vertex_vs_optimum"] * v, "target 1.25x", (200, 0, 0))]
    plot_curves(os.path.join(o.out, "learning_curve.png"), result["curve"], lines, title,
                stages=stage_changes(result["curve"]))


def print_oracles(oracles: dict | None) -> None:
    for name, orc in (oracles or {}).items():
        print(f"  landmark oracle {name:9s} (true 68 points, fitting {'+'.join(orc['groups'])}): vertex ratio "
              f"{orc['vertex_error_ratio']:.3f} (aligned {orc['vertex_error_ratio_aligned']:.3f}), pose "
              f"{orc['pose_error_deg']:.2f} deg, lm {orc['lm_error_px']:.2f} px")


def print_fitted(label: str, f: dict) -> None:
    print(f"  {label} ({f['steps']} steps, true 68 landmarks, {f['faces']} faces, {f['seconds']:.1f} s): vertex ratio "
          f"{f['vertex_error_ratio']:.3f} (aligned {f['vertex_error_ratio_aligned']:.3f}), pose "
          f"{f['pose_error_deg']:.2f} deg (orientation {f['orientation_error_deg']:.2f}), lm {f['lm_error_px']:.2f} px"
          + (f", loss {f['loss']:.4f}" if "loss" in f else ""))


def oracles_only(o: RecoveryOptions) -> dict:
    """The landmark oracles alone (no training) on ``--eval_size`` held-out faces: seconds on a GPU,
    a minute on a CPU for a few hundred faces; with ``--loss_oracle_steps`` also
    :func:`training_loss_oracle`. Writes ``<out>/oracles.json``."""
    from pipeline.runtime import resolve_device
    from models.losses import HybridLoss

    device = resolve_device(o.device)
    face_model, renderer, _, gen = synthetic_setup(o, device)
    test_set = held_out_test_set(o, gen)
    lm_scale = 224.0 / o.size
    result = {"faces": o.eval_size, "rigid_fraction": rigid_fraction(face_model), "hardware": hardware(device),
              "landmark_oracle": oracle_figures(face_model, test_set, o.oracle_steps, lm_scale)}
    if o.loss_oracle_steps > 0:
        loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
        sums, losses = ErrorSums(), {"loss_at_truth": 0.0, "loss_refined": 0.0}
        for b in test_set:
            refined = training_loss_oracle(loss_fn, b, o.loss_oracle_steps)
            sums.add(face_model, refined, b.coeffs, b.lm68, lm_scale)
            with torch.no_grad():
                for key, c in (("loss_at_truth", b.coeffs), ("loss_refined", refined)):
                    losses[key] += float(loss_fn(c, b.images, b.lm68).terms.total) * len(c) / o.eval_size
        result["training_loss_oracle"] = {"steps": o.loss_oracle_steps, **losses, **sums.figures()}
    counts = fit_counts(o.fit_steps)
    if counts:
        from types import SimpleNamespace

        result["fitting_from_mean_face"] = fitted_figures(
            SimpleNamespace(face_model=face_model, renderer=renderer), test_set, counts[-1], lm_scale,
            o.fit_lr, start=lambda b: torch.zeros_like(b.coeffs, dtype=torch.float32), faces=o.fit_faces)
    write_json(os.path.join(o.out, "oracles.json"), result)
    return result


def main(argv: list[str] | None = None) -> int:
    o = parse_recovery_options(argv)
    logging.basicConfig(level=logging.INFO if o.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    if o.oracle_only:
        res = oracles_only(o)
        print(f"{res['faces']} held-out faces on {res['hardware']}; rigid share of the bases: "
              f"identity {res['rigid_fraction']['id']:.2f}, expression {res['rigid_fraction']['exp']:.2f}")
        print_oracles(res["landmark_oracle"])
        if "training_loss_oracle" in res:
            t = res["training_loss_oracle"]
            print(f"  training-loss oracle (true coefficients refined {t['steps']} steps on the training loss): "
                  f"vertex ratio {t['vertex_error_ratio']:.3f} (aligned {t['vertex_error_ratio_aligned']:.3f}), "
                  f"pose {t['pose_error_deg']:.2f} deg, orientation {t['orientation_error_deg']:.2f} deg, "
                  f"lm {t['lm_error_px']:.2f} px; training loss {t['loss_at_truth']:.4f} at the truth, "
                  f"{t['loss_refined']:.4f} refined")
        if "fitting_from_mean_face" in res:
            print_fitted("fitting from the mean face", res["fitting_from_mean_face"])
        print(f"results in {o.out}/oracles.json")
        return 0
    try:
        result = run(o)
    except (FileNotFoundError, ValueError) as e:
        if not o.from_run:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if o.train_only:
        last = result["curve"][-1]
        print(f"trained {result['steps']} steps ({result['train_seconds']:.0f} s) on {result['hardware']}: curve set "
              f"vertex ratio {last['vertex_error_ratio']:.3f}, pose {last['pose_error_deg']:.2f} deg, lm "
              f"{last['lm_error_px']:.2f} px; evaluate with --from_run {o.out}")
        print(f"results in {o.out}/recovery.json (partial), {o.out}/learning_curve.png and "
              f"{o.checkpoint or os.path.join(o.out, CHECKPOINT_NAME)}")
        return 0
    f = result["figures"]
    print(f"recovery after {result['steps']} steps ({result['train_seconds']:.0f} s training, "
          f"{result['total_seconds']:.0f} s total) on {result['hardware']}:")
    opt_, vs = result["optimum"], result["vs_optimum"]
    if opt_ is not None:
        print(f"  per-face optimum of the loss ({opt_['faces']} faces, {opt_['seconds']:.0f} s): vertex ratio "
              f"{opt_['vertex_error_ratio']:.3f}, pose {opt_['pose_error_deg']:.2f} deg, lm {opt_['lm_error_px']:.2f} px "
              f"(loss {opt_['loss']:.4f}; at the truth {opt_['loss_at_truth']:.4f})")
        print(f"  regressor on those faces: vertex ratio {vs['regressor']['vertex_error_ratio']:.3f} = "
              f"{vs['regressor_vertex_vs_optimum']:.2f}x the optimum   target <= {TARGETS['vertex_vs_optimum']:g}x   "
              f"{'ok' if result['pass']['vertex_vs_optimum'] else 'MISSED'}")
    for key in ("pose_error_deg", "lm_error_px"):
        print(f"  {key:20s} {f[key]:8.3f}   target <= {TARGETS[key]:g}   {'ok' if result['pass'][key] else 'MISSED'}")
    print(f"  (mean face: {f['mean_face_vertex_error_mm']:.2f} mm vertex error, {f['frontal_pose_error_deg']:.2f} deg, "
          f"{f['mean_face_lm_error_px']:.2f} px; prediction: {f['vertex_error_mm']:.2f} mm)")
    print(f"  geometric: aligned vertex ratio {f['vertex_error_ratio_aligned']:.3f}, head orientation "
          f"{f['orientation_error_deg']:.2f} deg "
          f"(rigid share of the identity bases: {result['rigid_fraction']['id']:.2f})")
    print_oracles(result["landmark_oracle"])
    for n, fitted in (result["fitted_by_steps"] or {}).items():
        how = ("test.py's staged plan" if "plan" in fitted
               else f"{'front-only' if fitted['front_only'] else 'training'} loss")
        if "from_mean_face" in fitted:
            how += f", best of it and the mean face's start ({fitted['from_mean_face']:.0%} kept the mean face's)"
        print_fitted(f"regressor + per-image fitting {n}, {how}", fitted)
        if vs is not None:
            on_opt = vs["fitted_by_steps"][n]
            verdict = "ok" if on_opt["vertex_vs_optimum"] <= FITTED_VERTEX_VS_OPTIMUM else "MISSED"
            print(f"    on the optimum's faces: vertex ratio {on_opt['vertex_error_ratio']:.3f} = "
                  f"{on_opt['vertex_vs_optimum']:.2f}x the optimum   target <= {FITTED_VERTEX_VS_OPTIMUM:g}x   "
                  f"{verdict}")
    print(f"results in {o.out}/recovery.json, {o.out}/learning_curve.png and {o.out}/samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
