"""process_images: never touches the photos, writes one detection per photo (or all faces),
reports every skip with a reason, resumes, survives Ctrl-C; real photos with mtcnn and dlib.

Fast tests use a fake detector (tests/helpers_images.py) that finds green squares; the slow ones
run the real detectors on copies of tests/data/faces, loading TensorFlow once per module.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from detect import analyze, base, dlib68, mtcnn_tf, registry
import process_images
from helpers_images import (FAKE_LM, ROOT, copy_faces, fake_main_subprocess_code, make_odd_files,
                            register_fake, snapshot, squares_image)
from util.atomic_files import temp_owner
from util.detections_io import detection_path, face_detection_files, read_points
from util.image_io import list_images, load_image_array
from detect.analyze import face_priority, order_faces
from detect.report import REPORT_NAME
from util import landmarks

GROUP = {"trump_hillary.jpg": 2, "emma.jpg": 3}


def run(folder, *args) -> int:
    return process_images.main([str(folder), "--no-progress", *args])


def report(folder) -> dict:
    with open(os.path.join(folder, REPORT_NAME), encoding="utf-8") as f:
        return json.load(f)


def rows(folder) -> dict:
    return {r["path"]: r for r in report(folder)["images"]}


def temp_files(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if temp_owner(f) is not None]


def finished_files(folder) -> int:
    """Files in ``folder`` that are done: temporary files of a write in flight are not counted."""
    return len([f for f in os.listdir(folder) if temp_owner(f) is None]) if os.path.isdir(folder) else 0


def iod_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean point distance normalised by the inter-ocular distance of ``b``."""
    return float(np.linalg.norm(a - b, axis=1).mean() / np.linalg.norm(b[1] - b[0]))


# ------------------------------------------------------------------------------------------ units

def test_importing_loads_no_detector_package():
    code = ("import sys, mtcnn_detector, process_images, detect.folder; process_images.build_parser();"
            "bad = [m for m in ('tensorflow', 'mtcnn', 'dlib', 'face_recognition_models', 'cv2') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mtcnn_numpy_row_layout():
    # [image_id, x, y, w, h, confidence, x1..x5, y1..y5]
    row = np.array([0, 10, 20, 30, 40, 0.99, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15], dtype=np.float64)
    d = mtcnn_tf._detection_from_mtcnn_row(row)
    np.testing.assert_array_equal(d.box, [10, 20, 30, 40])
    np.testing.assert_array_equal(d.lm5, [[1, 11], [2, 12], [3, 13], [4, 14], [5, 15]])
    assert d.score == pytest.approx(0.99) and d.area == 1200 and d.interocular == pytest.approx(np.sqrt(2))


def test_lm5_from_lm68_uses_the_original_indices():
    lm68 = np.stack([np.arange(68.0), 100 + np.arange(68.0)], 1)
    lm5 = landmarks.lm68_to_5(lm68)
    np.testing.assert_allclose(lm5[:, 0], [(36 + 39) / 2, (42 + 45) / 2, 30, 48, 54])
    with pytest.raises(ValueError):
        landmarks.lm68_to_5(np.zeros((5, 2)))


def test_downscale_maps_back_to_original_pixels():
    img = np.zeros((3000, 5000, 3), np.uint8)
    small, sx, sy = base.downscale(img, 1000)
    assert max(small.shape[:2]) == 1000 and sx == pytest.approx(0.2) and sy == pytest.approx(0.2)
    # a pixel centre maps to the same place: original pixel x covers small [x*s, (x+1)*s)
    p = np.array([[2499.5, 1499.5], [0.0, 0.0]])
    small_p = (p + 0.5) * [sx, sy] - 0.5
    np.testing.assert_allclose(base.to_original(small_p, sx, sy), p, atol=1e-9)
    assert base.downscale(img, None)[0] is img and base.downscale(img[:100, :100], 1000)[1] == 1.0


def test_detector_checks_its_input_and_name():
    from helpers_images import fake_detector_class

    det = fake_detector_class()()
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), "img.jpg"):
        with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
            det.detect(bad)
    with pytest.raises(ValueError, match="unknown detector"):
        registry.create_detector("nope")
    with pytest.raises(ValueError, match="max_side"):
        registry.create_detector("torch", max_side=10)


