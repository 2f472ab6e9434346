"""Image sets on synthetic faces: is the aggregated identity closer to the truth than one photo's?

    python -m experiments.image_set_eval --out docs/image_sets --figure docs/images/image_set_curve.png

Each of ``--people`` synthetic people (a random identity and albedo of the stand-in face model) is
rendered in ``--photos`` photos with random expression, pose, lighting and background
(:mod:`data.synthetic`). Each photo's 68 landmarks are given to the reconstruction with detector
noise: most photos' landmarks are off by ``--noise_px`` (Gaussian, pixels at 224), ``--bad``
photos per person by ``--bad_noise_px`` (a detector that went wrong). The stand-in network is
untrained, so each photo's own reconstruction is what ``test.py --fit_steps`` does from the mean
face: :func:`models.fitting.fit_coeffs` on that photo alone, ``--fit_steps`` landmark steps then
``--photo_steps`` photometric ones (its albedo and lighting; with fewer the photometric residual
measures the lighting, not the fit). The confidences are the library's
(:mod:`pipeline.confidence`: ``fit`` from the photo's landmark and photometric residuals, and
``uniform``), the aggregation is :func:`pipeline.image_sets.aggregate`.

Reported per photo count k in 1, 2, 4, 8: the mean vertex error of the aggregated identity
(neutral expression, model space, mm; and after a similarity alignment to the truth, as 3D face
benchmarks do, since the stand-in's identity bases contain rigid motion) over every person and
``--subsets`` random k-photo subsets; k = 1 is the mean single-photo error. Writes
``<out>/image_set_eval.json`` and the curve ``--figure``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from options.base_options import build_parser, opt


@dataclass
class ImageSetEvalOptions:
    bfm_folder: str = opt("standin/BFM", "face model folder (python -m tools.standin builds standin/BFM)")
    people: int = opt(6, "synthetic people")
    photos: int = opt(8, "photos per person")
    bad: int = opt(2, "photos per person whose landmarks are off by --bad_noise_px")
    noise_px: float = opt(1.0, "landmark noise of the other photos, pixels at 224 (Gaussian sigma)")
    bad_noise_px: float = opt(8.0, "landmark noise of the bad photos, pixels at 224")
    size: int = opt(96, "render size (camera scaled with it; residuals are reported at 224)")
    fit_steps: int = opt(80, "landmark steps of each photo's fit (no rendering)")
    photo_steps: int = opt(6, "photometric steps after them (rendered; the slow part on a CPU)")
    subsets: int = opt(20, "random subsets per person for each photo count below --photos")
    seed: int = opt(0, "seed")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)")
    out: str = opt("docs/image_sets", "folder for image_set_eval.json")
    figure: str = opt("docs/images/image_set_curve.png", "the curve's picture ('' = none)")


COUNTS = (1, 2, 4, 8)


def synthetic_sets(o: ImageSetEvalOptions, fm, renderer, g: torch.Generator):
    """(SyntheticBatch of people*photos faces, person-major; the landmarks given to the fit)."""
    from models.coeffs import COEFFS
    from data.synthetic import SyntheticConfig, SyntheticFaces

    gen = SyntheticFaces(fm, renderer, SyntheticConfig(in_range=True))
    n = o.people * o.photos
    parts = COEFFS.split(gen.sample_coeffs(n, g))
    for k in ("id", "tex"):  # one identity and albedo per person
        parts[k] = parts[k].view(o.people, o.photos, -1)[:, :1].expand(-1, o.photos, -1).reshape(n, -1)
    if gen.config.in_range:
        parts["gamma"] = gen.light_in_range(parts)
    batch = gen.render(COEFFS.merge(parts), g)
    sigma = torch.full((o.people, o.photos), o.noise_px)
    sigma[:, o.photos - o.bad:] = o.bad_noise_px
    sigma = sigma.reshape(n, 1, 1) * (o.size / 224.0)
    given = batch.lm68 + sigma * torch.randn(batch.lm68.shape, generator=g)
    return batch, given


def identity_errors(fm, ids: torch.Tensor, true_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mm, aligned mm) mean vertex distances of neutral identity shapes (B, 80) to the truth's."""
    from experiments.recovery import similarity_align
    from models.coeffs import COEFFS

    zero = torch.zeros(ids.shape[0], COEFFS.exp)
    sp, st = fm.compute_shape(ids.float(), zero), fm.compute_shape(true_ids.float(), zero)
    raw = (sp - st).norm(dim=-1).mean(dim=1) * 100.0  # decimetres -> mm
    aligned = (similarity_align(sp, st)[0] - st).norm(dim=-1).mean(dim=1) * 100.0
    return raw.numpy(), aligned.numpy()


