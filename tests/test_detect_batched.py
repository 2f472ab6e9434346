"""process_images' batched engine, --device, worker processes and quiet runs (issue 16, 23.3, 24.3).

Batched detection (the torch port's detect_batch on several photos, in engine processes) gives
the points and report rows of one-photo-at-a-time detection; --device cuda without CUDA is a
one-line usage error; worker processes cap their threads and die with their parent; TensorFlow
and torch notes never reach the terminal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from detect import base, registry
from detect import folder as engine
from detect import settings as run_settings
from detect import workers as wk
import process_images
from tests.conftest import ROOT, make_photo_folder
from util.detections_io import detection_path, read_points

# small photos (fast on a CPU), one with two faces
PHOTOS = ["000033.jpg", "000050.jpg", "vd006.png", "000037.jpg"]


def _port_available() -> bool:
    try:
        registry.create_detector("torch")
    except (base.DetectorUnavailableError, FileNotFoundError):
        return False
    return True


needs_port = pytest.mark.skipif(not _port_available(), reason="the torch MTCNN port's weights are not installed")


def _noise(path: str) -> None:
    from PIL import Image

    Image.fromarray((np.random.RandomState(0).rand(120, 140, 3) * 255).astype(np.uint8)).save(path)


def _folder(d) -> str:
    folder = make_photo_folder(str(d), PHOTOS, with_detections=False)
    _noise(os.path.join(folder, "noise.png"))  # no face
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def _rows(folder: str, report: str) -> dict:
    with open(os.path.join(folder, report), encoding="utf-8") as f:
        return {r["path"]: r for r in json.load(f)["images"]}


@needs_port
def test_batched_equals_one_at_a_time(tmp_path):
    """Same points (<= 0.5 px; float round-off in fact) and the same report rows, whether the
    photos are detected one at a time or in batches of 3 (one detect_batch call each)."""
    folder = _folder(tmp_path / "photos")
    argv = [folder, "--no-progress", "--detector", "torch", "--device", "cpu", "--force"]
    assert process_images.main(argv + ["--workers", "1", "--report", os.path.join(folder, "one.json")]) == 0
    single = {n: read_points(detection_path(folder, n)) for n in PHOTOS}
    assert process_images.main(argv + ["--batch_size", "3", "--workers", "1",
                                       "--report", os.path.join(folder, "batched.json")]) == 0
    for name in PHOTOS:
        assert np.abs(read_points(detection_path(folder, name)) - single[name]).max() <= 0.5
    one, batched = _rows(folder, "one.json"), _rows(folder, "batched.json")
    assert sorted(one) == sorted(batched) == sorted(PHOTOS + ["noise.png", "broken.jpg"])
    for path, row in one.items():
        other = batched[path]
        for key in set(row) - {"seconds", "box", "confidence"}:
            assert row[key] == other[key], (path, key)
        if row["box"] is not None:
            np.testing.assert_allclose(row["box"], other["box"], atol=0.05)
            assert abs(row["confidence"] - other["confidence"]) < 1e-3
    assert one["noise.png"]["reason"] == "no_face" and one["broken.jpg"]["status"] == "skipped"


@needs_port
def test_the_command_leaves_without_waiting_for_its_engines(tmp_path):
    """``process_images.py`` as a program: once every photo is done it leaves without waiting for
    its engine processes to end (on CUDA their exit takes about a second), with every file
    written, its exit status (also --strict's 1) and no warning from multiprocessing's resource
    tracker; ``D3DFR_WAIT_FOR_WORKERS=1`` waits for them."""
    folder = _folder(tmp_path / "photos")
    argv = [sys.executable, os.path.join(ROOT, "process_images.py"), folder, "--no-progress", "--verbose",
            "--detector", "torch", "--device", "cpu", "--batch_size", "2", "--workers", "2", "--force"]
    env = {**os.environ, "D3DFR_WAIT_FOR_WORKERS": "0"}
    r = subprocess.run(argv + ["--strict"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]  # --strict: noise.png and broken.jpg were skipped
    assert "2 worker(s) asked to end; not waited for" in r.stderr and "leaked" not in r.stderr
    assert "process_images: report:" in r.stdout
    rows = _rows(folder, "process_report.json")
    assert sorted(rows) == sorted(PHOTOS + ["noise.png", "broken.jpg"])
    for name in PHOTOS:
        assert read_points(detection_path(folder, name)).shape == (5, 2)
    r = subprocess.run(argv, capture_output=True, text=True, env={**env, "D3DFR_WAIT_FOR_WORKERS": "1"}, timeout=300)
    assert r.returncode == 0 and "2 worker(s) ended in" in r.stderr and "not waited for" not in r.stderr


def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder = _folder(tmp_path / "photos")
    assert process_images.main([folder, "--no-progress", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err and "--device cpu" in err
    assert not os.path.exists(os.path.join(folder, "detections"))
    assert process_images.main([folder, "--no-progress", "--device", "cuda", "--detector", "mtcnn"]) == 2


@needs_port
def test_cuda_taken_on_trust_is_checked_while_the_engines_start(tmp_path, capsys, monkeypatch):
    """Where the machine shows a GPU, process_images starts its engines before torch is asked
    about CUDA (that takes seconds): a GPU torch cannot use is still the one-line error (exit 2,
    nothing written, the engines stopped), and --device auto goes on on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(registry, "_gpu_device_files", lambda: True)
    assert registry.resolve_detector_device("auto", "auto", verify=False) == ("torch", "cuda")
    folder = _folder(tmp_path / "photos")
    stopped = []
    real_start = engine.start_run

    def start_run(plan):
        started = real_start(plan)
        if started is not None:
            real_stop = started.stop
            started.stop = lambda *a, **k: stopped.append(1) or real_stop(*a, **k)
        return started

    monkeypatch.setattr(engine, "start_run", start_run)
    argv = [folder, "--no-progress", "--detector", "torch", "--batch_size", "2", "--workers", "2"]
    assert process_images.main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sees no CUDA device" in err and "--device cpu" in err
    assert stopped == [1] and not os.path.exists(os.path.join(folder, "detections"))
    assert process_images.main(argv[:-4] + ["--device", "auto", "--workers", "1"]) == 0
    report = json.load(open(os.path.join(folder, "process_report.json"), encoding="utf-8"))
    assert report["options"]["device"] == "cpu" and report["summary"]["ok"] == len(PHOTOS)


def test_device_and_detector_resolution(monkeypatch):
    monkeypatch.setattr(registry, "_gpu_device_files", lambda: False)
    assert registry.resolve_detector_device("auto", "auto") == ("mtcnn", "cpu")
    assert registry.resolve_detector_device("torch", "auto") == ("torch", "cpu")
    monkeypatch.setattr(registry, "_gpu_device_files", lambda: True)
    monkeypatch.setattr(registry, "_cuda_available", lambda: True)
    assert registry.resolve_detector_device("auto", "auto") == ("torch", "cuda")
    assert registry.resolve_detector_device("mtcnn", "auto") == ("mtcnn", "cpu")  # TensorFlow here runs on the CPU
    assert registry.resolve_detector_device("auto", "cpu") == ("mtcnn", "cpu")
    with pytest.raises(ValueError, match="--device"):
        registry.resolve_detector_device("torch", "tpu")


def test_worker_counts_and_threads():
    assert wk.worker_count(0, 100, cores=16) == 16
    assert wk.worker_count(0, 6, cores=16) == 2  # a process per 4 photos at most
    assert wk.worker_count(0, 1, cores=16) == 1
    assert wk.worker_count(3, 100, cores=16) == 3
    assert wk.worker_count(0, 126, batched=True, cores=16) == wk.MAX_ENGINES == 6  # a few engines, 2 readers each
    assert wk.worker_count(0, 2, batched=True, cores=16) == 2
    for workers, cores in [(1, 16), (2, 16), (15, 16), (4, 2), (2, 2), (1, 2)]:
        threads = wk.threads_per_worker(workers, cores)
        assert threads >= 1 and (workers * threads <= cores or threads == 1)


@needs_port
def test_workers_cap_their_threads_and_die_with_their_parent(tmp_path):
    """The limits are read back inside two pool workers, started as process_images starts them."""
    folder = _folder(tmp_path / "photos")
    options = run_settings.PrepareOptions(detector="torch", workers=2)
    plan = engine.plan_folder(folder, options)
    threads = wk.threads_per_worker(2)
    env_before = {k: os.environ.get(k) for k in wk.THREAD_VARIABLES}
    seen = []
    wk.run_pool(plan, seen.append, tasks=[None] * 4, task=wk._worker_thread_limits, workers=2)
    assert len(seen) == 4
    for limits in seen:
        assert limits["torch"] == threads and limits["cv2"] == threads
        assert all(limits[k] == str(threads) for k in wk.THREAD_VARIABLES)
        assert limits["pdeathsig"] == 9  # SIGKILL when the parent dies
    assert {k: os.environ.get(k) for k in wk.THREAD_VARIABLES} == env_before  # the parent's are back


@needs_port
def test_engines_share_the_batches_and_take_no_more_once_stopped(tmp_path):
    """Batched engines take batches from one shared list: every photo's result comes exactly
    once; stopped after the first result (an error or Ctrl-C in the run), they finish at most
    the batch in hand and take no other, where they would have done 120; an engine whose
    detector cannot start raises its error in the run."""
    folder = _folder(tmp_path / "photos")
    plan = engine.plan_folder(folder, run_settings.PrepareOptions(detector="torch", device="cpu", batch_size=1))
    batches = [[rel] for rel in plan.todo]
    started = wk.start_engines(plan, batches, 2)
    seen = []
    try:
        started.collect(seen.append)
    finally:
        assert started.stop() is True
    assert sorted(r["row"]["path"] for r in seen) == sorted(plan.todo)

    many = batches * 20

    class Stop(Exception):
        pass

    def accept(result):
        raise Stop

    started = wk.start_engines(plan, many, 2)
    with pytest.raises(Stop):
        started.collect(accept)
    assert started.stop() is True
    assert started.got + started.dropped < len(many) // 4, (started.got, started.dropped)

    cuda = engine.plan_folder(folder, run_settings.PrepareOptions(detector="torch", device="cuda", batch_size=1))
    if torch.cuda.is_available():
        return
    started = wk.start_engines(cuda, batches, 2)
    with pytest.raises(Exception, match="CUDA"):
        started.collect(seen.append)
    started.stop()


def test_reading_threads_give_the_same_batch(tmp_path):
    """An engine's reading threads (several where it has several cores) load a batch as one
    thread does: same photos, same order, same pixels, same report fields."""
    import concurrent.futures as cf

    folder = _folder(tmp_path / "photos")
    options = run_settings.PrepareOptions(detector="torch", device="cpu", debug_vis=True)
    settings = options.settings(0.9)
    rels = sorted(os.listdir(folder))
    alone = wk.load_batch(folder, options, settings, rels)
    with cf.ThreadPoolExecutor(3) as readers:
        threaded = wk.load_batch(folder, options, settings, rels, readers)
    assert [p.get("rel", p.get("result", {}).get("row", {}).get("path")) for p in threaded] == rels
    for a, b in zip(alone, threaded):
        assert a.keys() == b.keys()
        if "result" in a:
            assert a["result"]["row"]["reason"] == b["result"]["row"]["reason"]
            continue
        assert a["row_kw"]["width"] == b["row_kw"]["width"] and a["row_kw"]["height"] == b["row_kw"]["height"]
        np.testing.assert_array_equal(a["prepared"][0], b["prepared"][0])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_torch_port_shows_no_sparse_tensor_warning():
    from detect.mtcnn_port.pyramid import AreaMatrices, area_resize

    image = torch.rand(40, 50, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        area_resize(image, 17, 23, matrices=AreaMatrices(torch.device("cpu"), sparse=True))
    assert not [w for w in caught if "sparse" in str(w.message).lower()]


@pytest.mark.slow
def test_default_run_prints_only_our_lines(tmp_path):
    """A normal run (TensorFlow's mtcnn, a photo without a face) writes nothing to stderr but the
    progress bar: no TensorFlow, absl or oneDNN lines; --verbose lets them through."""
    pytest.importorskip("tensorflow")
    folder = str(tmp_path / "photos")
    os.makedirs(folder)
    _noise(os.path.join(folder, "noise.png"))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "process_images.py"), folder, "--no-progress",
                        "--detector", "mtcnn"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "no_face 1" in r.stdout and len(r.stdout.splitlines()) == 2


@pytest.mark.slow
@needs_port
def test_run_pipeline_equals_the_two_commands(tmp_path, standin, monkeypatch, capsys, caplog):
    """run_pipeline (detection process + reconstruction fed as photos are detected, here each
    photo its own batch at once) writes the detections, report rows and results of
    process_images followed by test.py."""
    import run_pipeline
    import test as test_py
    from pipeline import stream
    from scipy.io import loadmat

    monkeypatch.setattr(stream, "FLUSH_S", 0.0)
    caplog.set_level("INFO", logger="pipeline.run")
    common = ["--name", standin["name"], "--epoch", "20", "--checkpoints_dir", standin["checkpoints_dir"],
              "--bfm_folder", standin["bfm_folder"], "--device", "cpu", "--save_mesh", "False", "--save_png", "False",
              "--num_threads", "0"]
    folders = {}
    for way in ("two", "stream"):
        folder = make_photo_folder(str(tmp_path / way), PHOTOS[:2], with_detections=False)
        _noise(os.path.join(folder, "noise.png"))
        folders[way] = folder
    two, stream = folders["two"], folders["stream"]
    assert process_images.main([two, "--no-progress", "--detector", "torch", "--device", "cpu", "--workers", "1"]) == 0
    assert test_py.main(common + ["--img_folder", two, "--results_dir", str(tmp_path / "r_two")]) == 0
    assert run_pipeline.main([stream, *common, "--results_dir", str(tmp_path / "r_stream"), "--detector", "torch",
                              "--detect_device", "cpu", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "detection: 3 photos, 2 with a face" in out and "done: 2 face(s) reconstructed, 0 failed" in out
    assert "reconstruct: 2 faces [" in captured.err and "3 of 3 photos detected]" in captured.err  # progress
    assert "3 face(s) expected" in caplog.text  # the 3 photos to detect size the run's processes
    for name in PHOTOS[:2]:
        np.testing.assert_array_equal(read_points(detection_path(stream, name)), read_points(detection_path(two, name)))
        stem = os.path.splitext(name)[0]
        a, b = (loadmat(str(tmp_path / r / f"{stem}.mat")) for r in ("r_two", "r_stream"))
        for key in ("id", "exp", "tex", "angle", "gamma", "trans"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
    assert _rows(stream, "process_report.json")["noise.png"]["reason"] == "no_face"


def test_run_pipeline_stops_with_one_line_when_the_results_disk_is_full(tmp_path, standin, monkeypatch, capsys):
    """A full results disk (ENOSPC, injected) stops the rounds and the detection at the first face
    that cannot be written: test.py's one line, exit 1, no other face tried (found on an H200:
    the rounds went on and the run ended with 292 faces missing and no word why)."""
    import errno

    import run_pipeline
    from util import results_io

    calls = []

    def full(files):
        calls.append(files[0][0])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results_io, "write_together", full)
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS[:2], with_detections=False)
    code = run_pipeline.main([folder, "--name", standin["name"], "--epoch", "20", "--checkpoints_dir",
                              standin["checkpoints_dir"], "--bfm_folder", standin["bfm_folder"], "--device", "cpu",
                              "--save_mesh", "False", "--save_png", "False", "--num_threads", "0", "--write_workers",
                              "0", "--results_dir", str(tmp_path / "out"), "--detector", "torch", "--detect_device",
                              "cpu", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1 and len(calls) == 1
    lines = [ln for ln in captured.err.replace("\r", "\n").splitlines() if ln.strip()
             and not ln.startswith("reconstruct: ")]  # the progress bar aside
    assert len(lines) == 1 and lines[0].startswith("error: the results' disk is full: "), captured.err
    assert "--skip_existing true" in lines[0] and "done:" not in captured.out


def test_run_pipeline_refuses_video_and_image_sets(tmp_path, capsys):
    import run_pipeline

    for extra in (["--video", str(tmp_path)], ["--group_by", "folder"]):
        assert run_pipeline.main([str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--video and --group_by are test.py's" in err[0]
