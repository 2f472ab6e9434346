"""Per-image fitting on real photos: 68-point landmark error against dlib, before and after.

    python -m experiments.fitting_eval --img_folder tests/data/faces --name standin --epoch 20 \\
        --bfm_folder standin/BFM --out docs/fitting --image docs/images/fitting_before_after.png

The photos are prepared as for test.py (``process_images.py --landmarks68`` on a copy in
``--work_dir`` unless the folder already has detections/ and landmarks/): MTCNN's 5 points align
each photo to the 224 crop, dlib's 68 points are the reference. The regressor's coefficients
(the stand-in checkpoint is untrained) are then refined with :func:`models.fitting.fit_coeffs`,
either against dlib's 68 points (``fit68``, what ``test.py --fit_steps`` does for a face with
``landmarks/<name>.txt``) or against the 5 detected points only (``fit5``, its fallback). Reported: mean distance of the 68 projected landmarks to
dlib's, pixels of the 224 crop, before and after; the picture shows input | before | after with
dlib's points in blue and the model's in red.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from options.base_options import build_parser, opt

log = logging.getLogger("fitting_eval")


@dataclass
class FittingEvalOptions:
    img_folder: str = opt("tests/data/faces", "photos to fit")
    work_dir: str = opt("", "where a copy of the photos is prepared (default checkpoints/<name>/fitting_eval_photos)")
    name: str = opt("standin", "checkpoints/<name>/epoch_<epoch>.pth is the regressor")
    epoch: str = opt("20", "which epoch to load")
    checkpoints_dir: str = opt("./checkpoints", "checkpoint folder")
    net_recon: str = opt("resnet50", "network structure", choices=["resnet18", "resnet34", "resnet50"])
    bfm_folder: str = opt("standin/BFM", "face model folder")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    targets: str = opt("68,5", "which fits to run: 68 (dlib's points as targets) and/or 5 (detections, as test.py)")
    steps: int = opt(150, "fitting steps")
    landmark_steps: int = opt(100, "leading steps with landmark and regularisation terms only (no rendering)")
    lr: float = opt(0.05, "base learning rate of the fit")
    loss: str = opt("", "'' = fit with --lr and --landmark_steps; front, train or staged = test.py's --fit_loss "
                        "settings (models.fitting.fit_config)", choices=["", "front", "train", "staged"])
    batch_size: int = opt(8, "faces fitted at once")
    out: str = opt("docs/fitting", "folder for fitting_eval.json")
    image: str = opt("docs/images/fitting_before_after.png", "before/after picture ('' = none)")
    show: int = opt(4, "faces in the picture")
    panel: int = opt(160, "panel size of the picture in pixels")


def parse_fitting_eval_options(argv: list[str] | None = None) -> FittingEvalOptions:
    p = build_parser(FittingEvalOptions, description=__doc__.splitlines()[0])
    return FittingEvalOptions(**vars(p.parse_args(argv)))


def prepared_folder(o: FittingEvalOptions) -> str:
    """A folder with detections/ and landmarks/ for the photos (prepared on a copy when needed)."""
    from util.image_io import list_images

    photos = list_images(o.img_folder)
    have = all(os.path.isfile(os.path.join(o.img_folder, d, os.path.splitext(p)[0] + ".txt"))
               for p in photos for d in ("detections", "landmarks"))
    if have:
        return o.img_folder
    work = o.work_dir or os.path.join(o.checkpoints_dir, o.name, "fitting_eval_photos")
    os.makedirs(work, exist_ok=True)
    for p in photos:
        dst = os.path.join(work, p)
        if not os.path.isfile(dst):
            shutil.copyfile(os.path.join(o.img_folder, p), dst)
    import process_images

    log.info("detecting 5 and 68 points in %d photos (copy in %s)", len(photos), work)
    code = process_images.main([work, "--landmarks68", "--no-progress"])
    if code not in (0, 1):
        raise RuntimeError(f"process_images failed on {work} (exit {code})")
    return work


def load_faces(folder: str, lm3d: np.ndarray) -> list[dict]:
    """The chosen face of each photo that has dlib's 68 points: its aligned crop ((3,224,224)
    float32 0..1), its 5 detected points and dlib's 68 (crop pixels, y up), loaded by test.py's
    dataset (:class:`data.image_folder.AlignedFaces`)."""
    from data.image_folder import AlignedFaces, scan_folder
    from util.preprocess import unit_float_table

    entries, _ = scan_folder(folder, lm68=True)
    chosen = [e for e in entries  # not the extra faces (<stem>__face02, ...) of group photos
              if e.lm68_path and e.name == os.path.splitext(os.path.basename(e.image_path))[0]]
    faces = []
    for item in AlignedFaces(chosen, lm3d):
        if item["error"] is not None:
            raise RuntimeError(f"{item['image_path']}: {item['error']}")
        faces.append({"name": item["name"], "image": unit_float_table()[item["image"]],
                      "lm5": item["lm"], "lm68": item["lm68"]})
    return faces


def lm_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, K, 2), (B, K, 2) -> (B,) mean point distance."""
    return (pred - target).norm(dim=-1).mean(dim=-1)


