"""test.py's outputs under hostile conditions: failing writers, a full or read-only disk, results
folders that are files, kill -9 in the middle, two runs into one folder, NaN weights.

Every case checks what the user sees (one line, the exit code, no traceback) and what is left on
disk: each face has all of its files or none, no temporary file stays, inputs are untouched.
docs/reliability_outputs.md lists the cases and what each gets.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat

from conftest import ROOT, make_photo_folder
from test_inference import cli_args, run, test_cli
from test_throughput import tiny_config, tiny_results
from util.atomic_files import temp_owner

PHOTOS = ["000002.jpg", "trump_hillary.jpg", "vd006.png"]
FIVE = ["000002.jpg", "015259.jpg", "JianzhuGuo.jpg", "trump_hillary.jpg", "vd006.png"]
STEMS = ("000002", "trump_hillary", "vd006")
SUFFIXES = (".png", ".obj", ".mat")
N_VERTICES = 35709


# ----------------------------------------------------------------------------- helpers
def faces_on_disk(out, suffixes=SUFFIXES) -> dict[str, set[str]]:
    """stem -> the suffixes of its files in ``out`` (temporary files are named apart)."""
    found: dict[str, set[str]] = {}
    for n in os.listdir(out):
        stem, ext = os.path.splitext(n)
        if ext in suffixes:
            found.setdefault(stem, set()).add(ext)
    return found


def assert_whole_faces(out, suffixes=SUFFIXES) -> set[str]:
    """No temporary or stray file; every face has all of its files; each file loads. Returns the stems."""
    names = os.listdir(out)
    assert not [n for n in names if n.startswith(".") or n.endswith(".part")], names
    faces = faces_on_disk(out, suffixes)
    assert all(s == set(suffixes) for s in faces.values()), faces  # no incomplete face
    assert len(names) == len(faces) * len(suffixes)  # nothing else
    for stem in faces:
        path = os.path.join(out, stem)
        if ".png" in suffixes:
            with Image.open(path + ".png") as im:
                im.load()
                assert im.size == (3 * 224, 224)
        if ".mat" in suffixes:
            assert loadmat(path + ".mat")["id"].shape == (1, 80)
        if ".obj" in suffixes:
            with open(path + ".obj", "rb") as f:
                assert sum(line.startswith(b"v ") for line in f) == N_VERTICES
    return set(faces)


def digest(folder) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def one_error_line(err: str) -> str:
    """The single 'error:' line of test.py's stderr (the progress bar aside); no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def small_checkpoint(root, name: str, nan: bool = False) -> str:
    """A resnet18 checkpoint (its last layers zero, as the network initialises them: every face
    is the mean face) under ``root/name``, or with every weight NaN; returns the checkpoints dir."""
    from models.networks import ReconNet

    torch.manual_seed(0)
    state = ReconNet("resnet18").state_dict()
    if nan:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(os.path.join(root, name), exist_ok=True)
    torch.save({"net_recon": state}, os.path.join(root, name, "epoch_20.pth"))
    return str(root)


@pytest.fixture(scope="module")
def r18(standin, tmp_path_factory) -> dict[str, str]:
    """The stand-in face model with a small resnet18 checkpoint (a quicker network on the CPU)."""
    root = small_checkpoint(tmp_path_factory.mktemp("ckpt"), "r18")
    return dict(standin, checkpoints_dir=root, name="r18")


def r18_args(r18, folder, out, *extra) -> list[str]:
    return cli_args(r18, folder, out, "--net_recon=resnet18", "--device=cpu", *extra)


def run18(r18, folder, out, *extra) -> int:
    """test.py in this process with the resnet18 checkpoint; returns the exit code."""
    return test_cli.main(r18_args(r18, folder, str(out), *extra))


def command(r18, folder, out, *extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "test.py"), *r18_args(r18, folder, out, *extra)]


