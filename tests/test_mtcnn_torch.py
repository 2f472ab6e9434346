"""detect.mtcnn_port: the PyTorch MTCNN against the `mtcnn` 1.0.0 package it reproduces.

Fast tests need only the package's weight files; tests marked ``slow`` import TensorFlow and run
the package itself (its Keras networks, TF's resize kernels, and detect_faces on the photos of
tests/data/faces).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from detect.mtcnn_port import detector as port
from detect.mtcnn_port import networks, nms, pyramid, weights

from conftest import FACES as FACES_DIR, ROOT as REPO  # FACES_DIR: the 28 test photos


def _weights_available() -> bool:
    try:
        folder = weights.package_weights_dir()
    except FileNotFoundError:
        return False
    return all(os.path.isfile(os.path.join(folder, f)) for f in weights.WEIGHT_FILES.values())


pytestmark = pytest.mark.skipif(not _weights_available(), reason="mtcnn package weights not installed")


def _face_paths() -> list[str]:
    return sorted(os.path.join(FACES_DIR, f) for f in os.listdir(FACES_DIR)
                  if f.lower().endswith((".jpg", ".jpeg", ".png")))


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.fixture(scope="module")
def detector() -> port.TorchMTCNN:
    return port.TorchMTCNN()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    paths = _face_paths()
    if not paths:
        pytest.skip(f"no photos in {FACES_DIR}")
    return {os.path.basename(p): _load(p) for p in paths}


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", ["pnet", "rnet", "onet"])
def test_weights_load_with_keras_shapes(name):
    arrays = weights.load_keras_arrays(name)
    net = weights.load_network(name)
    assert len(arrays) == net.keras_weight_count()
    params = dict(net.named_parameters())
    it = iter(arrays)
    for layer in net.keras_layers:
        module = getattr(net, layer)
        if isinstance(module, torch.nn.PReLU):
            alpha = next(it)
            assert params[f"{layer}.weight"].shape == (alpha.size,)
            np.testing.assert_array_equal(params[f"{layer}.weight"].numpy(), alpha.reshape(-1))
            continue
        kernel, bias = next(it), next(it)
        weight = params[f"{layer}.weight"]
        if isinstance(module, torch.nn.Conv2d):  # HWIO -> OIHW
            assert tuple(weight.shape) == (kernel.shape[3], kernel.shape[2], *kernel.shape[:2])
        else:
            assert tuple(weight.shape) == kernel.shape[::-1]
        np.testing.assert_array_equal(params[f"{layer}.bias"].numpy(), bias)
    assert not any(p.requires_grad for p in net.parameters())


def test_weight_errors_are_loud(tmp_path):
    with pytest.raises(FileNotFoundError, match="pnet.lz4"):
        weights.load_keras_arrays("pnet", str(tmp_path))
    arrays = weights.load_keras_arrays("rnet")
    with pytest.raises(ValueError, match="expected 16 Keras arrays"):
        networks.RNet().load_keras_weights(arrays[:-1])
    bad = list(arrays)
    bad[3] = np.zeros((3, 3, 28, 49), np.float32)
    with pytest.raises(ValueError, match="conv2"):
        networks.RNet().load_keras_weights(bad)


def test_import_and_detect_without_tensorflow():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from detect.mtcnn_port.detector import TorchMTCNN
        TorchMTCNN().detect(np.zeros((64, 80, 3), np.uint8))
        bad = [m for m in ("tensorflow", "keras", "mtcnn") if m in sys.modules]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --------------------------------------------------------------------------- building blocks


def _reference_nms(boxes, threshold, method):
    """Keep j unless any earlier box overlaps it by more than threshold (the package's rule)."""
    keep = []
    for j in range(len(boxes)):
        ov = nms.box_overlap(boxes[j:j + 1], boxes[:j], method)
        keep.append(not bool((ov > threshold).any()))
    return keep


@pytest.mark.parametrize("method", ["union", "min"])
def test_nms_is_the_packages_rule_per_group(method):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g, dtype=torch.float64) * 60
    wh = torch.rand(300, 2, generator=g, dtype=torch.float64) * 30 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    groups = torch.sort(torch.randint(0, 5, (300,), generator=g)).values
    keep = nms.earlier_overlap_nms(boxes, groups, 0.3, method, chunk=64)
    expected = []
    for gid in torch.unique(groups):
        expected += _reference_nms(boxes[groups == gid], 0.3, method)
    assert keep.tolist() == expected
    # Not greedy NMS: a suppressed box still suppresses later ones.
    chain = torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], dtype=torch.float64)
    assert nms.earlier_overlap_nms(chain, torch.zeros(3, dtype=torch.long), 0.4).tolist() == [True, False, False]


