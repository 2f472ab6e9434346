"""Reconstruct every detected face of a folder: the library behind test.py.

Streaming and batched: a DataLoader decodes and aligns photos in worker processes, the network,
face model and renderer run on whole batches, and a thread pool writes .obj/.png/.mat files off
the critical path. Nothing is kept per image once written, so memory stays flat.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from models.coeffs import COEFFS
from util.assets import MissingAssetError

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The run cannot start (missing model files, bad options); the message says what to do."""


# --------------------------------------------------------------------------- set-up
def resolve_device(device: str, gpu_ids: str = "0", local_rank: int | None = None) -> torch.device:
    """--device/--gpu_ids -> torch.device. 'auto' = CUDA when available (and gpu_ids != -1)."""
    ids = [int(i) for i in str(gpu_ids).split(",") if i.strip() and int(i) >= 0]
    if device == "auto":
        device = "cuda" if ids and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {device} asked for CUDA, but torch {torch.__version__} sees no CUDA "
                             "device; use --device cpu")
        if device == "cuda":
            idx = local_rank if local_rank is not None else (ids[0] if ids else 0)
            if local_rank is not None and ids:
                idx = ids[local_rank % len(ids)]
            device = f"cuda:{idx}"
    return torch.device(device)


def renderer_backend(device: torch.device, use_opengl: bool) -> str:
    if device.type != "cuda":
        if use_opengl:
            log.warning("--use_opengl True needs a CUDA device; rendering with the CPU rasterizer on %s", device)
        return "cpu"
    return "opengl" if use_opengl else "cuda"


def checkpoint_path(opt) -> str:
    return os.path.join(opt.checkpoints_dir, opt.name, f"epoch_{opt.epoch}.pth")


def results_dir(opt) -> str:
    if opt.results_dir:
        return opt.results_dir
    folder = os.path.basename(os.path.normpath(opt.img_folder))
    return os.path.join(opt.checkpoints_dir, opt.name, "results", folder, f"epoch_{opt.epoch}_000000")


def build_model(opt, device: torch.device):
    """Face model, network and renderer for ``opt``; raises SetupError with a one-line reason."""
    from models.bfm import ParametricFaceModel
    from models.facerecon import FaceReconModel
    from models.networks import CheckpointError, load_recon_net
    from models.renderer import create_renderer

    try:
        face_model = ParametricFaceModel.from_folder(opt.bfm_folder, opt.bfm_model, camera_distance=opt.camera_d,
                                                     focal=opt.focal, center=opt.center)
        net = load_recon_net(checkpoint_path(opt), opt.net_recon, opt.use_last_fc)
    except (MissingAssetError, CheckpointError, ValueError) as e:
        raise SetupError(str(e)) from None
    renderer = create_renderer(renderer_backend(device, opt.use_opengl), focal=opt.focal, center=opt.center,
                               z_near=opt.z_near, z_far=opt.z_far, device=device)
    model = FaceReconModel(net, face_model, renderer, amp=opt.amp, channels_last=opt.channels_last)
    model = model.to(device).eval()
    if opt.channels_last:
        model.net.to(memory_format=torch.channels_last)
    if opt.compile:
        model.net = torch.compile(model.net)
    return model


# --------------------------------------------------------------------------- outputs
@dataclass
class RunSummary:
    """Counts of one run (or one rank of a multi-GPU run)."""

    faces_ok: int = 0
    faces_failed: int = 0
    photos_without_detection: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (photo or face, reason)
    out_dir: str = ""
    seconds: float = 0.0

    def merge(self, other: "RunSummary") -> None:
        self.faces_ok += other.faces_ok
        self.faces_failed += other.faces_failed
        self.photos_without_detection += other.photos_without_detection
        self.failures += other.failures
        self.seconds = max(self.seconds, other.seconds)

    @property
    def exit_code(self) -> int:
        """0: every face with a detection was reconstructed; 1: some failed or nothing to do."""
        return 0 if self.faces_failed == 0 and self.faces_ok > 0 else 1

    def report(self) -> str:
        lines = [f"done: {self.faces_ok} face(s) reconstructed, {self.faces_failed} failed, "
                 f"{len(self.photos_without_detection)} photo(s) skipped without a detection file "
                 f"({self.seconds:.1f} s); results in {self.out_dir}"]
        if self.photos_without_detection:
            lines.append("skipped (no detections/<stem>.txt; run ./process_images.sh on the folder first):")
            lines += [f"  {p}" for p in self.photos_without_detection]
        if self.failures:
            lines.append("failed:")
            lines += [f"  {what}: {why}" for what, why in self.failures]
        if self.faces_ok == 0 and not self.failures:
            lines.append("nothing was reconstructed: no photo in the folder has a detection file")
        return "\n".join(lines)


def write_face_outputs(out_dir: str, item: dict, opt, face_buf: np.ndarray) -> None:
    """Write one face's .png / .obj / .mat (whatever the switches ask for)."""
    from util.mesh_io import colors_to_uint8, write_obj

    d = os.path.join(out_dir, item["rel_dir"])
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, item["name"])
    if opt.save_png:
        from PIL import Image

        tmp = base + ".png.part"
        Image.fromarray(item["vis"]).save(tmp, format="PNG", compress_level=1)  # lossless; fast
        os.replace(tmp, base + ".png")
    if opt.save_mesh:
        world = item["vertex"].copy()
        world[:, 2] = opt.camera_d - world[:, 2]  # camera space -> world space
        write_obj(base + ".obj", world, face_buf, colors_to_uint8(item["color"]))
    if opt.save_mat:
        from scipy.io import savemat

        tmp = base + ".mat.part"
        savemat(tmp, item["mat"], format="5")
        os.replace(tmp, base + ".mat")