# ----------------------------------------------------------------------------- 22.2: failing writers
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("blocked", SUFFIXES)
def test_a_file_that_cannot_be_placed_fails_its_face_and_leaves_none_of_its_files(tmp_path, blocked, workers):
    """A folder where face01's .png/.obj/.mat should go (its rename fails, in a writer process or
    here): face01 fails with the reason, its other files are removed (also those already
    renamed), the other faces are whole."""
    from util.results_io import ResultWriter

    (tmp_path / f"face01{blocked}").mkdir()
    results = tiny_results(3, np.random.default_rng(1))
    for r in results:
        r.rel_dir = ""
    w = ResultWriter(tiny_config(str(tmp_path)), workers=workers)
    got = w.submit(results) + w.finish()
    assert [n for n, e in got if e is None] == ["face00", "face02"]
    (name, err), = [(n, e) for n, e in got if e is not None]
    assert name == "face01" and err.startswith("writing results failed:") and "directory" in err
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([f"face01{blocked}"] + [f"face0{i}{s}" for i in (0, 2) for s in SUFFIXES])


def test_a_face_that_cannot_reach_a_writer_process_is_a_failed_face(tmp_path):
    """A task whose data cannot be sent to a writer process (here: not picklable) fails its
    faces with the reason; the faces of other tasks are written."""
    from util.results_io import ResultWriter

    results = tiny_results(4, np.random.default_rng(2))
    results[1].lm_gt = lambda: None  # cannot be pickled
    w = ResultWriter(tiny_config(str(tmp_path)), workers=2, chunk=1)
    got = w.submit(results) + w.finish()
    assert [n for n, e in got if e is None] == ["face00", "face02", "face03"]
    (name, err), = [(n, e) for n, e in got if e is not None]
    assert name == "face01" and err.startswith("writing results failed: ") and "pickle" in err.lower()


def test_an_exception_in_each_writer_is_a_failed_face_in_the_summary(r18, tmp_path, monkeypatch, capsys):
    """test.py: an exception while encoding a face's .png, another's .obj, another's .mat (each
    writer's second call fails): each of the three is counted and named as failed with its
    reason, exit code 1, none of their files left; the other two faces are whole."""
    import importlib

    targets = ["util.results_io.png_chunks", "util.mesh_io.obj_chunks", "util.mat5.mat5_bytes"]
    for target in targets:
        module, attr = target.rsplit(".", 1)
        real = getattr(importlib.import_module(module), attr)

        def flaky(*args, _real=real, _attr=attr, _calls=[], **kw):
            _calls.append(1)
            if len(_calls) == 2:
                raise RuntimeError(f"injected failure in {_attr}")
            return _real(*args, **kw)

        monkeypatch.setattr(target, flaky)
    folder = make_photo_folder(str(tmp_path / "photos"), FIVE)
    out = tmp_path / "out"
    assert run18(r18, folder, out, "--write_workers=0", "--batch_size=5") == 1
    text = capsys.readouterr().out
    assert "done: 2 face(s) reconstructed, 3 failed" in text
    failed = [ln.split(":")[0].strip() for ln in text.splitlines() if "writing results failed: RuntimeError" in ln]
    for target in targets:
        assert text.count(f"writing results failed: RuntimeError: injected failure in {target.split('.')[-1]}") == 1
    assert assert_whole_faces(out) == {os.path.splitext(n)[0] for n in FIVE} - set(failed) and len(failed) == 3


def test_a_failing_write_in_test_py_with_writer_processes_is_counted(r18, tmp_path, capsys):
    """test.py with writer processes: a face whose .mat cannot be placed (a folder of that name)
    is named in the summary, exit code 1; its .png and .obj (renamed before) are gone."""
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    (out / "vd006.mat").mkdir(parents=True)
    assert run18(r18, folder, out, "--write_workers=2", "--batch_size=2") == 1
    text = capsys.readouterr().out
    assert "done: 2 face(s) reconstructed, 1 failed" in text and "vd006: writing results failed:" in text
    os.rmdir(out / "vd006.mat")
    assert assert_whole_faces(out) == {"000002", "trump_hillary"}