def test_area_resize_constant_and_mean():
    img = torch.rand(37, 53, 3)
    small = pyramid.area_resize(img, 11, 20)
    assert small.shape == (11, 20, 3) and small.dtype == torch.float32
    const = pyramid.area_resize(torch.full((37, 53, 3), 0.25), 11, 20)
    torch.testing.assert_close(const, torch.full_like(const, 0.25))
    # Integer factor: plain block means.
    img = torch.rand(40, 60, 3)
    torch.testing.assert_close(pyramid.area_resize(img, 10, 20), img.view(10, 4, 20, 3, 3).mean(dim=(1, 3)))
    # The dense weights (used on CUDA) equal the sparse ones (CPU).
    img = torch.rand(45, 61, 3)
    dense, sparse = pyramid.AreaMatrices("cpu", sparse=False), pyramid.AreaMatrices("cpu", sparse=True)
    torch.testing.assert_close(pyramid.area_resize(img, 17, 23, matrices=dense), pyramid.area_resize(img, 17, 23, matrices=sparse))
    # The cache stays within its byte budget and keeps what was used last.
    small = pyramid.AreaMatrices("cpu", sparse=False, max_bytes=2 * 40 * 100 * 4)
    for n_out in range(30, 41):
        small(100, n_out)
    assert list(small._cache) == [(100, 39), (100, 40)] and small._bytes <= small.max_bytes