def picture(path: str, faces: list[dict], stages: list[tuple[str, list]], panel: int) -> None:
    """Rows of input | one overlay per stage, resized to ``panel`` pixels, then dlib's 68 points
    drawn in blue and the model's in red; saved as a palette PNG (small)."""
    from PIL import Image

    from util.visualize import BLUE, RED, draw_landmarks

    def small(rgb01: np.ndarray) -> np.ndarray:
        img = Image.fromarray(np.clip(rgb01 * 255.0, 0, 255).astype(np.uint8))
        return np.asarray(img.resize((panel, panel), Image.Resampling.LANCZOS), dtype=np.float32)[None]

    k = panel / 224.0
    rows = []
    for i, f in enumerate(faces):
        image = f["image"].transpose(1, 2, 0)
        gt = f["lm68"][None] * k
        cells = [draw_landmarks(small(image), gt, BLUE, step=1)[0]]
        for _, recs in stages:
            r = recs[i]
            over = draw_landmarks(small(r["render"] * r["mask"] + (1 - r["mask"]) * image), gt, BLUE, step=1)
            cells.append(draw_landmarks(over, r["lm"][None] * k, RED, step=1)[0])
        rows.append(np.concatenate(cells, axis=1))
    grid = Image.fromarray(np.clip(np.concatenate(rows, axis=0), 0, 255).astype(np.uint8))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def run(o: FittingEvalOptions) -> dict:
    from models.fitting import FitConfig, fit_coeffs, fit_config, plan_record
    from options.run_specs import model_spec
    from options.test_options import TestOptions
    from pipeline.model import build_model
    from pipeline.runtime import resolve_device
    from util.preprocess import load_lm3d

    t0 = time.perf_counter()
    device = resolve_device(o.device)
    topt = TestOptions(name=o.name, epoch=o.epoch, checkpoints_dir=o.checkpoints_dir, bfm_folder=o.bfm_folder,
                       net_recon=o.net_recon)
    model = build_model(model_spec(topt), device)
    faces = load_faces(prepared_folder(o), load_lm3d(o.bfm_folder))
    if not faces:
        raise RuntimeError(f"no photo of {o.img_folder} has both a detection and 68 landmarks")
    cfg = fit_config(o.loss) if o.loss else FitConfig(lr=o.lr, landmark_steps=o.landmark_steps)
    kinds = [k.strip() for k in o.targets.split(",") if k.strip()]
    stages: dict[str, list] = {"before": []}
    stages.update({f"fit{k}": [] for k in kinds})
    seconds = {k: 0.0 for k in stages}
    for s in range(0, len(faces), o.batch_size):
        chunk = faces[s:s + o.batch_size]
        images = torch.from_numpy(np.stack([f["image"] for f in chunk])).to(device)
        lm5 = torch.from_numpy(np.stack([f["lm5"] for f in chunk])).to(device)
        lm68 = torch.from_numpy(np.stack([f["lm68"] for f in chunk])).to(device)
        with torch.inference_mode():
            pred = model.predict_coeffs(images)
        coeffs = {"before": pred.clone()}
        for k in kinds:
            t = time.perf_counter()
            coeffs[f"fit{k}"] = fit_coeffs(model, pred.clone(), images, lm5, steps=o.steps,
                                           lm68=lm68 if k == "68" else None, config=cfg)
            seconds[f"fit{k}"] += time.perf_counter() - t
        with torch.no_grad():
            for stage, c in coeffs.items():
                rec = model.reconstruct(c)
                for i in range(len(chunk)):
                    stages[stage].append({
                        "lm": rec.face.landmark[i].cpu().numpy(),
                        "err68": float(lm_error(rec.face.landmark[i:i + 1], lm68[i:i + 1])),
                        "render": rec.render[i].permute(1, 2, 0).cpu().numpy(),
                        "mask": rec.mask[i].permute(1, 2, 0).cpu().numpy()})
        log.info("fitted %d/%d faces", min(s + o.batch_size, len(faces)), len(faces))
    figures = {k: {"lm68_error_px_mean": float(np.mean([r["err68"] for r in v])),
                   "lm68_error_px_median": float(np.median([r["err68"] for r in v])),
                   "lm68_error_px_max": float(np.max([r["err68"] for r in v])),
                   "fit_seconds": round(seconds[k], 1)} for k, v in stages.items()}
    result = {
        "faces": len(faces), "figures": figures, "target_px": 4.0,
        "per_face": {f["name"]: {k: round(v[i]["err68"], 3) for k, v in stages.items()} for i, f in enumerate(faces)},
        "device": str(device), "renderer": model.renderer.backend, "torch": torch.__version__,
        "options": dataclasses.asdict(o), "fit_config": plan_record(cfg, o.steps),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(o.out, exist_ok=True)
    with open(os.path.join(o.out, "fitting_eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if o.image:
        show = list(range(min(o.show, len(faces))))
        picture(o.image, [faces[i] for i in show], [(k, [v[i] for i in show]) for k, v in stages.items()], o.panel)
    return result


def main(argv: list[str] | None = None) -> int:
    o = parse_fitting_eval_options(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    r = run(o)
    print(f"68-point error against dlib on {r['faces']} faces (pixels at 224, mean / median / max):")
    for k, f in r["figures"].items():
        print(f"  {k:7s} {f['lm68_error_px_mean']:6.2f} / {f['lm68_error_px_median']:6.2f} / "
              f"{f['lm68_error_px_max']:6.2f}   ({f['fit_seconds']:.0f} s)")
    print(f"results in {o.out}/fitting_eval.json" + (f", picture {o.image}" if o.image else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
