"""How the loss's terms pull on the regressor's shared backbone: gradient sizes and directions.

    python -m experiments.gradient_balance --bfm_folder standin/BFM --device cpu \
        --checkpoint run/regressor.pth --faces 32 --out docs/recovery/gradient_balance.json

For a trained regressor (a recovery run's checkpoint) on ``--faces`` held-out synthetic faces, in
training mode (batch statistics, as a training step sees them), three gradients of the backbone's
parameters (everything but the coefficient heads), each over the same batches:

  * ``landmarks``: the landmark stage's terms (landmark, regularisation, gamma, reflectance;
    :func:`models.fitting.landmark_stage_loss`), what trains the geometry in ``--curriculum``;
  * ``photometric_appearance``: the photometric term through the texture and lighting
    coefficients only (what ``--appearance_stage`` trains);
  * ``photometric_geometry``: the photometric term through identity, expression, pose and
    translation only.

The two photometric gradients come from one render: the term's gradient with respect to the
coefficients is split by group and each part carried back through the network (the chain rule:
the two add up to the whole photometric gradient).

For each: its norm, its norm as a multiple of the landmark terms', and its cosine with the landmark
terms' gradient; the same for each part of the backbone (``by_part``: conv1, bn1, layer1 ...
layer4). Adam scales each parameter's step by the running size of its own gradient, so a
term whose gradient is many times the landmark terms' and nearly orthogonal to it moves the shared
features in directions the landmark terms did not ask for. ``--appearance_grad`` shows the same
with the recovery experiment's scaling of the appearance heads' gradient. Writes ``--out`` (JSON)
and prints a table.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

from experiments.recovery import (GEOMETRY, RecoveryOptions, heldout, scale_appearance_gradient, synthetic_setup,
                                  training_weights, write_json)
from options.base_options import build_parser, opt

GRADIENTS = ("landmarks", "photometric_appearance", "photometric_geometry")


@dataclass
class BalanceOptions(RecoveryOptions):
    faces: int = opt(32, "held-out faces (in batches of --eval_batch)")
    eval_batch: int = opt(16, "faces per batch (batch statistics are those of a batch of this size)")
    checkpoint: str = opt("", "the regressor (a recovery run's regressor.pth or any checkpoint of --net_recon in the "
                              "original format); required: the zero-initialised heads of a fresh network pass no "
                              "gradient to the backbone")
    out: str = opt("docs/recovery/gradient_balance.json", "the JSON written")


def parse(argv: list[str] | None = None) -> BalanceOptions:
    p = build_parser(BalanceOptions, description=__doc__.splitlines()[0])
    o = BalanceOptions(**vars(p.parse_args(argv)))
    if not o.checkpoint:
        p.error("--checkpoint is required (a recovery run's regressor.pth: python -m experiments.recovery "
                "--train_only true --out run writes run/regressor.pth)")
    if not os.path.isfile(o.checkpoint):
        p.error(f"--checkpoint {o.checkpoint} does not exist")
    if o.appearance_net != "shared":
        p.error("--appearance_net separate: its two backbones share nothing to balance; this measures the terms' "
                "pull on one shared backbone (a --appearance_net shared checkpoint)")
    return o


def flat_grad(out: torch.Tensor, params: list[torch.Tensor], grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """d out / d params (``out`` a () loss, or any tensor with ``grad_out``, the gradient arriving
    at it), flattened into one vector (zeros where a parameter gets none)."""
    grads = torch.autograd.grad(out, params, grad_out, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def backbone_parts(backbone: torch.nn.Module) -> dict[str, slice]:
    """Where each top-level part of the backbone (``conv1``, ``bn1``, ``layer1`` ... ``layer4``)
    sits in the flattened gradient of its trainable parameters, in ``parameters()`` order."""
    out, start = {}, 0
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            part = name.split(".")[0]
            first = out.get(part, slice(start, start)).start
            out[part] = slice(first, start + p.numel())
            start += p.numel()
    return out


def compare(grads: dict[str, torch.Tensor]) -> dict:
    """For each of :data:`GRADIENTS`: its norm, as a multiple of the landmark terms', and its cosine with theirs."""
    ref = grads["landmarks"]
    cos = torch.nn.functional.cosine_similarity
    return {k: {"norm": float(v.norm()), "x_landmarks": float(v.norm() / ref.norm()),
                "cosine_with_landmarks": float(cos(v, ref, dim=0))} for k, v in grads.items()}


def balance(o: BalanceOptions) -> dict:
    from models.coeffs import COEFFS
    from models.facerecon import FaceReconModel
    from models.fitting import landmark_stage_loss
    from models.losses import HybridLoss
    from models.networks import load_recon_net
    from pipeline.runtime import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(o.device)
    face_model, renderer, syn, gen = synthetic_setup(o, device)
    net = load_recon_net(o.checkpoint, o.net_recon)
    if o.appearance_grad != 1.0:  # as the training with --appearance_grad sees it
        scale_appearance_gradient(net, o.appearance_grad)
    model = FaceReconModel(net, face_model, renderer).to(device)
    loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
    params = [p for p in net.backbone.parameters() if p.requires_grad]
    parts = backbone_parts(net.backbone)
    sums = {k: None for k in GRADIENTS}
    net.train()
    for batch in heldout(gen, o.faces, o.eval_batch, o.seed + 1000):
        coeffs = model.predict_coeffs(batch.images)
        lm = landmark_stage_loss(face_model, coeffs, batch.lm68, loss_fn.weights)
        color = loss_fn(coeffs, batch.images, batch.lm68).terms.color
        d_color = torch.autograd.grad(color, coeffs, retain_graph=True)[0]  # (B, 257): split by group below
        d_geo = COEFFS.merge({k: v if k in GEOMETRY else torch.zeros_like(v) for k, v in COEFFS.split(d_color).items()})
        g = {"landmarks": flat_grad(lm, params), "photometric_appearance": flat_grad(coeffs, params, d_color - d_geo),
             "photometric_geometry": flat_grad(coeffs, params, d_geo)}
        w = batch.images.shape[0] / o.faces  # the mean over all faces, batch by batch
        for k in GRADIENTS:
            sums[k] = w * g[k] if sums[k] is None else sums[k] + w * g[k]
    sums = {k: v.double() for k, v in sums.items()}  # sums over ~10^7 entries
    out = compare(sums)
    by_part = {name: compare({k: v[sl] for k, v in sums.items()}) for name, sl in parts.items()}
    return {"checkpoint": o.checkpoint, "net_recon": o.net_recon, "faces": o.faces, "batch": o.eval_batch,
            "size": o.size, "device": str(device), "appearance_grad": o.appearance_grad,
            "backbone_parameters": int(sums["landmarks"].numel()),
            "weights": dataclasses.asdict(training_weights(o)), "gradients": out, "by_part": by_part,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    from models.networks import CheckpointError

    o = parse(argv)
    try:
        res = balance(o)
    except CheckpointError as e:  # unreadable, not a checkpoint, or not of --net_recon
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['faces']} faces at {res['size']} px on {res['device']} ({res['seconds']:.0f} s), "
          f"backbone gradients of {o.checkpoint}:")
    print(f"  {'':32s} {'norm':>10s} {'x landmarks':>12s} {'cosine':>8s}")
    for part, rows in {"backbone": res["gradients"], **res["by_part"]}.items():
        for k, v in rows.items():
            print(f"  {part + ' ' + k:32s} {v['norm']:10.3e} {v['x_landmarks']:12.2f} "
                  f"{v['cosine_with_landmarks']:8.3f}")
    write_json(o.out, res, indent=1)
    print(f"results in {o.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