def test_pnet_on_packed_canvas_equals_levels_alone():
    """Odd tile sizes: the masked conv1 cells make TF's 'same' pool hold at tile edges."""
    net = weights.load_network("pnet")
    g = torch.Generator().manual_seed(1)
    sizes = [(33, 47), (24, 31), (17, 17), (12, 13), (40, 12)]
    tiles = [pyramid._Tile(0, 1.0, h, w) for h, w in sizes]
    placed, shapes = pyramid._pack(tiles, max_pixels=10_000)
    assert len(shapes) == 1 and all(t.oy % 2 == 0 and t.ox % 2 == 0 for t in placed)
    canvas = torch.randn(*shapes[0], 3, generator=g)  # garbage between tiles on purpose
    levels = [torch.rand(h, w, 3, generator=g) * 2 - 1 for h, w in sizes]
    for t, level in zip(placed, levels):
        canvas[t.oy:t.oy + t.height, t.ox:t.ox + t.width] = level
    assert shapes[0][0] % 2 == 0 and shapes[0][1] % 2 == 0
    edges = np.concatenate([pyramid._pool_edge_cells(t) for t in placed], axis=1)
    with torch.inference_mode():
        reg, prob = net(canvas.permute(2, 0, 1)[None], torch.from_numpy(edges))
        for t, level in zip(placed, levels):
            r1, p1 = net(level.permute(2, 0, 1)[None])
            oh, ow = pyramid.pnet_output_size(t.height, t.width)
            assert p1.shape[1:] == (oh, ow)
            sl = (slice(t.oy // 2, t.oy // 2 + oh), slice(t.ox // 2, t.ox // 2 + ow))
            torch.testing.assert_close(prob[0][sl], p1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(reg[0][:, sl[0], sl[1]], r1[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- detector


def test_detect_output_layout_and_batch(detector, photos):
    names = [n for n in ("000033.jpg", "trump_hillary.jpg", "vd034.png") if n in photos] or list(photos)[:3]
    blanks = [np.zeros((30, 30, 3), np.uint8), np.zeros((8, 9, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)]
    images = [photos[n] for n in names] + blanks
    batch = detector.detect_batch(images)
    assert len(batch) == len(images)
    assert batch[-3:] == [[], [], []]
    if "trump_hillary.jpg" in names:
        assert len(batch[names.index("trump_hillary.jpg")]) == 2
    for image, faces in zip(images, batch):
        single = detector.detect(image)
        assert len(single) == len(faces)
        for a, b in zip(single, faces):
            assert set(a) == {"box", "confidence", "keypoints"}
            assert isinstance(a["box"], list) and len(a["box"]) == 4
            assert all(isinstance(v, float) for v in a["box"]) and isinstance(a["confidence"], float)
            assert a["keypoints"].shape == (5, 2) and a["keypoints"].dtype == np.float64
            np.testing.assert_allclose(a["keypoints"], b["keypoints"], atol=1e-3)
            np.testing.assert_allclose(a["box"], b["box"], atol=1e-3)
    confidences = [f["confidence"] for f in max(batch, key=len)]
    assert confidences == sorted(confidences, reverse=True)
    assert detector.detect_batch([]) == []


def test_cuda_settings_on_cpu(detector, photos):
    """What differs on CUDA apart from the kernels (one big canvas, dense resize weights)."""
    like_cuda = port.TorchMTCNN()
    like_cuda.canvas_pixels = port.CANVAS_PIXELS["cuda"]
    like_cuda.area_matrices = pyramid.AreaMatrices("cpu", sparse=False)
    images = list(photos.values())[:6]
    for a_faces, b_faces in zip(detector.detect_batch(images), like_cuda.detect_batch(images)):
        assert len(a_faces) == len(b_faces)
        for a, b in zip(a_faces, b_faces):
            np.testing.assert_allclose(a["keypoints"], b["keypoints"], atol=1e-3)


def test_detect_rejects_bad_input(detector):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detector.detect(np.zeros((20, 20), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        detector.detect(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="thresholds"):
        port.TorchMTCNN(thresholds=(0.6, 0.7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(detector, photos):
    gpu = port.TorchMTCNN(device="cuda")
    images = list(photos.values())
    for cpu_faces, gpu_faces in zip(detector.detect_batch(images), gpu.detect_batch(images)):
        assert len(cpu_faces) == len(gpu_faces)
        for a, b in zip(cpu_faces, gpu_faces):
            np.testing.assert_allclose(a["keypoints"], b["keypoints"], atol=0.05)
            np.testing.assert_allclose(a["box"], b["box"], atol=0.05)
            assert abs(a["confidence"] - b["confidence"]) < 1e-4


# --------------------------------------------------------------------------- against the package


@pytest.fixture(scope="module")
def package():
    pytest.importorskip("tensorflow")
    mtcnn = pytest.importorskip("mtcnn")
    return mtcnn.MTCNN()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pnet", "rnet", "onet"])
def test_networks_match_keras(package, name):
    import tensorflow as tf

    keras_net = package.stages[["pnet", "rnet", "onet"].index(name)].model
    net = weights.load_network(name)
    size = {"pnet": (41, 57), "rnet": (24, 24), "onet": (48, 48)}[name]
    x = np.random.default_rng(2).uniform(-1, 1, (5, *size, 3)).astype(np.float32)
    expected = [o.numpy() for o in keras_net(tf.constant(x))]
    with torch.inference_mode():
        got = net(torch.from_numpy(x).permute(0, 3, 1, 2))
    if name == "pnet":
        expected = [expected[0].transpose(0, 3, 1, 2), expected[1][..., 1]]
    else:
        expected[-1] = expected[-1][:, 1]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_area_resize_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    img = np.random.default_rng(3).uniform(-1, 1, (101, 77, 3)).astype(np.float32)
    for h, w in [(60, 46), (42, 32), (13, 10), (101, 77), (150, 90), (7, 5)]:
        expected = tf.image.resize(img[None], (h, w), method="area").numpy()[0]
        got = pyramid.area_resize(torch.from_numpy(img), h, w).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.slow
def test_crop_and_resize_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    shapes = [(50, 70), (64, 40)]
    images = [rng.uniform(-1, 1, (*s, 3)).astype(np.float32) for s in shapes]
    ids = rng.integers(0, 2, 40)
    xy = rng.uniform(-20, 60, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (40, 1))], 1)  # squares, partly outside
    order = np.argsort(ids, kind="stable")
    ids, boxes = ids[order], boxes[order]
    flat = torch.from_numpy(np.concatenate([im.reshape(-1, 3) for im in images]))
    offsets = torch.tensor([0, shapes[0][0] * shapes[0][1]])
    got = pyramid.crop_and_resize(flat, offsets, torch.tensor(shapes), torch.from_numpy(boxes),
                             torch.from_numpy(ids), 24).permute(0, 2, 3, 1).numpy()
    for b, (h, w) in enumerate(shapes):  # the package normalises by the image it crops from
        sel = ids == b
        norm = boxes[sel][:, [1, 0, 3, 2]] / np.array([h, w, h, w])
        expected = tf.image.crop_and_resize(images[b][None], norm, np.zeros(sel.sum(), np.int32), (24, 24))
        np.testing.assert_allclose(got[sel], expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_detections_match_package_on_photos(detector, package, photos):
    """Every face the package finds is found, in the same order, with the 5 points within 0.5 px."""
    kwargs = dict(output_type="numpy", min_face_size=detector.min_face_size,
                  scale_factor=detector.scale_factor, threshold_pnet=detector.thresholds[0],
                  threshold_rnet=detector.thresholds[1], threshold_onet=detector.thresholds[2])
    point_err, box_err = [], []
    for name, image in photos.items():
        expected = package.detect_faces(image, **kwargs)
        got = detector.detect(image)
        assert len(got) == len(expected), name
        for face, row in zip(got, expected):
            points = np.stack([row[6:11], row[11:16]], axis=1)
            point_err.append(np.abs(face["keypoints"] - points).max())
            box_err.append(np.abs(np.asarray(face["box"]) - row[1:5]).max())
            assert point_err[-1] < 0.5, (name, face["keypoints"], points)
            assert box_err[-1] < 0.5, (name, face["box"], row[1:5])
            assert abs(face["confidence"] - row[5]) < 1e-4, name
    print(f"\n{len(point_err)} faces: keypoints max {max(point_err):.2e} px, "
          f"mean {np.mean(point_err):.2e} px; boxes max {max(box_err):.2e} px")


@pytest.mark.slow
def test_other_settings_match_package(package, photos):
    """Upsampled first level (min_face_size < 12), another pyramid step and thresholds."""
    det = port.TorchMTCNN(min_face_size=9, scale_factor=0.8, thresholds=(0.5, 0.6, 0.8))
    for name, image in sorted(photos.items(), key=lambda kv: kv[1].shape[0] * kv[1].shape[1])[:4]:
        expected = package.detect_faces(image, output_type="numpy", min_face_size=9, scale_factor=0.8,
                                        threshold_pnet=0.5, threshold_rnet=0.6, threshold_onet=0.8)
        got = det.detect(image)
        assert len(got) == len(expected), name
        for face, row in zip(got, expected):
            np.testing.assert_allclose(face["keypoints"], np.stack([row[6:11], row[11:16]], 1), atol=0.01)
