"""Reconstruction fed as photos are detected (run_pipeline): pipeline.stream.FaceFeed's batches and
run_folder(source=...) with DataLoader workers reading them."""
from __future__ import annotations

import dataclasses
import os
import queue
import time

import numpy as np
import pytest
import torch

from pipeline import stream
from tests.conftest import make_photo_folder, wait_for_first_result


def _taken(feed: stream.FaceFeed, readers: int) -> list:
    """Everything on the feed's queue up to its ``readers`` Nones."""
    got, ends = [], 0
    while ends < readers:
        item = feed.queue.get(timeout=10)
        if item is None:
            ends += 1
        else:
            got.append(item)
    return got


def _scan(photos):
    """Each photo one face (its name), 'done_*' photos done before."""
    return [p for p in photos if not p.startswith("done")], sum(p.startswith("done") for p in photos)


def test_the_feed_makes_full_batches_numbers_the_faces_and_ends_each_reader():
    chunks = [["a", "b"], ["c"], ["done1", "d", "e", "f"], ["g"]]
    feed = stream.FaceFeed(chunks, _scan, batch_size=3)
    feed.start(readers=2)
    got = _taken(feed, 2)
    assert [[e for _, e in b] for b in got] == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert [i for b in got for i, _ in b] == list(range(7))
    assert (feed.faces, feed.done_before, feed.error) == (7, 1, None)


def test_a_part_batch_goes_when_the_source_is_idle(monkeypatch):
    """While the source yields empty lists (nothing detected for a while), faces waiting
    FLUSH_S go as a part batch instead of waiting for a full one."""
    monkeypatch.setattr(stream, "FLUSH_S", 0.2)
    seen = []

    def source():
        yield ["a", "b"]
        for _ in range(100):  # idle until the part batch is out
            time.sleep(0.02)
            yield []
            if seen:
                break
        yield ["c"]

    feed = stream.FaceFeed(source(), _scan, batch_size=64)
    feed.start(readers=1)
    first = feed.queue.get(timeout=10)
    seen.append(first)
    assert [e for _, e in first] == ["a", "b"]
    assert [[e for _, e in b] for b in _taken(feed, 1)] == [["c"]]


def test_an_error_of_the_source_ends_the_readers_and_is_kept():
    def source():
        yield ["a"]
        raise RuntimeError("detection went away")

    feed = stream.FaceFeed(source(), _scan, batch_size=8)
    feed.start(readers=3)
    assert [[e for _, e in b] for b in _taken(feed, 3)] == [["a"]]  # the faces before it still go
    feed._thread.join(5)
    assert isinstance(feed.error, RuntimeError)


def test_stop_drops_the_waiting_batches_and_ends_the_readers():
    def source():
        yield [str(i) for i in range(10)]
        time.sleep(60)  # detection still running when the run stops

    feed = stream.FaceFeed(source(), _scan, batch_size=2)
    feed.start(readers=2)
    deadline = time.monotonic() + 10
    while feed.faces < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the queue's own thread has passed them on
    feed.stop()
    left = []
    with pytest.raises(queue.Empty):
        while True:
            left.append(feed.queue.get(timeout=1))
    assert left == [None, None]


class _Source:
    """Photos in chunks with idle gaps, as run_pipeline's DetectedPhotos gives them."""

    def __init__(self, chunks, expected):
        self.chunks, self.expected = chunks, expected

    def status(self) -> str:
        return ""

    def __iter__(self):
        for chunk in self.chunks:
            yield []
            yield chunk


