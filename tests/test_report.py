"""test.py --report: the per-face files, index.html, and the page in a real headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from util import report
from util.results_io import FaceResult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWER_BG = (32, 36, 42)  # the viewer canvas's clear colour (#20242a)


def fake_face(name: str, rel_dir: str = "", shift: float = 0.0) -> FaceResult:
    """A face whose 68 landmarks put their 5 points (util.landmarks.lm68_to_5) ``shift`` px right
    of the detected ones."""
    lm68 = np.zeros((68, 2), np.float32)
    lm_gt = np.array([[80, 120], [140, 120], [112, 90], [90, 60], [134, 60]], np.float32)
    lm68[36:42], lm68[42:48] = lm_gt[0], lm_gt[1]  # eyes: their means
    lm68[30], lm68[48], lm68[54] = lm_gt[2], lm_gt[3], lm_gt[4]
    lm68[:, 0] += shift
    rng = np.random.default_rng(0)
    coeffs = np.zeros(257, np.float32)
    coeffs[224:227] = np.radians([10.0, -20.0, 5.0])
    return FaceResult(name=name, rel_dir=rel_dir, coeffs=coeffs, lm68=lm68, lm_gt=lm_gt,
                      vertex=rng.normal(size=(6, 3)).astype(np.float32),
                      color=rng.integers(0, 256, (6, 3)).astype(np.uint8),
                      image=np.full((3, 224, 224), 90, np.uint8), overlay=np.full((224, 224, 3), 200, np.uint8),
                      arrays={"photo_error": np.float32(12.5)})


def write_fake_run(out: str) -> None:
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    for res in (fake_face("a&b", shift=3.0), fake_face("c", "sub", shift=0.0)):
        report.write_face_report(out, res, res.vertex, res.coeffs[224:227], faces)


def test_face_files_and_numbers(tmp_path):
    out = str(tmp_path)
    write_fake_run(out)
    top = tmp_path / "report"
    assert sorted(os.listdir(top)) == ["a&b.json", "a&b.mesh.js", "a&b.png", "sub", "triangles.js"]
    numbers = json.loads((top / "a&b.json").read_text())
    assert numbers["lm5_error_px"] == pytest.approx(3.0)
    assert (numbers["pitch_deg"], numbers["yaw_deg"], numbers["roll_deg"]) == pytest.approx((10, -20, 5))
    assert numbers["photo_error"] == 12.5
    from PIL import Image

    thumb = np.asarray(Image.open(top / "a&b.png"))
    assert thumb.shape == (112, 224, 3) and (thumb[:, :112] == 90).all() and (thumb[:, 112:] == 200).all()
    script = (top / "sub" / "c.mesh.js").read_text()
    data = json.loads(re.match(r'D3DFR\.mesh\("sub/c", (.*)\);\n$', script).group(1))
    import base64

    q = np.frombuffer(base64.b64decode(data["p"]), "<i2").reshape(-1, 3)
    res = fake_face("c")
    np.testing.assert_allclose(np.array(data["centre"]) + q * data["scale"], res.vertex, atol=2 * data["scale"])


def test_index_lists_faces_and_failures_and_says_how_to_get_the_viewer(tmp_path, monkeypatch):
    out = str(tmp_path)
    write_fake_run(out)
    monkeypatch.setattr(report, "VENDOR_DIR", str(tmp_path / "no-vendor"))
    path, viewer = report.write_report(out, [("x.jpg", "could not read <x>")], ["y.jpg"])
    page = open(path, encoding="utf-8").read()
    assert not viewer and path == os.path.join(out, "index.html")
    assert page.count('<figure class="face"') == 2 and 'data-key="a&amp;b"' in page
    assert 'src="report/a%26b.png"' in page and 'src="report/sub/c.png"' in page
    assert "<b>x.jpg</b>: could not read &lt;x&gt;" in page and "<li>y.jpg</li>" in page
    assert "tools/vendor_viewer.sh" in page and "three.min.js" not in page
    assert "2 face(s) reconstructed, 1 failed, 1 photo(s) skipped" in page and "1.50 px" in page


# --------------------------------------------------------------------------- end to end
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
                           "--enable-unsafe-swiftshader", "--window-size=1200,900", "--virtual-time-budget=10000",
                           "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_end_to_end_in_chromium(standin, tmp_path, capsys):
    """test.py --mesh_format glb --uv_texture --report on two photos (one more without a detection):
    every file is there; then index.html in headless Chromium: no console messages from the page,
    two thumbnails, and the viewer's screenshot shows the mesh."""
    trimesh = pytest.importorskip("trimesh")
    from tests.conftest import make_photo_folder
    from tests.test_inference import run

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    shutil.copyfile(os.path.join(ROOT, "examples", "015259.jpg"), os.path.join(folder, "nodet.jpg"))
    out = str(tmp_path / "out")
    args = ("--mesh_format", "glb", "--uv_texture", "--report", "--save_mat", "false")
    assert run(standin, folder, out, *args) == 0
    printed = capsys.readouterr().out
    assert f"report: {os.path.join(out, 'index.html')}" in printed
    for stem in ("000002", "vd006"):
        assert {f"{stem}.glb", f"{stem}_texture.png", f"{stem}.png"} <= set(os.listdir(out))
        mesh = trimesh.load(os.path.join(out, f"{stem}.glb"), process=False, force="mesh")
        assert mesh.vertices.shape == (35709, 3) and mesh.visual.uv.shape == (35709, 2)
    numbers = report.read_face_numbers(out)
    assert [r["name"] for r in numbers] == ["000002", "vd006"]
    assert all(0 <= r["lm5_error_px"] < 50 and abs(r["yaw_deg"]) < 90 for r in numbers)
    assert run(standin, folder, out, *args, "--skip_existing", "true") == 0  # the new suffixes count as done
    assert "2 face(s) left out" in capsys.readouterr().out

    index = os.path.join(out, "index.html")
    if chromium() is None:
        pytest.skip("no chromium (Debian package 'chromium') to load the report in")
    if not os.path.isfile(os.path.join(out, "report", "vendor", "three.min.js")):
        pytest.skip("three.js is not vendored (run tools/vendor_viewer.sh)")
    url = "file://" + index
    dom = run_chromium(url, "--dump-dom")
    assert dom.stdout.count('<figure class="face') == 2 and dom.stdout.count('.png" alt=') == 2
    assert 'data-viewer-shown="000002"' in dom.stdout  # the viewer drew the first face's mesh
    shot = str(tmp_path / "shot.png")
    res = run_chromium(url, f"--screenshot={shot}")
    console = [line for line in (dom.stderr + res.stderr).splitlines()
               if ":CONSOLE" in line and "GL Driver Message" not in line]  # SwiftShader's notes on readPixels
    assert console == []
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    bg = (np.abs(img - VIEWER_BG).sum(-1) <= 3)
    ys, xs = np.nonzero(bg)
    box = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.shape[0] > 300 and box.shape[1] > 300  # the 420 x 420 canvas
    mesh_pixels = (np.abs(box - VIEWER_BG).sum(-1) > 30).mean()
    assert mesh_pixels > 0.2  # the face covers a good part of the viewer


