"""Where does the training loss send the coefficients? Two minima of the same loss, compared.

    python -m experiments.loss_landscape --bfm_folder standin/BFM --device cpu --size 112 \
        --faces 8 --fit_steps 150 --refine_steps 400 --out docs/recovery/landscape.json

On ``--faces`` held-out synthetic faces (the recovery experiment's generator and loss weights):

  * ``truth`` and ``truth_refined``: the true coefficients, then refined by ``--refine_steps`` Adam
    steps on the training loss (the recovery experiment's training-loss oracle: the minimum near
    the truth);
  * ``fitted_from_mean`` and ``fitted_then_refined``: test.py's per-image fitting from the mean
    face (``--fit_steps``, the true 68 landmarks), then the same refinement from there;
  * ``line``: the loss and the figures along the straight line from the fitted to the refined
    truth (11 points), showing which terms pull which way;
  * with ``--more_steps N``: both refined points refined further, ``--more_rounds`` rounds of N
    steps at the larger ``--more_lr`` (figures after each round): where each really settles.

Each entry has the vertex ratio, pose and landmark errors (as the recovery experiment reports
them) and every weighted loss term. If the minimum reached from the mean face has the lower loss,
a perfect minimiser of this loss would not recover the truth, whatever the network or its
training time. Writes ``--out`` (JSON) and prints a table.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from experiments.recovery import (ErrorSums, RecoveryOptions, held_out_test_set, synthetic_setup, training_loss_oracle,
                                  training_weights, write_json)
from options.base_options import build_parser, opt


@dataclass
class LandscapeOptions(RecoveryOptions):
    faces: int = opt(8, "held-out faces (one batch)")
    fit_steps: int = opt(150, "steps of test.py's fitting from the mean face")
    refine_steps: int = opt(400, "Adam steps of the training-loss refinement from the truth and from the fitted")
    line_points: int = opt(11, "points on the line from the fitted to the refined truth")
    more_steps: int = opt(0, "then refine both refined points further, in rounds of this many Adam steps (0: no)")
    more_rounds: int = opt(2, "rounds of --more_steps")
    more_lr: float = opt(0.02, "learning rate of those rounds (the first refinement's 3e-3 moves a coefficient by at "
                               "most ~1 in 400 steps)")
    out: str = opt("docs/recovery/landscape.json", "the JSON written")


def parse(argv: list[str] | None = None) -> LandscapeOptions:
    p = build_parser(LandscapeOptions, description=__doc__.splitlines()[0])
    return LandscapeOptions(**vars(p.parse_args(argv)))


def landscape(o: LandscapeOptions) -> dict:
    from models.fitting import FitConfig, fit_coeffs
    from pipeline.runtime import resolve_device
    from models.losses import HybridLoss

    t0 = time.perf_counter()
    device = resolve_device(o.device)
    o = dataclasses.replace(o, eval_size=o.faces, eval_batch=o.faces)
    face_model, renderer, syn, gen = synthetic_setup(o, device)
    batch = held_out_test_set(o, gen)[0]
    loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
    lm_scale = 224.0 / o.size

    def figures(c: torch.Tensor) -> dict:
        sums = ErrorSums()
        sums.add(face_model, c, batch.coeffs, batch.lm68, lm_scale)
        f = sums.figures()
        with torch.no_grad():
            terms = loss_fn(c, batch.images, batch.lm68).terms.as_floats()
        return {"vertex_error_ratio": f["vertex_error_ratio"], "pose_error_deg": f["pose_error_deg"],
                "lm_error_px": f["lm_error_px"], **{f"loss_{k}": v for k, v in terms.items()}}

    refined = training_loss_oracle(loss_fn, batch, o.refine_steps)
    fitted = fit_coeffs(SimpleNamespace(face_model=face_model, renderer=renderer),
                        torch.zeros_like(batch.coeffs, dtype=torch.float32), batch.images, lm68=batch.lm68,
                        steps=o.fit_steps, config=FitConfig(lr=o.fit_lr))
    fitted_refined = training_loss_oracle(loss_fn, dataclasses.replace(batch, coeffs=fitted), o.refine_steps)
    at_fitted, at_refined = figures(fitted), figures(refined)
    n = max(2, o.line_points)
    line = [{"t": k / (n - 1), **(at_fitted if k == 0 else at_refined if k == n - 1 else
                                  figures((1 - k / (n - 1)) * fitted + k / (n - 1) * refined))} for k in range(n)]
    more = {"truth_refined": [], "fitted_then_refined": []}
    ends = {"truth_refined": refined, "fitted_then_refined": fitted_refined}
    for _ in range(o.more_steps and o.more_rounds):
        for key, c in ends.items():
            ends[key] = training_loss_oracle(loss_fn, dataclasses.replace(batch, coeffs=c), o.more_steps, lr=o.more_lr)
            more[key].append(figures(ends[key]))
    return {"faces": o.faces, "size": o.size, "fit_steps": o.fit_steps, "fit_lr": o.fit_lr,
            "refine_steps": o.refine_steps, "device": str(device), "synthetic": dataclasses.asdict(syn),
            "weights": dataclasses.asdict(training_weights(o)), "truth": figures(batch.coeffs),
            "truth_refined": at_refined,
            "fitted_from_mean": at_fitted, "fitted_then_refined": figures(fitted_refined),
            "line_fitted_to_truth_refined": line,
            "refined_further": {"steps_per_round": o.more_steps, "lr": o.more_lr, **more},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    o = parse(argv)
    res = landscape(o)
    print(f"{res['faces']} faces at {res['size']} px on {res['device']} ({res['seconds']:.0f} s):")
    print(f"  {'':22s} {'vertex':>7s} {'pose':>6s} {'lm px':>6s} {'loss':>7s} {'color':>7s} {'reg':>7s} {'reflc':>7s}")
    rows = [(k, res[k]) for k in ("truth", "truth_refined", "fitted_from_mean", "fitted_then_refined")]
    rows += [(f"line t={p['t']:.1f}", p) for p in res["line_fitted_to_truth_refined"]]
    further = res["refined_further"]
    for key in ("truth_refined", "fitted_then_refined"):
        rows += [(f"{key.split('_')[0]} +{(i + 1) * further['steps_per_round']} @{further['lr']:g}", p)
                 for i, p in enumerate(further[key])]
    for name, f in rows:
        print(f"  {name:22s} {f['vertex_error_ratio']:7.3f} {f['pose_error_deg']:6.2f} {f['lm_error_px']:6.2f} "
              f"{f['loss_all']:7.4f} {f['loss_color']:7.4f} {f['loss_reg']:7.4f} {f['loss_reflc']:7.4f}")
    write_json(o.out, res, indent=1)
    print(f"results in {o.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
