"""util.pil_resample: PIL's bicubic resize + crop as integer arithmetic in torch gives Pillow's
own pixels (synthetic cases of both pass orders, the test photos' alignment crops), on the CPU
and on CUDA; test.py --resample_on_device writes the same files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FACES, golden_lm5
from util.image_io import load_image
from util.pil_resample import (PlanBatch, apply_plan, apply_plans, axis_coeffs, identity_plan, plan_resize_crop,
                                resize_crop_array)
from util.landmarks import flip_y
from util.preprocess import align_img, crop_box, load_lm3d, pil_vertical_first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BICUBIC = Image.Resampling.BICUBIC


def resample(photo: np.ndarray, size, box, device="cpu") -> np.ndarray:
    """(H0, W0, 3) uint8 -> the (h, w, 3) crop through a plan, as the data pipeline does."""
    h0, w0 = photo.shape[:2]
    order = pil_vertical_first(w0, h0, *size)
    if order is None:
        pytest.skip("the installed Pillow's pass order is not known")
    plan = plan_resize_crop((w0, h0), size, box, order)
    region = torch.from_numpy(photo[plan.rows[0]:plan.rows[1], plan.cols[0]:plan.cols[1]].copy())
    return apply_plan(region.to(device), plan).permute(1, 2, 0).cpu().numpy()


def random_case(rng):
    """A random photo, resize size and crop box (some boxes partly or wholly outside)."""
    w0, h0 = int(rng.integers(4, 240)), int(rng.integers(4, 240))
    photo = rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    w = w0 if rng.random() < 0.1 else max(1, int(w0 * rng.uniform(0.08, 3.0)))
    h = h0 if rng.random() < 0.1 else max(1, int(h0 * rng.uniform(0.08, 3.0)))
    left, up = int(rng.integers(-50, w + 10)), int(rng.integers(-50, h + 10))
    return photo, (w, h), (left, up, left + 40, up + 32)


def test_identity_axis_has_unit_weights():
    """Same length in and out: PIL's bicubic weights are 1 at the pixel itself, 0 at +-1, +-2."""
    start, length, coeffs = axis_coeffs(10, 10, 0, 10)
    picked = coeffs[np.arange(10), np.arange(10) - start]
    assert (picked == 1 << 22).all() and (coeffs.sum(1) == 1 << 22).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_synthetic_cases_equal_pillow(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(400):
        photo, size, box = random_case(rng)
        box = (box[0], box[1], box[0] + int(rng.integers(1, 90)), box[1] + int(rng.integers(1, 90)))
        orders.add(pil_vertical_first(photo.shape[1], photo.shape[0], *size))
        ref = np.asarray(Image.fromarray(photo).resize(size, BICUBIC).crop(box))
        np.testing.assert_array_equal(resample(photo, size, box, device), ref, err_msg=str((photo.shape, size, box)))
    if pil_vertical_first(100, 400, 50, 200):  # Pillow 13: both pass orders were exercised
        assert orders == {True, False}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batches_of_mixed_photos_and_orders(device):
    """One PlanBatch of photos of different sizes, window lengths and pass orders (padded):
    every crop is Pillow's; a small ``max_bytes`` forces several chunks."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    rng = np.random.default_rng(3)
    for _ in range(10):
        cases = [random_case(rng) for _ in range(7)]
        if any(pil_vertical_first(p.shape[1], p.shape[0], *size) is None for p, size, _ in cases):
            pytest.skip("the installed Pillow's pass order is not known")
        plans = [plan_resize_crop((p.shape[1], p.shape[0]), size, box, pil_vertical_first(p.shape[1], p.shape[0], *size))
                 for p, size, box in cases]
        regions = [p[pl.rows[0]:pl.rows[1], pl.cols[0]:pl.cols[1]] for (p, _, _), pl in zip(cases, plans)]
        crops = apply_plans(PlanBatch.collate(regions, plans).to(device), max_bytes=200_000).cpu().numpy()
        for (photo, size, box), crop in zip(cases, crops):
            ref = np.asarray(Image.fromarray(photo).resize(size, BICUBIC).crop(box))
            np.testing.assert_array_equal(crop.transpose(1, 2, 0), ref, err_msg=str((photo.shape, size, box)))


def test_identity_plan_returns_the_region():
    region = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = apply_plan(torch.from_numpy(region), identity_plan(7, 5))
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), region)


def test_large_photo_strong_reduction():
    """A 3000x2200 photo reduced 12x (a small face in a big photo): 49-tap windows."""
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (2200, 3000, 3), dtype=np.uint8)
    size, box = (250, 183), (10, -20, 234, 204)
    ref = np.asarray(Image.fromarray(photo).resize(size, BICUBIC).crop(box))
    np.testing.assert_array_equal(resample(photo, size, box), ref)
    plan = plan_resize_crop((3000, 2200), size, box, pil_vertical_first(3000, 2200, *size))
    np.testing.assert_array_equal(resize_crop_array(Image.fromarray(photo), plan), ref)  # the CPU workers' way


@pytest.mark.parametrize("name", sorted(golden_lm5()))
def test_alignment_crops_of_the_test_photos(name):
    img = load_image(os.path.join(FACES, name))
    lm3d = load_lm3d(os.path.join(ROOT, "BFM"))
    tr, crop, _ = align_img(img, flip_y(np.array(golden_lm5()[name], np.float32), img.size[1]), lm3d)
    np.testing.assert_array_equal(resample(np.asarray(img), (tr.w, tr.h), crop_box(tr)), np.asarray(crop))


def test_run_with_crops_made_on_the_device_equals_the_default(standin, tmp_path):
    """test.py --resample_on_device (here on the CPU, with DataLoader workers) writes the same files."""
    from conftest import make_photo_folder
    from test_throughput import read_all

    import test as test_cli

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png", "trump_hillary.jpg"])
    base = [f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}", "--device=cpu",
            f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
            "--batch_size=2", "--write_workers=0"]
    assert test_cli.main(base + [f"--results_dir={tmp_path / 'a'}", "--num_threads=0"]) == 0
    assert test_cli.main(base + [f"--results_dir={tmp_path / 'b'}", "--num_threads=2", "--resample_on_device=true"]) == 0
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert len(a) == 9 and a == b  # .obj, .png, .mat of 3 faces


def test_plan_batch_select_keeps_the_masked_plans():
    """PlanBatch.select: the kept plans' fields, regions included, in order."""
    photo = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3)
    plans = [plan_resize_crop((30, 40), (15 + k, 20 + k), (0, 0, 8, 8), False) for k in range(3)]
    regions = [photo[p.rows[0]:p.rows[1], p.cols[0]:p.cols[1]].copy() for p in plans]
    full = PlanBatch.collate(regions, plans)
    kept = full.select(torch.tensor([True, False, True]))
    both = PlanBatch.collate([regions[0], regions[2]], [plans[0], plans[2]])
    assert torch.equal(apply_plans(kept), apply_plans(both))
    assert torch.equal(apply_plans(kept), apply_plans(full)[[0, 2]])
