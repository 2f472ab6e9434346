"""The redesign of issue #17 keeps every output byte for byte.

Runs test.py of the reference commit (the last one before the redesign, taken from this clone's
git history) and the current test.py on the same photos, model and options, on this machine, and
compares every file they write. The only bytes allowed to differ are a .mat file's first 116: its
text header says when it was written.
"""
import filecmp
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_photo_folder

REFERENCE = "741719bcbcc9ec6329330564f3a3d0ed6180a63c"
PHOTOS = ["000002.jpg", "015259.jpg", "JianzhuGuo.jpg", "trump_hillary.jpg", "vd006.png"]
RUNS = {
    "default": [],
    "extras": ["--mesh_format", "ply", "--uv_texture", "true", "--uv_texture_size", "128",
               "--fit_steps", "3"],
}
MAT_HEADER = 116  # "MATLAB 5.0 MAT-file, Platform: ..., Created on: <date>" (padded text)

pytestmark = pytest.mark.slow


def reference_tree(dst: str) -> str:
    """The reference commit's files in ``dst`` (skips when this checkout has no git history)."""
    ok = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{REFERENCE}^{{commit}}"],
                        capture_output=True).returncode == 0
    if not ok:
        pytest.skip(f"commit {REFERENCE[:7]} is not in this checkout's history (a clone without it)")
    os.makedirs(dst)
    archive = subprocess.run(["git", "-C", ROOT, "archive", REFERENCE], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dst], input=archive.stdout, check=True)
    return dst


def run_test_py(tree: str, standin: dict, photos: str, out: str, extra: list[str]) -> None:
    cmd = [sys.executable, "test.py", "--name", standin["name"], "--epoch", "20",
           "--checkpoints_dir", standin["checkpoints_dir"], "--bfm_folder", standin["bfm_folder"],
           "--img_folder", photos, "--results_dir", out, "--device", "cpu", *extra]
    # one thread: with several, two runs of the same code once differed in one byte of a fitted
    # .mat (--fit_steps) on the loaded machine; parallel sums may add in another order
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{tree}: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


def listing(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def assert_same_files(old: str, new: str) -> None:
    names = listing(old)
    assert names == listing(new)
    assert any(n.endswith(".mat") for n in names) and any(n.endswith(".png") for n in names)
    for name in names:
        a, b = os.path.join(old, name), os.path.join(new, name)
        if name.endswith(".mat"):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                da, db = fa.read(), fb.read()
            assert da[:10] == db[:10] == b"MATLAB 5.0"
            assert da[MAT_HEADER:] == db[MAT_HEADER:], name
        else:
            assert filecmp.cmp(a, b, shallow=False), name


@pytest.mark.parametrize("run", sorted(RUNS))
def test_outputs_are_byte_for_byte_those_of_the_reference_commit(tmp_path, standin, run):
    old_tree = reference_tree(str(tmp_path / "reference"))
    photos = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    run_test_py(old_tree, standin, photos, old, RUNS[run])
    run_test_py(ROOT, standin, photos, new, RUNS[run])
    assert_same_files(old, new)
