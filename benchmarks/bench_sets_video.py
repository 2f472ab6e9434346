"""Throughput of image sets (test.py --group_by) and video (test.py --video) (not collected by pytest).

    python benchmarks/bench_sets_video.py --device cuda --photos 4096 --groups 64 --frames 2048 \\
        --json docs/results/sets_video_gpu.json
    python benchmarks/bench_sets_video.py --device cpu --photos 16 --groups 4 --frames 12   # CPU smoke run

Uses the stand-in model (``python -m tools.standin``) and the example photos with their
detections. Image sets: ``--photos`` copies in ``--groups`` person folders, reconstructed as
``test.py --group_by folder --save_png false --save_mesh false`` does (run_folder with the
:class:`pipeline.image_sets.SetCollector` hook, then the groups written), against the same run
without the hook: images/s of both and the seconds the aggregation and group files take.
Video: a clip of ``--frames`` frames (the example photos, letterboxed to ``--frame_size``,
H.264), reconstructed as ``test.py --video`` does, without and with ``--video_overlay``:
frames/s (decoding, MTCNN detection, alignment, network, files). One warm-up run of each
(a few photos / frames) comes first. ``--picture`` also saves a frame | overlay picture.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_inference import options, sync  # noqa: E402
from benchmarks.hardware import cpu_model  # noqa: E402

EXAMPLES = ("000002.jpg", "015259.jpg", "JianzhuGuo.jpg", "vd006.png")  # one face each


def person_folders(dst: str, n: int, groups: int) -> str:
    """``n`` example photos (hard links) spread over ``groups`` sub-folders, with their detections
    where a recursive scan looks for them (``detections/<person>/<stem>.txt``)."""
    from util.detections_io import detection_path, write_points

    lm = json.load(open(os.path.join(ROOT, "tests", "data", "faces_lm5.json")))
    for i in range(n):
        name = EXAMPLES[i % len(EXAMPLES)]
        rel = os.path.join(f"person{i % groups:04d}", f"{i:06d}_{name}")
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        try:
            os.link(os.path.join(ROOT, "examples", name), os.path.join(dst, rel))
        except OSError:
            shutil.copyfile(os.path.join(ROOT, "examples", name), os.path.join(dst, rel))
        write_points(detection_path(dst, rel), np.array(lm[name]))
    return dst


def letterboxed(name: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(os.path.join(ROOT, "examples", name)).convert("RGB")
    img.thumbnail(size)
    canvas = Image.new("RGB", size, (40, 40, 40))
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return np.asarray(canvas)


def make_clip(path: str, frames: int, size: tuple[int, int], fps: float = 25.0) -> None:
    from pipeline.video import VideoWriter

    pictures = [letterboxed(n, size) for n in EXAMPLES]
    clip = VideoWriter(path, fps, *size)
    for i in range(frames):
        clip.write(pictures[(i // 5) % len(pictures)])  # each photo held for 5 frames
    clip.close()


def time_sets(opt, device, model, hook) -> tuple[float, float]:
    """(seconds of run_folder, seconds of writing the groups) for one run."""
    from options.run_specs import run_spec
    from pipeline.run import run_folder

    sync(device)
    t = time.perf_counter()
    summary = run_folder(run_spec(opt), device, progress=False, model=model, on_batch=hook)
    sync(device)
    t_run = time.perf_counter() - t
    assert summary.faces_failed == 0, summary.failures
    t = time.perf_counter()
    if hook is not None:
        written = hook.write(summary.out_dir)
        assert written.groups, "no group written"
    return t_run, time.perf_counter() - t


def bench_sets(a, device, model, tmp) -> dict:
    from pipeline.image_sets import ImageSetSettings, SetCollector

    folder = person_folders(os.path.join(tmp, "people"), a.photos, a.groups)
    warm = person_folders(os.path.join(tmp, "warm"), min(a.photos, 8), 2)
    kw = dict(recursive=True, save_png=False, save_mesh=False, batch_size=a.batch_size)
    settings = ImageSetSettings(group_by="folder")
    time_sets(options(warm, os.path.join(tmp, "out_warm"), a.device, **kw), device, model,
              SetCollector(settings, warm))
    opt = options(folder, os.path.join(tmp, "out_sets"), a.device, **kw)
    t_sets, t_write = time_sets(opt, device, model, SetCollector(settings, folder))
    t_plain, _ = time_sets(options(folder, os.path.join(tmp, "out_plain"), a.device, **kw), device, model, None)
    return {"photos": a.photos, "groups": a.groups, "images_per_s": round(a.photos / (t_sets + t_write), 2),
            "images_per_s_without_sets": round(a.photos / t_plain, 2), "seconds_groups_written": round(t_write, 3),
            "seconds": round(t_sets + t_write, 2)}


def bench_video(a, device, model, tmp) -> dict:
    from pipeline.video import VideoSettings, make_detector, reconstruct_video
    from util.preprocess import load_lm3d

    size = tuple(int(v) for v in a.frame_size.split("x"))
    clip, warm = os.path.join(tmp, "clip.mp4"), os.path.join(tmp, "warm.mp4")
    make_clip(clip, a.frames, size)
    make_clip(warm, min(a.frames, 10), size)
    lm3d = load_lm3d(os.path.join(ROOT, "standin", "BFM"))
    res = {"frames": a.frames, "frame_size": a.frame_size}
    for overlay in (False, True):
        settings = VideoSettings(batch_size=a.batch_size, overlay=overlay, device=a.device)
        detector = make_detector(settings)
        reconstruct_video(warm, model, detector, lm3d, os.path.join(tmp, "video_warm"), settings)
        sync(device)
        t = time.perf_counter()
        _, frames, faces = reconstruct_video(clip, model, detector, lm3d, os.path.join(tmp, "video"), settings)
        sync(device)
        seconds = time.perf_counter() - t
        key = "with_overlay" if overlay else "coefficients"
        res[key] = {"frames_per_s": round(frames / seconds, 2), "seconds": round(seconds, 2), "faces": faces}
    if a.picture:
        save_picture(a.picture, os.path.join(tmp, "clip.mp4"), os.path.join(tmp, "video", "clip_overlay.mp4"))
    return res


def save_picture(path: str, clip: str, overlay: str, height: int = 200) -> None:
    """The first frame of ``clip`` beside the same frame of ``overlay``, ``height`` pixels high."""
    from PIL import Image

    from pipeline.video import decode_frames

    frames = [next(decode_frames(p))[2] for p in (clip, overlay)]
    w = frames[0].shape[1] * height // frames[0].shape[0]
    panels = [Image.fromarray(f).resize((w, height), Image.Resampling.LANCZOS) for f in frames]
    out = Image.new("RGB", (2 * w, height))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (w, 0))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out.save(path, optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--photos", type=int, default=256, help="photos of the image-set run")
    p.add_argument("--groups", type=int, default=16, help="people (sub-folders) they are spread over")
    p.add_argument("--frames", type=int, default=256, help="frames of the video")
    p.add_argument("--frame_size", default="640x480", help="WxH of the video's frames")
    p.add_argument("--batch_size", type=int, default=-1, help="-1: test.py's default for the device")
    p.add_argument("--picture", default="", help="also save a frame | overlay PNG here")
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args(argv)
    from options.run_specs import model_spec
    from pipeline.model import build_model
    from pipeline.workers import default_batch_size

    device = torch.device(a.device)
    if a.batch_size <= 0:
        a.batch_size = default_batch_size(device)
    tmp = tempfile.mkdtemp(prefix="bench_sets_video_")
    try:
        model = build_model(model_spec(options(tmp, tmp, a.device)), device)
        res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": a.batch_size,
               "image_sets": bench_sets(a, device, model, tmp), "video": bench_video(a, device, model, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