def subsets(photos: int, k: int, n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    every = list(itertools.combinations(range(photos), k))
    if len(every) <= n:
        return every
    return [every[i] for i in rng.choice(len(every), n, replace=False)]


def run(o: ImageSetEvalOptions) -> dict:
    from models.bfm import ParametricFaceModel
    from models.coeffs import COEFFS
    from models.facerecon import FaceReconModel
    from models.fitting import FitConfig, fit_coeffs
    from models.renderer import create_renderer
    from pipeline.confidence import FitConfidence, UniformConfidence, fit_residuals
    from pipeline.image_sets import aggregate

    if o.threads > 0:
        torch.set_num_threads(o.threads)
    t0 = time.perf_counter()
    center, focal = o.size / 2.0, 1015.0 * o.size / 224.0
    fm = ParametricFaceModel.from_folder(o.bfm_folder, focal=focal, center=center)
    renderer = create_renderer("cpu", focal=focal, center=center)
    model = FaceReconModel(torch.nn.Identity(), fm, renderer)
    g = torch.Generator().manual_seed(o.seed)
    batch, given = synthetic_sets(o, fm, renderer, g)
    steps = o.fit_steps + o.photo_steps
    fitted = fit_coeffs(model, torch.zeros_like(batch.coeffs), batch.images, lm68=given, steps=steps,
                        config=FitConfig(landmark_steps=o.fit_steps))
    fit_seconds = time.perf_counter() - t0
    res = fit_residuals(model, batch.images, fitted, given)
    confidences = {"fit": FitConfidence()(batch.images, fitted, res),
                   "uniform": UniformConfidence()(batch.images, fitted, res)}
    ids = COEFFS.split(fitted)["id"]
    true_ids = COEFFS.split(batch.coeffs)["id"].view(o.people, o.photos, -1)[:, 0]
    single_raw, single_aligned = identity_errors(fm, ids, true_ids.repeat_interleave(o.photos, 0))
    rng = np.random.default_rng(o.seed)
    curve = {name: {"k": [], "vertex_error_mm": [], "vertex_error_aligned_mm": []} for name in confidences}
    for k in [k for k in COUNTS if k <= o.photos]:
        picks = [(p, s) for p in range(o.people) for s in subsets(o.photos, k, o.subsets, rng)]
        rows = [p * o.photos + np.array(s) for p, s in picks]
        truth = true_ids[[p for p, _ in picks]]
        for name, conf in confidences.items():
            agg = torch.stack([aggregate(fitted[r].double(), conf[r].double()).id for r in rows])
            raw, aligned = identity_errors(fm, agg, truth)
            curve[name]["k"].append(k)
            curve[name]["vertex_error_mm"].append(round(float(raw.mean()), 4))
            curve[name]["vertex_error_aligned_mm"].append(round(float(aligned.mean()), 4))
    bad = np.zeros((o.people, o.photos), bool)
    bad[:, o.photos - o.bad:] = True
    bad = bad.ravel()
    conf_fit = confidences["fit"].numpy()
    mean_face_raw, mean_face_aligned = identity_errors(fm, torch.zeros_like(true_ids), true_ids)
    return {
        "settings": asdict(o),
        "hardware": f"CPU, {torch.get_num_threads()} threads",
        "seconds_fitting": round(fit_seconds, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "single_photo": {"vertex_error_mm": round(float(single_raw.mean()), 4),
                         "vertex_error_aligned_mm": round(float(single_aligned.mean()), 4),
                         "good_photos_vertex_error_mm": round(float(single_raw[~bad].mean()), 4),
                         "bad_photos_vertex_error_mm": round(float(single_raw[bad].mean()), 4) if bad.any() else None},
        "mean_face": {"vertex_error_mm": round(float(mean_face_raw.mean()), 4),
                      "vertex_error_aligned_mm": round(float(mean_face_aligned.mean()), 4)},
        "residuals": {"landmark_px_good": round(float(res.landmark.numpy()[~bad].mean()), 3),
                      "landmark_px_bad": round(float(res.landmark.numpy()[bad].mean()), 3) if bad.any() else None,
                      "photo_good": round(float(res.photo.numpy()[~bad].mean()), 4),
                      "photo_bad": round(float(res.photo.numpy()[bad].mean()), 4) if bad.any() else None},
        "confidence_fit": {"good_mean": round(float(conf_fit[~bad].mean()), 4),
                           "bad_mean": round(float(conf_fit[bad].mean()), 4) if bad.any() else None},
        "curve": curve,
    }


def plot(path: str, result: dict) -> None:
    """The curve as a small PNG drawn with PIL (no plotting library needed): error against the
    photo count (log2 axis), solid raw, dashed aligned, the mean face's error dotted."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 520, 340, 56, 200, 30, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    s = result["settings"]
    d.text((8, 8), f"{s['people']} synthetic people, {s['bad']} of {s['photos']} photos with bad landmarks",
           fill="black")
    series = [(name, key) for name in result["curve"] for key in ("vertex_error_mm", "vertex_error_aligned_mm")]
    values = [v for name, key in series for v in result["curve"][name][key]] + [result["mean_face"]["vertex_error_mm"]]
    lo, hi = 0.0, max(values) * 1.08
    ks = result["curve"][series[0][0]]["k"]
    x0, x1, y0, y1 = left, w - right, h - bottom, top

    def xy(k: float, v: float) -> tuple[float, float]:
        fx = math.log2(k) / max(1.0, math.log2(max(ks)))
        return x0 + fx * (x1 - x0), y0 + (v - lo) / (hi - lo) * (y1 - y0)

    d.rectangle([x0, y1, x1, y0], outline="black")
    for k in ks:
        d.text((xy(k, lo)[0] - 3, y0 + 6), str(k), fill="black")
    for t in np.linspace(lo, hi, 5)[1:]:
        d.text((6, xy(1, t)[1] - 6), f"{t:.2f}", fill="black")
    d.text((x0 + 60, h - 18), "photos per person", fill="black")
    d.text((6, top - 14 + 8), "", fill="black")
    colours = {"fit": (31, 119, 180), "uniform": (255, 127, 14)}
    legend_y = top + 6
    for name, key in series:
        pts = [xy(k, v) for k, v in zip(result["curve"][name]["k"], result["curve"][name][key])]
        dashed = key.endswith("aligned_mm")
        for a, b in zip(pts, pts[1:]):
            if dashed:
                for f in np.arange(0, 1, 0.2):
                    g = min(1.0, f + 0.1)
                    d.line([a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]),
                            a[0] + g * (b[0] - a[0]), a[1] + g * (b[1] - a[1])], fill=colours[name], width=2)
            else:
                d.line([a, b], fill=colours[name], width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colours[name])
        d.line([x1 + 10, legend_y + 6, x1 + 34, legend_y + 6], fill=colours[name], width=2 if not dashed else 1)
        d.text((x1 + 40, legend_y), f"{name}{', aligned' if dashed else ''}", fill="black")
        legend_y += 18
    ym = xy(1, result["mean_face"]["vertex_error_mm"])[1]
    for xa in range(x0, x1, 8):
        d.line([xa, ym, xa + 3, ym], fill=(128, 128, 128))
    d.text((x1 + 10, legend_y), "mean face (dotted)", fill="black")
    d.text((x1 + 10, legend_y + 18), "y: identity vertex", fill="black")
    d.text((x1 + 10, legend_y + 32), "error, mm", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = build_parser(ImageSetEvalOptions, description=__doc__.splitlines()[0])
    o = ImageSetEvalOptions(**vars(p.parse_args(argv)))
    result = run(o)
    os.makedirs(o.out, exist_ok=True)
    with open(os.path.join(o.out, "image_set_eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if o.figure:
        plot(o.figure, result)
    s = result["single_photo"]
    print(f"single photo: {s['vertex_error_mm']:.3f} mm ({s['vertex_error_aligned_mm']:.3f} aligned); "
          f"mean face {result['mean_face']['vertex_error_mm']:.3f} mm")
    for name, c in result["curve"].items():
        print(f"{name:8s} " + ", ".join(f"k={k}: {e:.3f} mm ({a:.3f})" for k, e, a in
                                        zip(c["k"], c["vertex_error_mm"], c["vertex_error_aligned_mm"])))
    print(f"{result['seconds_total']:.0f} s; results in {o.out}/image_set_eval.json")
    return 0 if all(math.isfinite(v) for c in result["curve"].values() for v in c["vertex_error_mm"]) else 1


if __name__ == "__main__":
    sys.exit(main())