def batch_to_items(recon, batch: dict, opt) -> list[dict]:
    """Move one batch's results to numpy, one dict per face (only what the switches need)."""
    from util.visualize import compose_result

    meta = batch["meta"]
    size = int(2 * opt.center)
    coeffs = recon.coeffs.detach().float().cpu().numpy()
    lm = recon.face.landmark.detach().float().cpu().numpy()
    items = []
    vertex = color = vis = None
    if opt.save_mesh:
        vertex = recon.face.vertex.detach().float().cpu().numpy()
        color = recon.face.color.detach().float().cpu().numpy()
    if opt.save_png:
        image = batch["image"].permute(0, 2, 3, 1).numpy()
        render = recon.render.detach().float().permute(0, 2, 3, 1).cpu().numpy()
        mask = recon.mask.detach().float().permute(0, 2, 3, 1).cpu().numpy()
        vis = compose_result(image, render, mask, lm, batch["lm"].numpy())
    for i, m in enumerate(meta):
        item = dict(name=m["name"], rel_dir=m["rel_dir"])
        if opt.save_mat:
            parts = {k: coeffs[i:i + 1, s] for k, s in COEFFS.slices().items()}
            lm68 = np.stack([lm[i:i + 1, :, 0], size - 1 - lm[i:i + 1, :, 1]], axis=2)  # y down
            item["mat"] = {**parts, "lm68": lm68}
        if opt.save_mesh:
            item["vertex"], item["color"] = vertex[i], color[i]
        if opt.save_png:
            item["vis"] = vis[i]
        items.append(item)
    return items


# --------------------------------------------------------------------------- the run
def shard(entries: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``entries`` (round-robin, so every rank gets similar work)."""
    return entries[rank::world]


def run_folder(opt, device: torch.device, rank: int = 0, world: int = 1, progress: bool = True,
               model=None) -> RunSummary:
    """Reconstruct every detected face of ``opt.img_folder`` on ``device`` (this rank's share)."""
    from torch.utils.data import DataLoader

    from data.image_folder import AlignedFaces, collate_faces, scan_folder
    from util.preprocess import load_lm3d

    t0 = time.perf_counter()
    if not os.path.isdir(opt.img_folder):
        raise SetupError(f"--img_folder {opt.img_folder} is not a folder; give the folder of photos "
                         "that ./process_images.sh prepared")
    try:
        lm3d = load_lm3d(opt.bfm_folder)
    except MissingAssetError as e:
        raise SetupError(str(e)) from None
    entries, missing = scan_folder(opt.img_folder, opt.recursive)
    summary = RunSummary(out_dir=results_dir(opt))
    if rank == 0:
        summary.photos_without_detection = missing
    entries = shard(entries, rank, world)
    if model is None:
        model = build_model(opt, device)
    face_buf = model.face_model.face_buf.cpu().numpy()
    out_dir = summary.out_dir
    os.makedirs(out_dir, exist_ok=True)

    loader = DataLoader(AlignedFaces(entries, lm3d), batch_size=max(1, opt.batch_size), shuffle=False,
                        num_workers=opt.num_threads if len(entries) > opt.batch_size else 0,
                        collate_fn=collate_faces, pin_memory=device.type == "cuda")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="face", desc=f"reconstruct[{rank}]" if world > 1 else "reconstruct")
    pool = ThreadPoolExecutor(opt.write_workers) if opt.write_workers > 0 else None
    pending: list[tuple[str, Future]] = []

    def submit(item: dict) -> None:
        if pool is None:  # synchronous writes (--write_workers 0)
            fut: Future = Future()
            try:
                write_face_outputs(out_dir, item, opt, face_buf)
                fut.set_result(None)
            except Exception as e:
                fut.set_exception(e)
        else:
            fut = pool.submit(write_face_outputs, out_dir, item, opt, face_buf)
        pending.append((item["name"], fut))

    def drain(limit: int) -> None:
        while len(pending) > limit:
            name, fut = pending.pop(0)
            try:
                fut.result()
                summary.faces_ok += 1
            except Exception as e:  # disk full, permissions, ...
                summary.faces_failed += 1
                summary.failures.append((name, f"writing results failed: {e}"))

    try:
        for batch in loader:
            for it in batch["failed"]:
                summary.faces_failed += 1
                summary.failures.append((it["name"], it["error"]))
            if "image" in batch:
                images = batch["image"].to(device, non_blocking=True)
                with torch.inference_mode():
                    coeffs = model.predict_coeffs(images)
                if opt.fit_steps > 0:
                    from models.fitting import fit_coeffs

                    coeffs = fit_coeffs(model, coeffs, images, batch["lm"].to(device), steps=opt.fit_steps)
                with torch.inference_mode():
                    recon = model.reconstruct(coeffs)
                for item in batch_to_items(recon, batch, opt):
                    submit(item)
                drain(4 * max(1, opt.batch_size))
            if bar is not None:
                bar.update(len(batch["meta"]) + len(batch["failed"]))
        drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