# ----------------------------------------------------------------------------- 22.3 / 24.6: disk full, read-only
def test_disk_full_stops_the_run_with_one_line_then_skip_existing_finishes(r18, tmp_path, monkeypatch, capsys):
    """ENOSPC (injected) on the second face: one line (what, where, how much), exit 1, no
    temporary or partial file, the first face whole; then --skip_existing does the rest."""
    from util import results_io

    real = results_io.write_together
    calls = []

    def full(files):
        calls.append(files[0][0])
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(files)

    monkeypatch.setattr(results_io, "write_together", full)
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    assert run18(r18, folder, out, "--write_workers=0", "--batch_size=1") == 1
    captured = capsys.readouterr()
    assert "done:" not in captured.out
    line = one_error_line(captured.err)
    assert line.startswith("error: the results' disk is full: writing trump_hillary's files (")
    assert f"into {out} failed: No space left on device" in line and "free there" in line
    assert "1 face(s) written, 2 left (about " in line and "--skip_existing true" in line
    assert len(calls) == 2  # it stopped: the third face was not tried
    assert assert_whole_faces(out) == {"000002"}
    monkeypatch.setattr(results_io, "write_together", real)  # space is back
    assert run18(r18, folder, out, "--skip_existing=true") == 0
    assert "done: 2 face(s) reconstructed, 0 failed" in capsys.readouterr().out
    assert assert_whole_faces(out) == set(STEMS)


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only filesystem"),
                                        (errno.EACCES, "not writable")])
def test_results_folder_turning_read_only_stops_the_run(r18, tmp_path, monkeypatch, capsys, code, words):
    from util import results_io

    def refuse(files):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(results_io, "write_together", refuse)
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    assert run18(r18, folder, out, "--write_workers=0", "--batch_size=1") == 1
    line = one_error_line(capsys.readouterr().err)
    assert words in line and "0 face(s) written, 3 left" in line
    assert os.listdir(out) == []