def test_face_priority_largest_unless_much_less_central():
    w, h = 1000, 600
    centre = np.array([450, 250, 100, 100.0])
    corner_same = np.array([0, 0, 100, 100.0])
    corner_bigger = np.array([0, 0, 160, 160.0])  # 2.56x the area, far from the centre
    assert face_priority(centre, w, h) > face_priority(corner_same, w, h)
    assert face_priority(corner_bigger, w, h) > face_priority(centre, w, h)
    assert face_priority(np.array([0, 0, 130, 130.0]), w, h) < face_priority(centre, w, h)

    class F:
        def __init__(self, box):
            self.box = box

    faces = [F(corner_same), F(centre), F(corner_bigger)]
    assert [f.box[2] for f in order_faces(faces, w, h)] == [160, 100, 100]


def test_predictor_found_without_import_and_missing_is_clear(tmp_path):
    p = dlib68.default_predictor_path()
    if p is None:
        pytest.skip("face_recognition_models not installed")
    assert p.endswith(dlib68.PREDICTOR_FILE) and "face_recognition_models" not in sys.modules
    with pytest.raises(FileNotFoundError) as e:
        dlib68.resolve_predictor_path(str(tmp_path / "nope.dat"))
    assert "dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2" in str(e.value)
    assert "face_recognition_models" in str(e.value)


