"""Faster result writing (issue 5) writes the same results: the byte-level picture path against
the original's float composition, the PNG encoder against decoders, the .obj words against
the general formatter, and what a face costs to send to a writer."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_photo_folder
from util.preprocess import unit_float_table
from util.visualize import BLUE, RED, compose_picture, compose_result, draw_landmarks, overlay_uint8, unit_to_uint8


def original_compose(image, render, mask, lm_pred, lm_gt=None):
    """The picture as the original builds it: float panels, then tensor2im (/255, clip, *255, uint8)."""
    inp = np.float32(255.0) * image.astype(np.float32)
    overlay = np.float32(255.0) * (render * mask + (1 - mask) * image).astype(np.float32)
    panels = [inp, overlay]
    if lm_gt is not None:
        panels.append(draw_landmarks(draw_landmarks(overlay, lm_gt, BLUE), lm_pred, RED))
    vis = np.concatenate(panels, axis=2) / np.float32(255.0)
    return (np.clip(vis, 0, 1) * np.float32(255.0)).astype(np.uint8)


def original_to_uint8(x):
    x = np.asarray(x, np.float32)
    return (np.clip((np.float32(255.0) * x) / np.float32(255.0), 0, 1) * np.float32(255.0)).astype(np.uint8)


def hard_floats(rng, n=20000) -> np.ndarray:
    """Every level float32(k/255) and its float32 neighbours, specials, and random values."""
    near = [unit_float_table()]
    down = up = near[0]
    for _ in range(3):
        down, up = np.nextafter(down, np.float32(-1)), np.nextafter(up, np.float32(2))
        near += [down, up]
    special = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 1e30, -1e30, np.inf, -np.inf, 1e-45, -1e-45], np.float32)
    rand = np.concatenate([rng.uniform(-0.1, 1.1, n), rng.uniform(0, 1, n) ** 8]).astype(np.float32)
    return np.concatenate(near + [special, rand]).astype(np.float32)


def test_unit_to_uint8_is_the_original_round_trip():
    """Checked once over every float32 in [-2, 2] (2^31 values, numpy and torch, ~90 s); here
    the levels, their neighbours, specials and random values."""
    from pipeline.render import overlay_uint8 as on_device

    x = hard_floats(np.random.default_rng(0))
    np.testing.assert_array_equal(unit_to_uint8(x), original_to_uint8(x))
    np.testing.assert_array_equal(unit_to_uint8(unit_float_table()), np.arange(256))  # crops come back as themselves
    assert unit_to_uint8(np.float32(np.nan)) == 0
    x = np.concatenate([x, [np.nan]]).astype(np.float32)
    lit = on_device(torch.zeros((1, 3, 1, len(x)), dtype=torch.uint8), torch.from_numpy(x).expand(1, 3, 1, -1),
                    torch.ones((1, 1, 1, len(x))))
    np.testing.assert_array_equal(lit[0, 0, :, 0].numpy(), unit_to_uint8(x))


def test_compose_result_is_the_original(one_thread):
    rng = np.random.default_rng(1)
    b, h, w = 3, 40, 32
    image = unit_float_table()[rng.integers(0, 256, (b, h, w, 3))]
    floats = hard_floats(rng, 2000)
    floats = floats[np.isfinite(floats)]  # renders are finite (inf * 0 is NaN in the original's blend)
    render = floats[rng.integers(0, len(floats), (b, h, w, 3))]
    mask = (rng.uniform(size=(b, h, w, 1)) > 0.4).astype(np.float32)
    lm, gt = rng.uniform(-3, 42, (b, 68, 2)), rng.uniform(0, 31, (b, 5, 2))
    np.testing.assert_array_equal(compose_result(image, render, mask, lm, gt), original_compose(image, render, mask, lm, gt))
    np.testing.assert_array_equal(compose_result(image, render, mask, lm), original_compose(image, render, mask, lm))
    soft = rng.uniform(size=(b, h, w, 1)).astype(np.float32)  # any mask, as train.py could pass
    np.testing.assert_array_equal(compose_result(image, render, soft, lm, gt), original_compose(image, render, soft, lm, gt))
    # the byte path the writers take, from interleaved and from planar (B, 3, H, W) crops
    u8 = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    ref = original_compose(unit_float_table()[u8], render, mask, lm, gt)
    planar = np.ascontiguousarray(u8.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    for crops in (u8, planar):
        np.testing.assert_array_equal(compose_picture(crops, overlay_uint8(u8, render, mask), lm, gt), ref)


def test_device_overlay_is_the_numpy_overlay(device):
    from pipeline.render import overlay_uint8 as on_device

    rng = np.random.default_rng(2)
    b, h, w = 2, 64, 48
    u8 = rng.integers(0, 256, (b, 3, h, w), dtype=np.uint8)
    floats = hard_floats(rng, 4000)
    floats = floats[np.isfinite(floats)]
    render = floats[rng.integers(0, len(floats), (b, h, w, 3))]
    mask = (rng.uniform(size=(b, 1, h, w)) > 0.5).astype(np.float32)
    for channels_last in (True, False):  # the renderer's layout, and a plain one
        r = torch.from_numpy(render).to(device)
        r = r.permute(0, 3, 1, 2) if channels_last else r.permute(0, 3, 1, 2).contiguous()
        got = on_device(torch.from_numpy(u8).to(device), r, torch.from_numpy(mask).to(device)).cpu().numpy()
        ref = overlay_uint8(u8.transpose(0, 2, 3, 1), render, mask.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(got, original_compose(unit_float_table()[u8.transpose(0, 2, 3, 1)], render,
                                                            mask.transpose(0, 2, 3, 1), None)[:, :, w:])


# ----------------------------------------------------------------------------- PNG
@pytest.mark.parametrize("shape", [(224, 672, 3), (1, 1, 3), (1, 7, 3), (9, 1, 3), (33, 20, 3)])
def test_png_is_lossless(shape, tmp_path):
    import cv2

    from util.png import png_chunks

    rng = np.random.default_rng(sum(shape))
    for pic in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8),
                np.cumsum(rng.integers(0, 3, shape), axis=0).astype(np.uint8)):
        data = b"".join(png_chunks(pic))
        im = Image.open(io.BytesIO(data))
        im.verify()  # chunk CRCs and structure
        im = Image.open(io.BytesIO(data))
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), pic)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1], pic)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(b"".join(png_chunks(pic, 0))))), pic)  # stored
    with pytest.raises(ValueError, match="uint8"):
        png_chunks(np.zeros((4, 4, 3), np.float32))


# ----------------------------------------------------------------------------- .obj
def general_lines(v, c) -> bytes:
    """Vertex lines from the general per-column formatter (format_fixed), row by row."""
    from util.mesh_io import format_fixed

    arrays = [v[:, 0], v[:, 1], v[:, 2]] + ([] if c is None else [c[:, k] / 255.0 for k in range(3)])
    blocks = [format_fixed(a) for a in arrays]
    return b"".join(b"v" + b"".join(b" " + bytes(b[i]) for b in blocks) + b"\n" for i in range(len(v)))


@pytest.mark.parametrize("scale", [3.0, 30.0, 0.3, 700.0])
def test_obj_words_match_the_general_formatter(scale):
    """Integer parts of 1, 2 and 3 digits (each its own head-word table), signs, colour 255."""
    from util.mesh_io import vertex_lines

    rng = np.random.default_rng(int(scale * 10))
    v = rng.normal(size=(400, 3)) * scale * np.array([1, 0.05, 3])
    v[:4] = [[-0.0, 5e-9, -5e-9], [-1e-8, 1e-8, 0.0], [scale, -scale, 0.999999995], [-0.999999996, 9.999999996, 0]]
    c = rng.integers(0, 256, (400, 3), dtype=np.uint8)
    c[:3] = [[255, 255, 255], [0, 255, 0], [254, 1, 128]]
    for colors in (c, None):
        assert vertex_lines(v, colors) == general_lines(v, colors)
        assert vertex_lines(v.astype(np.float32), colors) == general_lines(v.astype(np.float32).astype(np.float64), colors)


# ----------------------------------------------------------------------------- writers
def test_writer_processes_keep_freed_memory():
    import platform

    from util.subprocesses import keep_freed_memory

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True


def test_batch_results_picture_and_payload(standin, tmp_path):
    """The stand-in model on real photos: the written .png holds exactly the original's picture
    (float composition from the render), and a face travels to a writer as ~0.8 MB."""
    from data.image_folder import AlignedFaces, collate_faces, images_to_float, scan_folder
    from pipeline.model import build_model
    from pipeline.outputs import output_config
    from pipeline.render import batch_results
    from options.run_specs import run_spec
    from options.test_options import parse_test_options
    from util.preprocess import load_lm3d
    from util.results_io import write_face_result

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    opt = parse_test_options([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}", "--device=cpu",
                              f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
                              f"--results_dir={tmp_path / 'out'}"])
    spec = run_spec(opt)
    model = build_model(spec.model, torch.device("cpu"))
    entries, _ = scan_folder(folder)
    ds = AlignedFaces(entries, load_lm3d(opt.bfm_folder))
    batch = collate_faces([ds[i] for i in range(len(ds))])
    with torch.inference_mode():
        coeffs = model.predict_coeffs(images_to_float(batch.image))
        results = batch_results(model, coeffs, batch, spec.outputs)
        face = model.face_model(coeffs)  # the original's picture, from floats
        out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
    hwc = lambda t: t.permute(0, 2, 3, 1).float().numpy()  # noqa: E731
    ref = original_compose(unit_float_table()[batch.image.numpy().transpose(0, 2, 3, 1)], hwc(out.image),
                           hwc(out.mask), face.landmark.numpy(), batch.lm.numpy())
    cfg = output_config(spec.outputs, spec.model, model.face_model.face_buf.numpy(), str(tmp_path / "out"))
    for i, r in enumerate(results):
        assert r.overlay.dtype == np.uint8 and r.overlay.shape == (224, 224, 3)
        assert (r.overlay != r.image.transpose(1, 2, 0)).any(axis=2).mean() > 0.2  # the face is drawn
        write_face_result(cfg, r)
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(cfg.out_dir, r.name + ".png"))), ref[i])
        size = len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))
        assert size < 850_000, size  # vertices 429 kB, colours 107 kB, crop and overlay 151 kB each


def test_exit_now_does_not_wait_for_child_processes(tmp_path):
    """util.subprocesses.exit_now: the exit status, the streams flushed, a child process that is
    still running not waited for, and no warning from multiprocessing's resource tracker (the
    finalizers of its semaphores ran)."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import multiprocessing as mp, sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from util.subprocesses import exit_now\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    q = ctx.Queue()\n"
        "    p = ctx.Process(target=time.sleep, args=(20,))\n"
        "    p.start()\n"
        "    print(p.pid, end='')\n"
        "    sys.stderr.write('last words')\n"
        "    exit_now(3)\n")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"  # files: the child holds pipes open
    t0 = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        code = subprocess.run([sys.executable, str(script)], stdout=fo, stderr=fe, timeout=60).returncode
    assert time.perf_counter() - t0 < 15  # the child sleeps 20 s
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(out.read_text()), signal.SIGKILL)
    time.sleep(1.5)  # the resource tracker warns once every process that shares it is gone
    assert code == 3 and err.read_text().startswith("last words") and "leaked" not in err.read_text()