def test_terminal_says_how_to_install_the_viewer(tmp_path, monkeypatch, capsys):
    import test as test_cli
    from pipeline.summary import RunSummary

    write_fake_run(str(tmp_path))
    monkeypatch.setattr(report, "VENDOR_DIR", str(tmp_path / "no-vendor"))
    test_cli.write_report_page(RunSummary(out_dir=str(tmp_path), faces_ok=2))
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"report: {tmp_path / 'index.html'}",
                       "report: no 3D viewer (three.js is not vendored): run tools/vendor_viewer.sh, then --report again"]


def test_bad_texture_size_stops_the_run(standin, tmp_path, capsys):
    from tests.test_inference import run

    assert run(standin, str(tmp_path), str(tmp_path / "out"), "--uv_texture", "--uv_texture_size", "4") == 2
    assert "--uv_texture_size 4: give a side between 16 and 8192 pixels" in capsys.readouterr().err


def test_a_run_that_reconstructs_nothing_writes_no_page(standin, tmp_path, capsys):
    """--report with no face reconstructed: no index.html and no results folder left behind."""
    from tests.conftest import make_photo_folder
    from tests.test_inference import run

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"], with_detections=False)
    out = tmp_path / "out"
    assert run(standin, folder, str(out), "--report") == 1
    assert not out.exists() and "report:" not in capsys.readouterr().out


