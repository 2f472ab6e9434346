"""Hostile inputs, the input side (issues 22 and 24): every case ends in a correct result or a
named failure - no traceback, no input changed, no partial file, nothing deleted that we did not
write. docs/reliability_inputs.md lists each case and what it gets.

- file names: not UTF-8 (a Latin-1 0xE9 byte), a newline, a leading dash, spaces, shell
  metacharacters; a photo inside ``detections/``; a folder named ``x.jpg``; ``detections`` a file;
- detection files: NaN, inf, 1e30, negative, all five points equal, commas, CRLF, empty,
  binary, a folder / a FIFO / a device in their place, a 200 MB file;
- process_images: kill -9 in the middle of ~100 photos, then the same command; temporaries of
  others never deleted; files follow the umask;
- face model and checkpoint files: damaged, wrong shapes, indices out of range, code in a pickle.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.io import savemat

import process_images
from conftest import ROOT, golden_lm5, make_photo_folder, tiny_face_model_dict
from helpers_images import fake_main_subprocess_code, register_fake, snapshot, squares_image
from util.atomic_files import temp_owner
from util.detections_io import MAX_POINTS_BYTES, DetectionFileError, read_points
from util.filenames import from_hex, is_plain, json_text, printable, raw_hex
from util.image_io import list_images
from detect.report import REPORT_NAME, read_report

ODD_NAMES = [b"caf\xe9.png", b"new\nline.png", b"-dash.png", b"with  space.png", b"$(touch x);`id`&|'\".png",
             b"plain.png"]


@pytest.fixture
def fake(monkeypatch):
    register_fake(monkeypatch)
    return "fake"


def run_prepare(folder, *args) -> int:
    return process_images.main([str(folder), "--no-progress", "--detector", "fake", *args])


def face_png(path) -> None:
    """A photo with one face for the fake detector, at ``path`` (str, bytes or Path)."""
    with open(path, "wb") as f:
        squares_image(squares=[(40, 30, 60, 1.0)]).save(f, format="PNG")


def our_temps(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if temp_owner(f) is not None]


def stat_snapshot(folder) -> dict:
    """{relative path (bytes): (mode, size, mtime)} of everything under ``folder``, links not
    followed and no file opened (a FIFO would block a reader; a 200 MB file would take long)."""
    out = {}
    for d, dirs, files in os.walk(os.fsencode(folder)):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), os.fsencode(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def report_doc(folder) -> dict:
    with open(os.path.join(folder, REPORT_NAME), "rb") as f:
        data = f.read()
    data.decode("utf-8")  # strict: the report is valid UTF-8 whatever the names
    return json.loads(data)


# ------------------------------------------------------------------------------------- file names

def test_printable_and_json_text_escape_undecodable_bytes_only_where_needed():
    name = os.fsdecode(b"caf\xe9\nx\t.png")
    assert printable(name) == "caf\\xe9\\nx\\t.png" and is_plain(printable(name))
    assert json_text(name) == "caf\\xe9\nx\t.png" and is_plain(json_text(name))
    assert from_hex(raw_hex(name)) == name and os.fsencode(from_hex(raw_hex(name))) == b"caf\xe9\nx\t.png"
    assert printable("naïve café 写真.png") == json_text("naïve café 写真.png") == "naïve café 写真.png"


def test_odd_names_process_images_end_to_end(tmp_path, fake, capsys):
    """Names the filesystem allows but UTF-8 does not (Latin-1 0xE9), a newline, a leading dash,
    spaces, shell metacharacters: each photo gets its detection file under the same bytes, the
    report is valid UTF-8 JSON with the undecodable name escaped plus its raw bytes, a re-run
    finds every row again, and the photos are never touched."""
    d = tmp_path / "photos"
    d.mkdir()
    for n in ODD_NAMES:
        face_png(os.path.join(os.fsencode(d), n))
    before = snapshot(str(d))
    assert run_prepare(d) == 0
    out = capsys.readouterr().out
    assert f"{len(ODD_NAMES)} photos, {len(ODD_NAMES)} with a face" in out and is_plain(out)
    det = sorted(os.listdir(os.fsencode(d / "detections")))
    assert det == sorted(n[:-4] + b".txt" for n in ODD_NAMES)  # every name round-trips, byte for byte
    for n in ODD_NAMES:
        assert read_points(os.fsdecode(os.path.join(os.fsencode(d / "detections"), n[:-4] + b".txt"))).shape == (5, 2)
    doc = report_doc(d)
    rows = {r["path"]: r for r in doc["images"]}
    latin = rows["caf\\xe9.png"]
    assert bytes.fromhex(latin["path_hex"]) == b"caf\xe9.png" and latin["status"] == "ok"
    assert latin["outputs"] == ["detections/caf\\xe9.txt"]
    assert [bytes.fromhex(h) for h in latin["outputs_hex"]] == [b"detections/caf\xe9.txt"]
    assert "path_hex" not in rows["new\nline.png"]  # valid UTF-8: JSON itself escapes the newline
    assert sorted(read_report(str(d / REPORT_NAME))) == sorted(os.fsdecode(n) for n in ODD_NAMES)
    assert run_prepare(d) == 0  # every row found again from its bytes: nothing redone
    assert report_doc(d)["summary"]["reused"] == len(ODD_NAMES)
    assert snapshot(str(d)) == before and not our_temps(str(d))


def test_run_summary_prints_and_lists_odd_names_escaped(tmp_path):
    """test.py's summary and its list files take any name: one printable line per entry."""
    from pipeline.summary import RunSummary

    latin, newline = os.fsdecode(b"/p/caf\xe9.jpg"), "/p/new\nline.jpg"
    s = RunSummary(out_dir=str(tmp_path / os.fsdecode(b"r\xe9s")), photos_without_detection=[latin] * 3,
                   failures=[("new\nline", f"{newline}: broken")] * 3)
    text = s.report(2)
    assert is_plain(text) and "/p/caf\\xe9.jpg" in text and "new\\nline: /p/new\\nline.jpg: broken" in text
    s.write_long_lists(2)
    with open(os.path.join(s.out_dir, "skipped_photos.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == ["/p/caf\\xe9.jpg"] * 3
    with open(os.path.join(s.out_dir, "failed_faces.txt"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 3


def test_photo_inside_detections_is_never_a_photo(tmp_path, fake):
    """Decided: detections/ (like landmarks/, debug_vis/) belongs to the tool's outputs; an image
    put there is not a photo of the folder (with or without --recursive) and is never read,
    changed or deleted."""
    d = tmp_path / "photos"
    (d / "detections").mkdir(parents=True)
    face_png(d / "a.png")
    face_png(d / "detections" / "stray.png")
    assert list_images(str(d)) == list_images(str(d), recursive=True) == ["a.png"]
    before = snapshot(str(d), skip=())
    assert run_prepare(d, "--recursive") == 0
    after = snapshot(str(d), skip=())
    assert after["detections/stray.png"] == before["detections/stray.png"]
    assert [r["path"] for r in report_doc(d)["images"]] == ["a.png"]
    assert not os.path.exists(d / "detections" / "stray.txt")


def test_folder_named_like_a_photo_is_reported(tmp_path, fake):
    d = tmp_path / "photos"
    (d / "x.jpg").mkdir(parents=True)
    face_png(d / "a.png")
    assert run_prepare(d) == 0
    rows = {r["path"]: r for r in report_doc(d)["images"]}
    assert rows["x.jpg"]["status"] == "skipped" and rows["x.jpg"]["reason"] == "not_a_file"
    assert "folder" in rows["x.jpg"]["detail"] and "--recursive" in rows["x.jpg"]["detail"]


def test_detections_that_is_a_file_is_a_clear_setup_error(tmp_path, fake, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    face_png(d / "a.png")
    (d / "detections").write_bytes(b"mine")
    assert run_prepare(d) == 2
    err = capsys.readouterr().err
    assert "detections exists and is not a folder" in err and "Errno" not in err and len(err.splitlines()) == 1
    assert (d / "detections").read_bytes() == b"mine"


def test_an_output_name_taken_by_a_folder_fails_that_photo_only(tmp_path, fake):
    d = tmp_path / "photos"
    (d / "detections" / "b.txt").mkdir(parents=True)
    face_png(d / "a.png")
    face_png(d / "b.png")
    assert run_prepare(d) == 0
    rows = {r["path"]: r for r in report_doc(d)["images"]}
    assert rows["a.png"]["status"] == "ok"
    assert rows["b.png"]["reason"] == "output_blocked" and "is a folder" in rows["b.png"]["detail"]
    assert (d / "detections" / "b.txt").is_dir()


def test_report_that_is_no_file_or_was_edited(tmp_path, fake, capsys):
    """--report naming a FIFO (never opened: it would block) or a folder: exit 2, one line; a
    report whose rows were edited into other types: those photos are simply processed again."""
    d = tmp_path / "photos"
    d.mkdir()
    face_png(d / "a.png")
    os.mkfifo(tmp_path / "fifo")
    for rep in (tmp_path / "fifo", tmp_path):
        assert run_prepare(d, "--report", str(rep)) == 2
        err = capsys.readouterr().err
        assert "exists and is not a file" in err and len(err.splitlines()) == 1
    assert run_prepare(d) == 0
    doc = report_doc(d)
    doc["images"][0]["outputs"] = 5
    doc["images"] += [{"path": 3}, "x", {"path": "b.png", "outputs_hex": ["zz"]}]
    (d / REPORT_NAME).write_text(json.dumps(doc))
    assert run_prepare(d) == 0
    doc = report_doc(d)
    assert [r["path"] for r in doc["images"]] == ["a.png"] and doc["summary"]["reused"] == 0


# -------------------------------------------------------------- temporaries, permissions, kill -9

def test_cleanup_removes_only_our_dead_writers_temporaries(tmp_path, fake):
    d = tmp_path / "photos"
    (d / "detections").mkdir(parents=True)
    rep = tmp_path / "elsewhere"
    rep.mkdir()
    face_png(d / "a.png")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    theirs = [d / "detections" / ".tmp_mine.txt", rep / ".tmp_other_app.json", d / "detections" / "a.txt.part",
              rep / f".d3dfr-{gone.pid}-0123abcd.other.json.part",  # ours, but not of this report
              d / "detections" / f".d3dfr-1-0123abcd.a.txt.part"]  # of a live process (init)
    ours = [d / "detections" / f".d3dfr-{gone.pid}-89abcdef.a.txt.part",
            rep / f".d3dfr-{gone.pid}-89abcdef.r.json.part"]
    for p in theirs + ours:
        p.write_bytes(b"x")
    assert run_prepare(d, "--report", str(rep / "r.json")) == 0
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, fake, umask):
    d = tmp_path / "photos"
    d.mkdir()
    face_png(d / "a.png")
    old = os.umask(umask)
    try:
        assert run_prepare(d, "--debug-vis") == 0
    finally:
        os.umask(old)
    for p in (d / "detections" / "a.txt", d / REPORT_NAME, d / "debug_vis" / "a.jpg"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p


def test_kill_9_in_the_middle_then_the_same_command(tmp_path):
    """kill -9 of process_images on 100 photos, then the same command: every photo has exactly
    its one complete detection file, the report lists each photo once and agrees with the files,
    no temporary file is left, the photos are untouched."""
    d = tmp_path / "photos"
    d.mkdir()
    n = 100
    for i in range(n):
        face_png(d / f"p{i:03d}.png")
    before = snapshot(str(d))
    args = [str(d), "--detector", "fake", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", fake_main_subprocess_code(args, delay=0.02)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    det = d / "detections"
    t0 = time.time()
    while time.time() - t0 < 120 and (not det.is_dir() or len(os.listdir(det)) < 30) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = len([f for f in os.listdir(det) if temp_owner(f) is None])
    assert 0 < done_before < n  # killed in the middle
    r = subprocess.run([sys.executable, "-c", fake_main_subprocess_code(args, delay=0.0)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = report_doc(d)
    assert not doc["interrupted"] and doc["summary"]["ok"] == n and doc["summary"]["faces_written"] == n
    assert sorted(row["path"] for row in doc["images"]) == [f"p{i:03d}.png" for i in range(n)]
    assert sorted(os.listdir(det)) == [f"p{i:03d}.txt" for i in range(n)]  # none missing, none extra
    for i in range(n):
        assert read_points(str(det / f"p{i:03d}.txt")).shape == (5, 2)
        assert doc["images"][i]["outputs"] == [f"detections/p{i:03d}.txt"]
    assert not our_temps(str(d)) and snapshot(str(d)) == before


# --------------------------------------------------------------------------------- detection files

GOOD = "".join(f"{x:.4f} {y:.4f}\n" for x, y in golden_lm5()["000002.jpg"])
FILE_CASES = {  # name -> (content, what the message says); None: read fine
    "crlf": (GOOD.replace("\n", "\r\n"), None),
    "tabs_bom": ("\ufeff" + GOOD.replace(" ", "\t"), None),
    "nan": ("nan 1\n" + GOOD.split("\n", 1)[1], "non-finite"),
    "inf": ("1 inf\n" + GOOD.split("\n", 1)[1], "non-finite"),
    "comma": (GOOD.replace(" ", ","), "separated by commas"),
    "comma_space": (GOOD.replace(" ", ", "), "separated by commas"),
    "empty": ("", "empty"),
    "four_lines": ("".join(GOOD.splitlines(True)[:4]), "found 4 line(s)"),
    "three_numbers": (GOOD.replace("\n", " 1\n"), "some without exactly 2 numbers"),
    "words": ("hello world\n" * 5, "non-numeric"),
    "beyond_float32": ("1e39 1\n" * 5, "beyond float32"),
}
ALIGN_CASES = {  # parse fine, cannot be aligned to the 423x594 photo
    "huge": ("".join(f"{float(v) * 1e30:g} {float(w) * 1e30:g}\n" for v, w in (ln.split() for ln in GOOD.splitlines())),
             "outside the 423x594 photo"),
    "negative": ("".join(f"-{ln}\n" for ln in GOOD.replace(" ", " -").splitlines()), "outside the 423x594 photo"),
    "all_equal": ("200 300\n" * 5, "degenerate detection"),
    "nearly_equal": ("".join(f"{200 + 0.1 * i} 300\n" for i in range(5)), "degenerate detection"),
    "far_out": ("".join(f"{v} {w}\n" for v, w in [(100, 300), (110, 300), (105, 310), (100, 320), (900, 300)]),
                "far outside"),
}


def _special_detection_files(det: str) -> dict[str, str]:
    """Entries that are not files where detection files belong; name -> what the message says."""
    os.mkdir(os.path.join(det, "folder.txt"))
    os.mkfifo(os.path.join(det, "fifo.txt"))
    os.symlink("/dev/zero", os.path.join(det, "device.txt"))
    os.symlink("loop.txt", os.path.join(det, "loop.txt"))
    with open(os.path.join(det, "binary.txt"), "wb") as f:
        f.write(bytes(range(256)) * 2)
    with open(os.path.join(det, "latin1.txt"), "wb") as f:
        f.write(GOOD.encode() + b"caf\xe9\n")
    with open(os.path.join(det, "big.txt"), "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB that take no disk
    return {"folder": "a folder", "fifo": "special file", "device": "special file", "loop": "cannot be opened",
            "binary": "binary", "latin1": "not a text file", "big": "too large"}


def test_detection_file_cases_read_or_fail_with_their_reason(tmp_path):
    det = str(tmp_path)
    for name, (text, _) in {**FILE_CASES, **ALIGN_CASES}.items():
        with open(os.path.join(det, name + ".txt"), "w", newline="") as f:
            f.write(text)
    special = _special_detection_files(det)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, (_, says) in FILE_CASES.items():
            path = os.path.join(det, name + ".txt")
            if says is None:
                np.testing.assert_allclose(read_points(path), np.array(golden_lm5()["000002.jpg"]), atol=1e-3)
                continue
            with pytest.raises(DetectionFileError, match=re.escape(says)) as e:
                read_points(path)
            assert path in str(e.value) and "\n" not in str(e.value)
        for name, says in special.items():
            with pytest.raises(DetectionFileError, match=re.escape(says)):
                read_points(os.path.join(det, name + ".txt"))
    assert MAX_POINTS_BYTES < 200 * 1024 * 1024


def test_landmarks_that_cannot_be_aligned_are_named_without_warnings():
    from util.landmarks import flip_y
    from util.preprocess import AlignmentError, align_params, load_lm3d

    lm3d = load_lm3d(os.path.join(ROOT, "BFM"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast" or overflow
        for name, (text, says) in ALIGN_CASES.items():
            lm = np.array([ln.split() for ln in text.splitlines()], np.float64)
            with pytest.raises(AlignmentError, match=re.escape(says)):
                align_params((423, 594), flip_y(lm, 594), lm3d)
        # points close enough to parse and spread, but far too close for a face: enlarged, and said so
        lm = np.array([[200, 300], [202, 300], [201, 301], [200, 302], [202, 302]], np.float64)
        with pytest.raises(AlignmentError, match="would enlarge the 100000x100000 photo"):
            align_params((100000, 100000), lm, lm3d)


@pytest.mark.slow
def test_test_py_on_every_detection_case_and_odd_name(standin, tmp_path, capfd):
    """test.py on a folder holding every detection-file case and the odd names: the good faces
    are reconstructed (under names that round-trip, .obj headers without any name), each bad one
    is a named failure of its own, no RuntimeWarning, exit 1, and a strict UTF-8 terminal is fine."""
    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    fb = os.fsencode(folder)
    det = os.path.join(folder, "detections")
    names = {**FILE_CASES, **ALIGN_CASES}
    for name, (text, _) in names.items():
        shutil.copyfile(os.path.join(folder, "000002.jpg"), os.path.join(folder, name + ".jpg"))
        with open(os.path.join(det, name + ".txt"), "w", newline="") as f:
            f.write(text)
    special = _special_detection_files(det)
    for name in special:
        shutil.copyfile(os.path.join(folder, "000002.jpg"), os.path.join(folder, name + ".jpg"))
    odd = [b"caf\xe9", b"new\nline", b"-dash", b"$(touch x);`id`&|"]
    for n in odd:
        shutil.copyfile(os.path.join(folder, "000002.jpg"), os.path.join(fb, n + b".jpg"))
        shutil.copyfile(os.path.join(det, "000002.txt"), os.path.join(fb, b"detections", n + b".txt"))
    shutil.copyfile(os.path.join(folder, "000002.jpg"), os.path.join(fb, b"nodet\xe9.jpg"))  # no detection file
    before = snapshot(folder), stat_snapshot(folder)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), "--name=standin", "--epoch=20", f"--img_folder={folder}",
           f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
           f"--results_dir={out}", "--device=cpu", "--num_threads=0", "--write_workers=0"]
    r = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=600,  # a strict UTF-8 terminal; warnings fail
                       env=dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONWARNINGS="error::RuntimeWarning"))
    stdout, stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Warning" not in stderr
    good = ["000002"] + [n for n, (_, says) in FILE_CASES.items() if says is None] + [os.fsdecode(n) for n in odd]
    bad = [n for n, (_, says) in names.items() if says is not None] + list(special)
    assert f"done: {len(good)} face(s) reconstructed, {len(bad)} failed, 1 photo(s) skipped" in stdout
    with open(out / "failed_faces.txt", encoding="utf-8") as f:  # more than the summary lists (20)
        failed = f.read().splitlines()
    assert len(failed) == len(bad) and failed[0] in stdout
    for name in bad:
        says = names[name][1] if name in names else special[name]
        assert any(line.startswith(f"{name}: ") and says in line for line in failed), name
    assert "caf\\xe9" not in stdout  # reconstructed, so not listed
    assert f"  {folder}/nodet\\xe9.jpg" in stdout.splitlines()
    files = sorted(os.listdir(os.fsencode(out)))
    expected = [os.fsencode(n) + e for n in good for e in (b".mat", b".obj", b".png")]
    assert files == sorted(expected + [b"failed_faces.txt"])
    with open(os.path.join(os.fsencode(out), b"caf\xe9.obj"), "rb") as f:
        head = f.read(200)
    from util.mesh_io import OBJ_HEADER

    assert head.startswith(OBJ_HEADER) and b"caf" not in head and head.count(b"#") == 1
    assert (snapshot(folder), stat_snapshot(folder)) == before and not os.path.exists(os.path.join(ROOT, "x"))


# ------------------------------------------------------------------- face model and checkpoint files

def _tiny_bfm(folder, **changes) -> str:
    """A BFM folder with the tiny synthetic front model (``changes`` replace its arrays) and the
    standard landmarks."""
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, "BFM", "similarity_Lm3D_all.mat"),
                    os.path.join(folder, "similarity_Lm3D_all.mat"))
    model = tiny_face_model_dict()
    model.update(changes)
    savemat(os.path.join(folder, "BFM_model_front.mat"), model)
    return folder


def _bad_front(kind: str):
    def write(folder):
        _tiny_bfm(folder)
        path = os.path.join(folder, "BFM_model_front.mat")
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write({"truncated": data[:len(data) // 2], "empty": b"", "text": b"meanshape = 1 2 3\n" * 20}[kind])
    return write


def _changed_front(**changes):
    def write(folder):
        _tiny_bfm(folder, **changes)
    return write


def _morphable(truncated_or_missing_exp: str):
    def write(folder):
        _tiny_bfm(folder)
        os.remove(os.path.join(folder, "BFM_model_front.mat"))
        for f in ("BFM_front_idx.mat", "BFM_exp_idx.mat", "facemodel_info.mat", "std_exp.txt"):
            shutil.copyfile(os.path.join(ROOT, "BFM", f), os.path.join(folder, f))
        buf = io.BytesIO()
        savemat(buf, {"shapeMU": np.zeros((300, 1), np.float32), "shapePC": np.zeros((300, 90), np.float32)})
        with open(os.path.join(folder, "01_MorphableModel.mat"), "wb") as f:
            f.write(buf.getvalue()[:700] if truncated_or_missing_exp == "truncated" else buf.getvalue())
        if truncated_or_missing_exp == "truncated":
            with open(os.path.join(folder, "Exp_Pca.bin"), "wb") as f:
                f.write(np.int32(79).tobytes() + b"\0" * 1000)
    return write


def _damaged_lm3d(folder):
    _tiny_bfm(folder)
    with open(os.path.join(folder, "similarity_Lm3D_all.mat"), "wb") as f:
        f.write(b"MATLAB 5.0 MAT-file" + b"\0" * 10)


N = tiny_face_model_dict()["meanshape"].size // 3
F = tiny_face_model_dict()["tri"].shape[0]
MODEL_CASES = {
    "front_truncated": (_bad_front("truncated"), "cannot read"),
    "front_empty": (_bad_front("empty"), "cannot read"),
    "front_text": (_bad_front("text"), "cannot read"),
    "front_wrong_shape": (_changed_front(idBase=np.zeros((3 * N - 3, 80), np.float32)), "'idBase' has shape"),
    "front_missing_key": (_changed_front(tri=np.zeros(0, np.float32)), "'tri' is missing or not a numeric"),
    "front_tri_out_of_range": (_changed_front(tri=np.full((F, 3), N + 1, np.float32)), "'tri' holds indices"),
    "front_tri_zero": (_changed_front(tri=np.zeros((F, 3), np.float32)), "'tri' holds indices from 0"),
    "front_point_buf_out_of_range": (_changed_front(point_buf=np.full((N, 8), F + 2, np.float32)),
                                     "'point_buf' holds indices"),
    "front_keypoints_out_of_range": (_changed_front(keypoints=np.full((1, 68), N + 5, np.float32)),
                                     "'keypoints' holds indices"),
    "front_keypoints_fractional": (_changed_front(keypoints=np.full((1, 68), 1.5, np.float32)), "non-integer"),
    "front_components": (_changed_front(exBase=np.zeros((3 * N, 10), np.float32)), "exp_base has 10 components"),
    "morphable_truncated": (_morphable("truncated"), "01_MorphableModel.mat"),
    "exp_pca_missing": (_morphable("missing"), "Exp_Pca.bin not found"),
    "lm3d_damaged": (_damaged_lm3d, "cannot read the standard landmarks"),
}


def _test_py(tmp_path, bfm, ckpt_dir, name="m") -> tuple[int, str]:
    import test as test_cli

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        code = test_cli.main([f"--name={name}", "--epoch=20", f"--img_folder={folder}", f"--bfm_folder={bfm}",
                              f"--checkpoints_dir={ckpt_dir}", f"--results_dir={tmp_path / 'out'}", "--device=cpu",
                              "--num_threads=0"])
    finally:
        sys.stderr = old
    return code, err.getvalue()


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_damaged_face_model_files_are_one_line_exit_2(tmp_path, standin, case):
    make, says = MODEL_CASES[case]
    bfm = str(tmp_path / "bfm")
    make(bfm)
    code, err = _test_py(tmp_path, bfm, standin["checkpoints_dir"], standin["name"])
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not os.path.exists(tmp_path / "out")


def _evil_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"net_recon": Evil()}, path)


CHECKPOINT_CASES = {
    "code_in_pickle": (lambda p, m: _evil_pickle(p, m), "refused checkpoint"),
    "wrong_shapes": (lambda p, m: torch.save({"net_recon": {"fc.weight": torch.zeros(3)}}, p), "does not fit"),
    "not_a_state_dict": (lambda p, m: torch.save({"net_recon": [1, 2]}, p), "not a state dict"),
    "empty": (lambda p, m: open(p, "wb").close(), "cannot read checkpoint"),
    "text": (lambda p, m: open(p, "w").write("weights\n"), "cannot read checkpoint"),
    "folder": (lambda p, m: os.makedirs(p), "is a folder, not a file"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints_are_one_line_exit_2_and_never_code(tmp_path, standin, case):
    make, says = CHECKPOINT_CASES[case]
    os.makedirs(tmp_path / "ck" / "m")
    marker = tmp_path / "MARKER"
    make(str(tmp_path / "ck" / "m" / "epoch_20.pth"), marker)
    code, err = _test_py(tmp_path, standin["bfm_folder"], str(tmp_path / "ck"))
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not marker.exists()  # the pickle's command never ran