def test_cli_missing_predictor_is_a_usage_error(tmp_path, capsys):
    squares_image(squares=[(20, 20, 50, 1.0)]).save(tmp_path / "a.png")
    rc = run(tmp_path, "--landmarks68", "--dlib_predictor", str(tmp_path / "missing.dat"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.dat" in err and "dlib.net" in err
    assert not os.path.exists(tmp_path / "detections")


def test_torch_backend_adapts_the_port_interface(monkeypatch):
    import types

    class TorchMTCNN:
        def __init__(self, device="cpu"):
            self.device = device

        def detect_batch(self, images):
            return [[{"box": [10.0, 20.0, 30.0, 40.0], "confidence": 0.97,
                      "keypoints": np.arange(10, dtype=np.float64).reshape(5, 2)}] for _ in images]

    monkeypatch.setitem(sys.modules, "detect.mtcnn_port.detector", types.SimpleNamespace(TorchMTCNN=TorchMTCNN))
    det = registry.create_detector("torch", max_side=100)
    (face,) = det.detect(np.zeros((50, 80, 3), np.uint8))
    np.testing.assert_array_equal(face.lm5, np.arange(10).reshape(5, 2))
    assert face.score == pytest.approx(0.97) and face.box.shape == (4,)
    # a 200 x 160 image is detected at 100 x 80: coordinates come back doubled (pixel centres)
    (face,) = det.detect(np.zeros((160, 200, 3), np.uint8))
    np.testing.assert_allclose(face.lm5, (np.arange(10).reshape(5, 2) + 0.5) * 2 - 0.5)
    np.testing.assert_allclose(face.box, [20, 40, 60, 80])


# ------------------------------------------------------------------------ folder runs, fake detector

@pytest.fixture
def fake(monkeypatch):
    register_fake(monkeypatch)
    return "fake"


def make_fake_folder(d) -> dict:
    """Photos for the fake detector; returns expected (status, reason, faces) by name."""
    os.makedirs(d, exist_ok=True)
    squares_image(squares=[(40, 30, 60, 1.0)]).save(os.path.join(d, "one.png"))
    # a big face in the corner (chosen: 1.96x the area) and a central smaller one
    squares_image((400, 300), squares=[(0, 0, 98, 0.9), (170, 120, 70, 1.0)]).save(os.path.join(d, "two faces.png"))
    squares_image(squares=[(40, 30, 60, 0.3)]).save(os.path.join(d, "weak.png"))
    squares_image().save(os.path.join(d, "none.png"))
    squares_image((15, 40)).save(os.path.join(d, "tiny.png"))
    with open(os.path.join(d, "bad.jpg"), "w") as f:
        f.write("hello")
    return {"one.png": ("ok", "", 1), "two faces.png": ("ok", "", 2), "weak.png": ("skipped", "low_confidence", 0),
            "none.png": ("skipped", "no_face", 0), "tiny.png": ("skipped", "too_small", 0),
            "bad.jpg": ("skipped", "not_an_image", 0)}


def test_fake_run_outputs_report_and_choice(tmp_path, fake, capsys):
    d = str(tmp_path / "photos")
    expected = make_fake_folder(d)
    before = snapshot(d)
    assert run(d, "--detector", fake) == 0
    assert snapshot(d) == before
    r = rows(d)
    assert sorted(r) == sorted(expected)
    for name, (status, reason, faces) in expected.items():
        assert (r[name]["status"], r[name]["reason"], r[name]["faces"]) == (status, reason, faces), name
        assert r[name]["detail"] or status == "ok"
        files = face_detection_files(d, name)
        assert len(files) == (1 if status == "ok" else 0), name
    assert r["weak.png"]["confidence"] == pytest.approx(0.3, abs=0.01) and r["weak.png"]["weak_faces"] == 1
    # the chosen face of "two faces" is the big corner one; its points are in image pixels
    lm = read_points(detection_path(d, "two faces.png"))
    np.testing.assert_allclose(lm, -0.5 + FAKE_LM * 98, atol=1e-3)
    assert r["two faces.png"]["box"] == [-0.5, -0.5, 98, 98]
    assert r["two faces.png"]["confidence"] == pytest.approx(0.9, abs=0.01)
    rep = report(d)
    assert rep["summary"]["images"] == 6 and rep["summary"]["ok"] == 2 and rep["summary"]["faces_written"] == 2
    assert rep["summary"]["skipped"] == {"low_confidence": 1, "no_face": 1, "not_an_image": 1, "too_small": 1}
    out = capsys.readouterr().out
    assert "6 photos, 2 with a face" in out and "no_face 1" in out and REPORT_NAME in out
    # --strict turns skips into a failure; the outputs are the same
    assert run(d, "--detector", fake, "--strict") == 1
    assert not temp_files(d) and snapshot(d) == before


def test_all_faces_naming_then_back_to_one(tmp_path, fake):
    d = str(tmp_path)
    make_fake_folder(d)
    assert run(d, "--detector", fake, "--all-faces") == 0
    files = face_detection_files(d, "two faces.png")
    assert [n for n, _ in files] == ["two faces", "two faces__face02"]
    assert read_points(files[1][1])[0, 0] == pytest.approx(170 - 0.5 + 0.3 * 70, abs=1e-3)
    assert rows(d)["two faces.png"]["outputs"] == ["detections/two faces.txt", "detections/two faces__face02.txt"]
    # default again: settings differ, so recomputed, and the extra face is removed
    assert run(d, "--detector", fake) == 0
    assert [n for n, _ in face_detection_files(d, "two faces.png")] == ["two faces"]


def test_rerun_reuses_up_to_date_and_recomputes_changed(tmp_path, fake, monkeypatch):
    d = str(tmp_path)
    make_fake_folder(d)
    assert run(d, "--detector", fake) == 0
    det = detection_path(d, "one.png")
    mtime = os.stat(det).st_mtime_ns
    calls = []

    orig = analyze.Analyzer.analyse
    monkeypatch.setattr(analyze.Analyzer, "analyse", lambda self, rel: calls.append(rel) or orig(self, rel))
    assert run(d, "--detector", fake) == 0
    assert calls == [] and os.stat(det).st_mtime_ns == mtime
    assert all(r["reused"] for r in rows(d).values()) and report(d)["summary"]["reused"] == 6
    # the photo changes and now has no face: recomputed, its old detection file removed
    time.sleep(0.01)
    squares_image().save(os.path.join(d, "one.png"))
    assert run(d, "--detector", fake) == 0
    assert calls == ["one.png"] and not os.path.exists(det)
    assert rows(d)["one.png"]["reason"] == "no_face"
    calls.clear()
    assert run(d, "--detector", fake, "--force") == 0
    assert sorted(calls) == sorted(list_images(d))
    # a deleted output is recomputed
    calls.clear()
    os.remove(detection_path(d, "two faces.png"))
    assert run(d, "--detector", fake) == 0
    assert calls == ["two faces.png"] and os.path.isfile(detection_path(d, "two faces.png"))


def test_name_clashes_recursive_and_debug_vis(tmp_path, fake):
    d = str(tmp_path / "photos")
    os.makedirs(os.path.join(d, "sub", "deeper"))
    sq = squares_image(squares=[(40, 30, 60, 1.0)])
    for rel in ("a.png", "a.jpg", "b.png", "b__face02.png", "sub/a.png", "sub/deeper/c.png"):
        sq.save(os.path.join(d, rel))
    before = snapshot(d)
    assert run(d, "--detector", fake) == 0
    r = rows(d)
    assert sorted(r) == ["a.jpg", "a.png", "b.png", "b__face02.png"]  # not recursive
    assert (r["a.jpg"]["status"], r["a.png"]["reason"]) == ("ok", "duplicate_stem")
    assert "a.jpg" in r["a.png"]["detail"]
    assert r["b__face02.png"]["reason"] == "name_clash"
    assert [n for n, _ in face_detection_files(d, "b.png")] == ["b"]
    assert run(d, "--detector", fake, "--recursive", "--debug-vis") == 0
    r = rows(d)
    assert r["sub/deeper/c.png"]["outputs"] == ["detections/sub/deeper/c.txt"]
    assert os.path.isfile(os.path.join(d, "detections", "sub", "a.txt"))
    assert os.path.isfile(os.path.join(d, "debug_vis", "sub", "deeper", "c.jpg"))
    assert r["sub/deeper/c.png"]["debug_vis"] == "debug_vis/sub/deeper/c.jpg"
    # our output folders never show up as photos, for us or for test.py
    assert all(not p.startswith(("debug_vis", "detections")) for p in list_images(d, recursive=True))
    assert run(d, "--detector", fake, "--recursive", "--debug-vis") == 0
    assert all(row["reused"] for p, row in rows(d).items() if row["reason"] not in ("duplicate_stem", "name_clash"))
    assert snapshot(d) == before and not temp_files(d)


def test_exit_codes(tmp_path, fake, capsys):
    assert run(tmp_path / "missing", "--detector", fake) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert run(empty, "--detector", fake) == 1
    assert "no photos found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("x")
    (bad / "b.png").write_bytes(b"")
    assert run(bad, "--detector", fake) == 1
    assert "no photo could be read" in capsys.readouterr().err
    assert rows(bad)["b.png"]["reason"] == "empty_file"
    assert run(bad, "--detector", fake, "--workers", "0") == 2
    with pytest.raises(SystemExit) as e:
        process_images.main([str(bad), "--detector", "nope"])
    assert e.value.code == 2
    # a report file someone else wrote is never overwritten
    other = tmp_path / "other"
    other.mkdir()
    squares_image(squares=[(40, 30, 60, 1.0)]).save(other / "a.png")
    (other / REPORT_NAME).write_text('{"mine": true}')
    assert run(other, "--detector", fake) == 2
    assert "not written by process_images" in capsys.readouterr().err
    assert (other / REPORT_NAME).read_text() == '{"mine": true}'
    assert run(other, "--detector", fake, "--report", str(tmp_path / "r.json")) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["ok"] == 1


def test_detector_error_on_one_photo_does_not_stop_the_run(tmp_path, monkeypatch):
    cls = register_fake(monkeypatch) or registry.DETECTORS["fake"]

    class Flaky(cls):
        def _detect(self, image):
            if image.shape[1] == 123:
                raise RuntimeError("boom")
            return super()._detect(image)

    monkeypatch.setitem(registry.DETECTORS, "flaky", Flaky)
    squares_image((123, 100)).save(tmp_path / "a.png")
    squares_image(squares=[(40, 30, 60, 1.0)]).save(tmp_path / "b.png")
    assert run(tmp_path, "--detector", "flaky") == 0
    r = rows(str(tmp_path))
    assert r["a.png"]["reason"] == "detector_error" and "boom" in r["a.png"]["detail"]
    assert r["b.png"]["status"] == "ok"


def test_large_image_detected_downscaled_in_original_pixels(tmp_path, fake):
    squares_image((5000, 3000), squares=[(3000, 1000, 400, 1.0)]).save(tmp_path / "big.png")
    assert run(tmp_path, "--detector", fake, "--max_side", "1000") == 0
    lm = read_points(detection_path(str(tmp_path), "big.png"))
    expected = np.array([2999.5, 999.5]) + FAKE_LM * 400
    np.testing.assert_allclose(lm, expected, atol=3.0)  # one pixel of the 1/5 copy


def default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action. A shell without job control starts
    background commands (``cmd &``) with SIGINT ignored, and Python then keeps ignoring it, so
    pytest run that way would hand the ignored signal down and the interrupt tests could not work."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_photos_and_no_half_files_then_resumes(tmp_path, sig):
    d = str(tmp_path / "photos")
    os.makedirs(d)
    for i in range(40):
        squares_image(squares=[(10 + i, 30, 60, 1.0)]).save(os.path.join(d, f"p{i:02d}.png"))
    before = snapshot(d)
    code = fake_main_subprocess_code([d, "--detector", "fake", "--no-progress"], delay=0.1)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    t0 = time.time()
    # 4 finished files: the last one's report row may still be on its way when the signal lands
    while time.time() - t0 < 60 and finished_files(os.path.join(d, "detections")) < 4:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert snapshot(d) == before and not temp_files(d)
    rep = report(d)
    done = len(rep["images"])
    assert rep["interrupted"] and 3 <= done < 40
    for row in rep["images"]:
        assert read_points(os.path.join(d, row["outputs"][0])).shape == (5, 2)
    # a re-run resumes: the photos done are kept, the rest processed
    code = fake_main_subprocess_code([d, "--detector", "fake", "--no-progress"], delay=0.0)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    rep = report(d)
    assert not rep["interrupted"] and rep["summary"]["reused"] == done and rep["summary"]["ok"] == 40


def test_shell_wrapper_runs_from_any_folder(tmp_path):
    sh = os.path.join(ROOT, "process_images.sh")
    assert os.access(sh, os.X_OK)
    r = subprocess.run([sh, "--help"], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0 and "--all-faces" in r.stdout
    r = subprocess.run([sh, "no_such_folder"], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2 and "no_such_folder" in r.stderr


# --------------------------------------------------------------------------- real photos (slow)

MTCNN_TF = all(importlib.util.find_spec(m) is not None for m in ("mtcnn", "tensorflow"))
NO_MTCNN_TF = 'the default detector needs the mtcnn package and TensorFlow: pip install -e ".[mtcnn-tf]"'
needs_mtcnn_tf = pytest.mark.skipif(not MTCNN_TF, reason=NO_MTCNN_TF)


@pytest.fixture(scope="module")
def mtcnn_folder(tmp_path_factory):
    """Copies of tests/data/faces + every odd file + a sub-folder, processed once with mtcnn."""
    if not MTCNN_TF:
        pytest.skip(NO_MTCNN_TF)
    d = str(tmp_path_factory.mktemp("real") / "photos")
    names = copy_faces(d)
    odd = make_odd_files(d)
    copy_faces(os.path.join(d, "sub"), ["000007.jpg", "vd006.png"])
    before = snapshot(d)
    t0 = time.time()
    rc = run(d, "--recursive", "--debug-vis")
    return {"dir": d, "names": names, "odd": odd, "before": before, "rc": rc, "seconds": time.time() - t0}


@pytest.mark.slow
def test_real_run_never_touches_photos(mtcnn_folder):
    f = mtcnn_folder
    assert f["rc"] == 0
    assert snapshot(f["dir"]) == f["before"]
    assert not temp_files(f["dir"])


@pytest.mark.slow
def test_real_run_every_face_photo_has_its_detection(mtcnn_folder):
    d, r = mtcnn_folder["dir"], rows(mtcnn_folder["dir"])
    for name in mtcnn_folder["names"] + ["sub/000007.jpg", "sub/vd006.png"]:
        row = r[name]
        assert row["status"] == "ok", (name, row["reason"])
        files = face_detection_files(d, name)
        assert [n for n, _ in files] == [os.path.splitext(os.path.basename(name))[0]]  # one face by default
        lm = read_points(files[0][1])
        w, h = row["width"], row["height"]
        assert (lm[:, 0] > 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] > 0).all() and (lm[:, 1] < h).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left eye / mouth corner first
        assert lm[2, 1] < lm[3, 1] and max(lm[0, 1], lm[1, 1]) < lm[2, 1]  # eyes above nose above mouth
        x, y, bw, bh = row["box"]
        assert x <= lm[:, 0].min() and lm[:, 0].max() <= x + bw and row["confidence"] >= 0.9
        assert os.path.isfile(os.path.join(d, row["debug_vis"]))
    for name, n in GROUP.items():
        assert r[name]["faces"] == n


@pytest.mark.slow
def test_real_run_odd_files(mtcnn_folder):
    d, r = mtcnn_folder["dir"], rows(mtcnn_folder["dir"])
    ref = read_points(detection_path(d, "000002.jpg"))
    for name, (status, reason) in mtcnn_folder["odd"].items():
        assert (r[name]["status"], r[name]["reason"]) == (status, reason), name
        if reason:
            assert r[name]["detail"] and not face_detection_files(d, name)
    assert r["link.jpg"]["status"] == "ok"
    np.testing.assert_allclose(read_points(detection_path(d, "link.jpg")),
                               read_points(detection_path(d, "000006.jpg")), atol=1e-3)
    # every re-encoding of 000002 gives the same face (in the same, upright, pixel frame)
    for name, (status, _) in mtcnn_folder["odd"].items():
        if status != "ok" or name == "link.jpg":
            continue
        lm = read_points(detection_path(d, name))
        if name == "large.jpg":
            lm = (lm + 0.5) / 5 - 0.5
        assert iod_error(lm, ref) < 0.05, name
    assert not any("hidden" in p or p.endswith(".txt") for p in r)


@pytest.mark.slow
def test_real_rerun_is_idempotent(mtcnn_folder):
    d = mtcnn_folder["dir"]
    dets = {p: open(p).read() for p, _ in [(os.path.join(dp, f), 0) for dp, _, fs in
                                            os.walk(os.path.join(d, "detections")) for f in fs]}
    t0 = time.time()
    assert run(d, "--recursive", "--debug-vis") == 0
    assert time.time() - t0 < 10
    rep = report(d)
    # everything is kept but the broken link (nothing to fingerprint: looked at again)
    assert rep["summary"]["reused"] == rep["summary"]["images"] - 1
    assert {p: open(p).read() for p in dets} == dets
    assert snapshot(d) == mtcnn_folder["before"]


@pytest.mark.slow
@needs_mtcnn_tf
def test_real_all_faces_in_group_photos(tmp_path):
    d = str(tmp_path)
    copy_faces(d, list(GROUP) + ["000002.jpg"])
    assert run(d, "--all-faces") == 0
    for name, n in GROUP.items():
        files = face_detection_files(d, name)
        stem = os.path.splitext(name)[0]
        assert [k for k, _ in files] == [stem] + [f"{stem}__face{i:02d}" for i in range(2, n + 1)]
        pts = [read_points(p) for _, p in files]
        centres = [p.mean(0) for p in pts]
        assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]) > 100
    assert len(face_detection_files(d, "000002.jpg")) == 1


@pytest.mark.slow
def test_real_dlib_detector_and_landmarks68(tmp_path):
    if dlib68.default_predictor_path() is None:
        pytest.skip("no dlib predictor")
    d = str(tmp_path)
    copy_faces(d, ["000002.jpg", "vd006.png", "trump_hillary.jpg"])
    assert run(d, "--detector", "dlib", "--landmarks68", "--all-faces") == 0
    r = rows(d)
    assert r["trump_hillary.jpg"]["faces"] == 2
    for name in r:
        for (n, p), (n68, p68) in zip(face_detection_files(d, name), face_detection_files(d, name, "landmarks")):
            assert n == n68
            lm68 = read_points(p68, 68)
            np.testing.assert_allclose(read_points(p), landmarks.lm68_to_5(lm68), atol=1e-3)
    assert os.path.isfile(os.path.join(d, "landmarks", "trump_hillary__face02.txt"))


@pytest.mark.slow
def test_mtcnn_and_dlib_5_points_agree(mtcnn_folder):
    """The figure of issue 4: mtcnn's 5 points vs those derived from dlib's 68 (same face)."""
    if dlib68.default_predictor_path() is None:
        pytest.skip("no dlib predictor")
    d = mtcnn_folder["dir"]
    lmk = dlib68.Dlib68Landmarker()
    errors = []
    for name in mtcnn_folder["names"]:
        image = load_image_array(os.path.join(d, name))
        row = rows(d)[name]
        lm = read_points(detection_path(d, name)).astype(np.float64)
        face = base.Detection(box=np.array(row["box"]), score=row["confidence"], lm5=lm)
        errors.append(iod_error(landmarks.lm68_to_5(lmk.fit(image, face)), lm))
    mean = float(np.mean(errors))
    print(f"mtcnn vs dlib-68 5 points: mean {mean:.3f}, median {np.median(errors):.3f}, "
          f"max {np.max(errors):.3f} of the inter-ocular distance over {len(errors)} photos")
    assert mean < 0.08 and np.max(errors) < 0.2


@pytest.mark.slow
def test_real_workers_match_serial(mtcnn_folder, tmp_path):
    d = str(tmp_path)
    names = ["000002.jpg", "000031.jpg", "vd026.png", "trump_hillary.jpg"]
    copy_faces(d, names)
    assert run(d, "--workers", "2") == 0
    for name in names:
        np.testing.assert_allclose(read_points(detection_path(d, name)),
                                   read_points(detection_path(mtcnn_folder["dir"], name)), atol=2e-3)


@pytest.mark.slow
def test_real_torch_port_agrees_with_mtcnn(mtcnn_folder):
    try:
        det = registry.create_detector("torch")
    except base.DetectorUnavailableError:
        pytest.skip("the MTCNN weights are not available")
    d = mtcnn_folder["dir"]
    for name in ("000002.jpg", "vd006.png"):
        (face,) = det.detect(load_image_array(os.path.join(d, name)))
        np.testing.assert_allclose(face.lm5, read_points(detection_path(d, name)), atol=0.01)


@pytest.mark.slow
@needs_mtcnn_tf
def test_real_ctrl_c_with_the_shell_wrapper(tmp_path):
    d = str(tmp_path / "photos")
    copy_faces(d)
    before = snapshot(d)
    proc = subprocess.Popen([os.path.join(ROOT, "process_images.sh"), d, "--no-progress"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    det_dir = os.path.join(d, "detections")
    t0 = time.time()
    while time.time() - t0 < 120 and finished_files(det_dir) < 3:  # >= 2 reported, as above
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert snapshot(d) == before and not temp_files(d)
    rep = report(d)
    assert rep["interrupted"] and 2 <= len(rep["images"]) < 28


@pytest.mark.slow
def test_end_to_end_with_test_py(mtcnn_folder, standin, tmp_path):
    """./process_images.sh's output feeds test.py on the same folder: every face is reconstructed."""
    src = mtcnn_folder["dir"]
    d = str(tmp_path / "photos")
    os.makedirs(d)
    names = ["000002.jpg", "trump_hillary.jpg", "vd006.png", "exif_rot6.jpg", "gray16.png", "cmyk.jpg"]
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(d, n))
    shutil.copyfile(os.path.join(src, "text.png"), os.path.join(d, "text.png"))
    r = subprocess.run([os.path.join(ROOT, "process_images.sh"), "photos", "--all-faces", "--no-progress"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert rows(d)["text.png"]["reason"] == "not_an_image"
    out = str(tmp_path / "results")
    r = subprocess.run([sys.executable, "test.py", "--name", standin["name"], "--epoch", "20",
                        "--checkpoints_dir", standin["checkpoints_dir"], "--bfm_folder", standin["bfm_folder"],
                        "--img_folder", d, "--results_dir", out, "--device", "cpu", "--save_mesh", "False",
                        "--save_mat", "False", "--num_threads", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    faces = [n for name in names for n, _ in face_detection_files(d, name)]
    assert len(faces) >= len(names) + 1  # trump_hillary has two (re-encodings of 000002 may show a 2nd)
    made = sorted(os.path.splitext(f)[0] for f in os.listdir(out) if f.endswith(".png"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert made == sorted(faces), r.stdout[-2000:] + r.stderr[-2000:]


def test_file_stem_is_splitexts():
    """file_stem (the fast stem scan_folder uses for every photo) equals os.path.splitext's, on
    awkward names too."""
    from util.detections_io import file_stem

    for name in ["a.jpg", "a.b.jpg", "..jpg", ".a.jpg", "a", "a.", "a..jpg", "...", "x.JPEG", "two faces.png",
                 ".hidden"]:
        assert file_stem(name) == os.path.splitext(name)[0], name