def test_a_page_that_cannot_hold_a_name_is_one_warning(tmp_path, monkeypatch, capsys):
    """A failure naming a file whose bytes are not UTF-8: the page's trouble is one warning line."""
    import test as test_cli
    from pipeline.summary import RunSummary

    write_fake_run(str(tmp_path))
    name = os.fsdecode(b"caf\xe9")

    def cannot(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", name, 3, 4, "surrogates not allowed")

    monkeypatch.setattr(report, "write_report", cannot)
    test_cli.write_report_page(RunSummary(out_dir=str(tmp_path), faces_ok=2, failures=[(name, "bad")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not write the report: ")
    err[0].encode("utf-8")  # printable on any terminal


def test_a_name_that_is_not_utf8_is_escaped_on_the_page_and_its_files_found(tmp_path):
    """A photo name with a Latin-1 byte: the page shows it as \\xNN, links its files by their exact
    bytes, and the viewer's key is the same escaped text; the page is valid UTF-8."""
    name = os.fsdecode(b"caf\xe9")
    res = fake_face(name)
    report.write_face_report(str(tmp_path), res, res.vertex, res.coeffs[224:227], np.array([[0, 1, 2]]))
    path, _ = report.write_report(str(tmp_path), [(name, "bad")], [os.fsdecode(b"x\xff.jpg")])
    page = open(path, "rb").read().decode("utf-8")
    assert 'data-key="caf\\xe9"' in page and 'src="report/caf%E9.png"' in page
    assert "x\\xff.jpg" in page and "<b>caf\\xe9</b>: bad" in page
    assert os.path.isfile(os.path.join(os.fsencode(str(tmp_path)), b"report", b"caf\xe9.png"))
    script = open(os.path.join(os.fsencode(str(tmp_path)), b"report", b"caf\xe9.mesh.js"), "rb").read().decode()
    assert script.startswith('D3DFR.mesh("caf\\\\xe9", ')


@pytest.mark.parametrize("flags, sub, flag", [(("--recursive", "true", "--report", "true"), "report", "--report"),
                                              (("--group_by", "folder"), "image_sets", "--group_by")])
def test_a_photo_subfolder_named_like_the_runs_own_folder_is_refused_before_any_work(
        standin, tmp_path, capsys, flags, sub, flag):
    """A photo sub-folder report/ (--recursive --report) or image_sets/ (--group_by folder) would
    put its results into the report's or the people's own folder: one line, exit 2, nothing written."""
    from tests.conftest import make_photo_folder
    from tests.test_inference import run

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    make_photo_folder(os.path.join(folder, sub), ["000006.jpg"])
    out = tmp_path / "out"
    assert run(standin, folder, str(out), *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {os.path.join(folder, sub)}: a photo sub-folder named {sub!r} would put its results "
                   f"into the results folder's {sub}/, where {flag} writes its own files; rename that sub-folder "
                   f"(or leave out {flag})"]
    assert not out.exists()
    assert report.REPORT_DIR == "report"
    from pipeline.image_sets import SETS_DIR
    assert SETS_DIR == "image_sets"  # the check names it without importing torch's module


def test_a_report_subfolder_is_fine_without_recursive_or_report(tmp_path):
    """Only --recursive with --report (or --group_by folder) meets the collision."""
    from types import SimpleNamespace

    from options.feature_options import feature_inputs_error

    (tmp_path / "report").mkdir()
    (tmp_path / "image_sets").mkdir()

    def error(**kw):
        o = dict(video="", group_by="", recursive=False, report=False, img_folder=str(tmp_path))
        return feature_inputs_error(SimpleNamespace(**{**o, **kw}))

    assert error(report=True) is None and error(recursive=True) is None
    assert error(recursive=True, group_by="") is None
    assert "'report'" in error(recursive=True, report=True)
    assert "'image_sets'" in error(group_by="folder")


def test_skip_existing_redoes_a_face_whose_report_files_are_missing(standin, tmp_path, capsys):
    """--skip_existing --report: a face is done only with its report files (report/<rel_dir>/<name>
    .png/.mesh.js/.json) too; a resumed run redoes the face that lacks one and leaves the other."""
    from tests.conftest import make_photo_folder
    from tests.test_inference import run

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    out = str(tmp_path / "out")
    args = ("--report", "true", "--save_mat", "false", "--save_png", "false")
    assert run(standin, folder, out, *args) == 0
    assert sorted(os.listdir(os.path.join(out, "report"))) == [
        "000002.json", "000002.mesh.js", "000002.png", "triangles.js", "vd006.json", "vd006.mesh.js", "vd006.png",
        "vendor", "viewer.js"]
    os.remove(os.path.join(out, "report", "vd006.mesh.js"))  # as a run killed between a face's files would
    capsys.readouterr()
    assert run(standin, folder, out, *args, "--skip_existing", "true") == 0
    printed = capsys.readouterr().out
    assert "1 face(s) reconstructed" in printed and "1 face(s) left out" in printed
    assert os.path.isfile(os.path.join(out, "report", "vd006.mesh.js"))
    from pipeline.outputs import output_files
    from pipeline.settings import OutputSpec

    assert output_files(OutputSpec(save_mat=False, report=True)) == [
        ("", ".png"), ("", ".obj"), ("report", ".png"), ("report", ".mesh.js"), ("report", ".json")]