@pytest.mark.slow
def test_a_streamed_run_with_workers_writes_what_a_folder_run_writes(standin, tmp_path):
    """run_folder fed photo by photo (two DataLoader workers taking batches from the feed, in the
    order they are ready) writes the same coefficients as a run over the listed folder, leaves
    out a photo never reported, and counts faces done before with --skip_existing."""
    from scipy.io import loadmat

    from options.run_specs import run_spec
    from options.test_options import parse_test_options
    from pipeline.run import run_folder

    names = ["000002.jpg", "000006.jpg", "000007.jpg", "000031.jpg", "vd006.png"]
    folder = make_photo_folder(str(tmp_path / "photos"), names)
    common = [f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
              f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
              "--device=cpu", "--batch_size=2", "--write_workers=0", "--save_mesh=False", "--save_png=False"]
    listed = run_spec(parse_test_options(common + [f"--results_dir={tmp_path / 'listed'}", "--num_threads=0"]))
    assert run_folder(listed, torch.device("cpu"), progress=False).faces_ok == 5
    streamed = run_spec(parse_test_options(common + [f"--results_dir={tmp_path / 'streamed'}", "--num_threads=2"]))
    chunks = [["000006.jpg"], ["vd006.png", "000002.jpg", "000031.jpg"]]  # 000007.jpg never reported
    summary = run_folder(streamed, torch.device("cpu"), progress=False, source=_Source(chunks, expected=64))
    assert (summary.faces_ok, summary.faces_failed) == (4, 0)
    assert sorted(os.listdir(tmp_path / "streamed")) == ["000002.mat", "000006.mat", "000031.mat", "vd006.mat"]
    for stem in ("000002", "000006", "000031", "vd006"):
        a, b = (loadmat(str(tmp_path / r / f"{stem}.mat")) for r in ("listed", "streamed"))
        for key in ("id", "exp", "tex", "angle", "gamma", "trans"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
    again = run_folder(dataclasses.replace(streamed, skip_existing=True), torch.device("cpu"), progress=False,
                       source=_Source(chunks + [["000007.jpg"]], expected=64))
    assert (again.faces_ok, again.faces_done_before) == (1, 4)


def test_run_pipelines_source_reads_the_detection_messages():
    """run_pipeline.DetectedPhotos: the photos kept from an earlier run and the count to detect
    first (``expected``: both), then the photos waiting at each step in one list (an empty list
    from detection: a photo without a face), an empty list while none comes, and the last message
    kept as ``final``; a dead process without one counts as failed."""
    import run_pipeline
    from detect.folder import DETECTION_DONE, DETECTION_FAILED

    q = queue.Queue()
    for msg in (["kept.jpg", "kept2.jpg"], 3, ["a.jpg"], [], ["b.jpg"]):
        q.put(msg)
    photos = run_pipeline.DetectedPhotos(q, alive=lambda: True)
    assert photos.expected == 5 and photos.status() == "0 of 3 photos detected"
    it = iter(photos)
    assert next(it) == ["kept.jpg", "kept2.jpg"]
    assert next(it) == ["a.jpg", "b.jpg"] and photos.status() == "3 of 3 photos detected"
    assert next(it) == []  # nothing for IDLE_S
    q.put((DETECTION_DONE, {"images": 3}, "report.json"))
    assert list(it) == [[]] and photos.final[0] == DETECTION_DONE
    dead = run_pipeline.DetectedPhotos(queue.Queue(), alive=lambda: False)
    assert dead.expected == 0 and list(dead) == [] and dead.final[0] == DETECTION_FAILED


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_run_pipeline_stops_at_once_on_ctrl_c_and_sigterm(standin, tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to
    run_pipeline alone (a batch scheduler) while both steps run: exit 130 within seconds with its
    one line, no process left behind, no warning of leaked semaphores (the detection process is
    stopped through its Ctrl-C path, not killed), no partial file."""
    import signal
    import subprocess
    import sys

    from tests.conftest import FACES, ROOT

    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(n for n in os.listdir(FACES) if n.endswith((".jpg", ".png")))
    for k in range(6):
        for n in names:
            os.link(os.path.join(FACES, n), folder / f"{k}_{n}")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "run_pipeline.py"), str(folder), f"--name={standin['name']}",
           "--epoch=20", f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
           f"--results_dir={out}", "--device=cpu", "--batch_size=2", "--num_threads=1", "--write_workers=1",
           "--save_png=false", "--detector=torch", "--detect_device=cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_first_result(proc, out)
    if how == "ctrl_c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "leaked" not in err, err[-2000:]
    assert time.monotonic() - t0 < 15
    gone = time.monotonic() + 10
    while time.monotonic() < gone:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a process of the run is still there")
    written = [os.path.join(d, n) for sub in (out, folder / "detections") for d, _, ns in os.walk(sub) for n in ns]
    assert written and not [p for p in written if p.endswith(".part") or ".tmp" in os.path.basename(p)]
    assert 0 < len([p for p in written if p.endswith(".mat")]) < len(names) * 6


def _detection_that_fails_at_once(folder, options, queue, report_path=None, fallback=None):
    """A detection process whose set-up fails (as detect_to_queue reports it)."""
    from detect.folder import DETECTION_FAILED

    queue.put((DETECTION_FAILED, "ValueError: no engine could start"))


def _detection_that_fails_after_one(folder, options, queue, report_path=None, fallback=None):
    """A detection process that reports one photo, then fails."""
    from detect.folder import DETECTION_FAILED

    queue.put([])
    queue.put(2)
    queue.put(["000002.jpg"])
    queue.put((DETECTION_FAILED, "RuntimeError: CUDA error: an illegal memory access"))


@pytest.mark.parametrize("when", ["set_up", "mid_run"])
def test_run_pipeline_reports_a_detection_failure(standin, tmp_path, capsys, when):
    """Detection failing at its set-up: its one-line error, exit 2, no results folder (the model
    was loaded meanwhile, nothing written). Failing mid-run: the faces of the photos detected
    before are reconstructed and the line says where they are."""
    import run_pipeline
    from options.run_specs import run_spec
    from options.test_options import parse_test_options

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    out = tmp_path / "out"
    spec = run_spec(parse_test_options([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
                                        f"--bfm_folder={standin['bfm_folder']}",
                                        f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={out}",
                                        "--device=cpu", "--save_png=false", "--save_mesh=false"]))
    fake = _detection_that_fails_at_once if when == "set_up" else _detection_that_fails_after_one
    assert run_pipeline.run(spec, options=None, detection=fake) == 2
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if ln.strip() and not ln.startswith("reconstruct: ")]
    assert len(err) == 1 and err[0].startswith("run_pipeline: detection failed: "), err
    if when == "set_up":
        assert err[0].endswith("ValueError: no engine could start") and not out.exists()
    else:
        assert err[0].endswith(f"an illegal memory access; the 1 face(s) of the photos detected before it are "
                               f"written in {out}")
        assert sorted(os.listdir(out)) == ["000002.mat"]