def mount_tmpfs(path, size: str, *options: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root only); False where that is not possible."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        return False
    opts = ",".join((f"size={size}",) + options)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A mounter of small tmpfs filesystems (root only, else the test is skipped); unmounted after."""
    mounted = []

    def mount(name: str, size: str, *options: str):
        path = tmp_path / name
        if not mount_tmpfs(path, size, *options):
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_really_full_disk_with_writer_processes(r18, tmp_path, tmpfs):
    """A 6 MB tmpfs (a face's three files take ~4.2 MB), writer and DataLoader processes: the
    run stops with one line naming the space needed, exit 1, no partial file or incomplete face;
    once the filesystem is larger, --skip_existing finishes the job."""
    from benchmarks.bench_inference import make_folder

    n = 6
    folder = make_folder(str(tmp_path / "photos"), n)
    before = digest(folder)
    disk = tmpfs("disk", "6m")
    cmd = command(r18, folder, disk / "out", "--batch_size=2", "--num_threads=2", "--write_workers=2")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "done:" not in r.stdout
    line = one_error_line(r.stderr)
    assert "the results' disk is full" in line and "No space left on device" in line and "MB more" in line
    k = len(assert_whole_faces(disk / "out"))
    assert k <= 1 and f"{k} face(s) written, {n - k} left (about " in line  # one face fits, at most
    subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True)
    r = subprocess.run(cmd + ["--skip_existing=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"done: {n - k} face(s) reconstructed, 0 failed" in r.stdout
    assert len(assert_whole_faces(disk / "out")) == n
    assert digest(folder) == before


def test_read_only_filesystem_results_folder_is_one_line(standin, tmp_path, tmpfs, capsys):
    ro = tmpfs("ro", "1m", "ro")
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS[:1])
    assert run(standin, folder, str(ro)) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write results into {ro}: Read-only file system; " \
                                              "give a writable --results_dir"
    assert run(standin, folder, str(ro / "new" / "results")) == 2  # to be created
    assert capsys.readouterr().err.strip() == f"error: cannot write results into {ro / 'new' / 'results'}: no " \
        f"folder can be created in {ro} (read-only filesystem or no permission); give a writable --results_dir"


# ----------------------------------------------------------------------------- 24.2: results folder is a file
def test_results_dir_that_is_a_file_is_one_line_exit_2(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS[:1])
    f = tmp_path / "results.txt"
    f.write_text("mine")
    assert run(standin, folder, str(f)) == 2
    assert capsys.readouterr().err.strip() == f"error: the results folder {f} is a file, not a folder; give " \
                                              "another --results_dir"
    assert run(standin, folder, str(f / "sub")) == 2  # a folder under a file
    assert capsys.readouterr().err.strip() == f"error: cannot write results into {f / 'sub'}: {f} is not a " \
                                              "folder; give a writable --results_dir"
    assert f.read_text() == "mine"


def test_unwritable_results_folder_is_one_line_exit_2(standin, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into any folder (the read-only filesystem test covers root)")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert run(standin, make_photo_folder(str(tmp_path / "photos"), PHOTOS[:1]), str(out)) == 2
    finally:
        out.chmod(0o755)
    assert capsys.readouterr().err.strip() == f"error: cannot write results into {out}: Permission denied; give " \
                                              "a writable --results_dir"


# ----------------------------------------------------------------------------- 24.7: NaN weights
def test_nan_weights_fail_each_face_without_files_or_warnings(standin, tmp_path, capsys, recwarn):
    ckpt = small_checkpoint(tmp_path / "ckpt", "nan", nan=True)
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    code = run(dict(standin, checkpoints_dir=ckpt, name="nan"), folder, str(out), "--net_recon=resnet18",
               "--write_workers=0")
    text = capsys.readouterr().out
    assert code == 1 and "done: 0 face(s) reconstructed, 3 failed" in text
    assert text.count("the reconstruction is not finite (NaN or inf in its coeffs)") == 3
    assert not out.exists()  # no file of any face; the run made the folder and, reconstructing nothing, removed it
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


# ----------------------------------------------------------------------------- 24.4: two runs, one folder
@pytest.mark.slow
def test_two_runs_into_one_results_folder_do_not_collide(r18, tmp_path):
    """Two test.py runs on the same photos into the same folder at once (writer processes in
    both): neither reports a failure, every face is whole, no temporary file is left."""
    from benchmarks.bench_inference import make_folder

    folder = make_folder(str(tmp_path / "photos"), 6)
    out = tmp_path / "out"
    cmd = command(r18, folder, out, "--batch_size=2", "--write_workers=2", "--save_png=false")
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        assert "done: 6 face(s) reconstructed, 0 failed" in stdout
    assert len(assert_whole_faces(out, (".obj", ".mat"))) == 6


# ----------------------------------------------------------------------------- 22.4 / 24.3: kill -9
def processes_with(marker: str) -> list[str]:
    """'pid command' of the live processes whose environment holds ``marker`` (every process a
    run starts inherits it: DataLoader workers, the forkserver and its writers, the resource tracker)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie waiting for its parent (pytest) to collect it: not running
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")[:120].decode(errors="replace")
            found.append(f"{pid} {cmdline}")
        except OSError:
            continue
    return found


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc") or not sys.platform.startswith("linux"), reason="needs Linux /proc")
def test_kill_9_leaves_no_process_no_partial_face_and_skip_existing_completes(r18, tmp_path):
    """kill -9 of test.py in the middle of 100 photos (DataLoader workers, writer processes):
    within seconds no process of the run is left and no live pymp-* socket (a dead one the next
    run removes); then the same command
    with --skip_existing true: every face whole and loadable, none missing, none twice, no
    temporary file; the photos untouched. (.obj and .mat: the pictures, ~40 % of the CPU time,
    go through the same writer; the tests above load them.)"""
    from benchmarks.bench_inference import make_folder

    n = 100
    folder = make_folder(str(tmp_path / "photos"), n)
    before = digest(folder)
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = f"D3DFR_TEST_RUN={uuid.uuid4().hex}"
    env = dict(os.environ, TMPDIR=str(tmp), D3DFR_TEST_RUN=marker.split("=")[1])
    cmd = command(r18, folder, out, "--batch_size=4", "--num_threads=2", "--write_workers=2", "--save_png=false")
    suffixes = (".obj", ".mat")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: out.is_dir() and len(faces_on_disk(out, suffixes)) >= 8 or proc.poll() is not None,
                    300)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert len(processes_with(marker)) >= 5  # the run, 2 loaders, the forkserver, 2 writers (, the tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert wait_for(lambda: not processes_with(marker), 10), processes_with(marker)
    # the forkserver removes its socket folder as it exits; in about one run in ten the folder
    # stayed with its socket file, which no process has bound: the next run removes it (below)
    from util.subprocesses import _bound_socket_paths

    assert wait_for(lambda: all(e.startswith("listener-") and str(tmp / p / e) not in _bound_socket_paths()
                                for p in os.listdir(tmp) if p.startswith("pymp-") for e in os.listdir(tmp / p)), 30), \
        [(p, os.listdir(tmp / p)) for p in os.listdir(tmp)]
    names = os.listdir(out)
    temps = [t for t in names if temp_owner(t) is not None]  # the killed writers' (removed by the next run)
    k = len(faces_on_disk(out, suffixes))
    assert 8 <= k < n and len(names) == 2 * k + len(temps)  # killed in the middle; each face whole
    r = subprocess.run(cmd + ["--skip_existing=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"done: {n - k} face(s) reconstructed, 0 failed" in r.stdout and f"{k} face(s) left out" in r.stdout
    assert len(assert_whole_faces(out, suffixes)) == n
    assert digest(folder) == before
    assert not processes_with(marker)
    # nothing left in the temp folder but, in about one run in ten, empty pymp-* folders (0 bytes;
    # which process leaves them, the killed run's or the re-run's DataLoader workers, was not found)
    assert all(p.startswith("pymp-") and os.listdir(tmp / p) == [] for p in os.listdir(tmp)), \
        [(p, os.listdir(tmp / p)) for p in os.listdir(tmp)]


@pytest.mark.skipif(not os.path.isfile("/proc/net/unix"), reason="needs Linux /proc/net/unix")
def test_a_dead_forkserver_socket_folder_is_removed_and_nothing_else(tmp_path):
    """remove_dead_socket_folders: a pymp-* folder whose listener-* socket no process has bound
    goes; one whose socket is bound, one with another file, and any other folder stay."""
    import socket

    from util.subprocesses import remove_dead_socket_folders

    def folder_with_socket(name: str) -> socket.socket:
        (tmp_path / name).mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name / "listener-x"))
        s.listen()
        return s

    folder_with_socket("pymp-dead").close()  # closed: its file stays, bound by no process
    live = folder_with_socket("pymp-live")
    folder_with_socket("pymp-other").close()
    (tmp_path / "pymp-other" / "data.bin").write_bytes(b"x")
    (tmp_path / "mine").mkdir()
    try:
        assert remove_dead_socket_folders(str(tmp_path)) == [str(tmp_path / "pymp-dead")]
        assert sorted(os.listdir(tmp_path)) == ["mine", "pymp-live", "pymp-other"]
        assert os.listdir(tmp_path / "pymp-live") == ["listener-x"]
    finally:
        live.close()
    assert remove_dead_socket_folders(str(tmp_path)) == [str(tmp_path / "pymp-live")]
