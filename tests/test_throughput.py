"""Throughput work (issue 5) changes nothing in the results: faster paths against the plain ones."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, FACES, golden_lm5
from util.image_io import load_image
from util.landmarks import flip_y
from util.preprocess import align_img, image_to_array, load_lm3d, pil_vertical_first, resize_crop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BICUBIC = Image.Resampling.BICUBIC


# ----------------------------------------------------------------------------- alignment crop
@pytest.fixture(scope="module")
def lm3d():
    return load_lm3d(os.path.join(ROOT, "BFM"))


def full_resize_crop(img, size, box):
    """The original's way: resize the whole photo, then crop (black outside)."""
    return img.resize(size, resample=BICUBIC).crop(box)


@pytest.mark.parametrize("name", sorted(golden_lm5()))
def test_resize_crop_is_the_full_resize_on_every_test_photo(name, lm3d):
    img = load_image(os.path.join(FACES, name))
    tr, crop, _ = align_img(img, flip_y(np.array(golden_lm5()[name], np.float32), img.size[1]), lm3d)
    box = (tr.left, tr.up, tr.left + 224, tr.up + 224)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(full_resize_crop(img, (tr.w, tr.h), box)))
    golden = json.load(open(os.path.join(DATA, "align_golden.json")))
    if name in golden:  # the original implementation's crop
        import hashlib

        assert hashlib.sha256(np.asarray(crop).tobytes()).hexdigest() == golden[name]["crop_sha256"]


def test_resize_crop_synthetic_cases():
    """Random sizes, up- and downscaling, equal sides, 1-pixel photos, crops partly or wholly
    outside the resized photo; both of Pillow's pass orders."""
    rng = np.random.default_rng(1)
    orders = set()
    for t in range(400):
        w0, h0 = (int(x) for x in rng.integers(1, 300, 2))
        if t % 10 == 0:
            w0 = int(rng.integers(1, 4))
        if t % 17 == 0:
            h0 = int(rng.integers(1, 4))
        img = Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
        s = 1.0 if t % 7 == 0 else float(np.exp(rng.uniform(np.log(0.05), np.log(8))))
        w, h = max(1, int(w0 * s)), max(1, int(h0 * s))
        w = w0 if t % 11 == 0 else w
        h = h0 if t % 13 == 0 else h
        n = int(rng.choice([1, 5, 64, 224]))
        left, up = int(rng.integers(-n - 5, w + 5)), int(rng.integers(-n - 5, h + 5))
        box = (left, up, left + n, up + n)
        orders.add(pil_vertical_first(w0, h0, w, h))
        np.testing.assert_array_equal(np.asarray(resize_crop(img, (w, h), box)),
                                      np.asarray(full_resize_crop(img, (w, h), box)), err_msg=str((w0, h0, w, h, box)))
    if pil_vertical_first(100, 400, 50, 200):  # Pillow 13: both pass orders were exercised
        assert orders == {False, True}


def test_resize_crop_tall_photo_both_orders():
    """A tall photo scaled down runs Pillow 13's vertical pass first; a wide one does not."""
    rng = np.random.default_rng(2)
    for w0, h0 in ((120, 600), (600, 120)):
        img = Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
        for box in ((10, 40, 74, 104), (-20, -20, 44, 44), (50, 250, 114, 314)):
            np.testing.assert_array_equal(np.asarray(resize_crop(img, (w0 // 2, h0 // 2), box)),
                                          np.asarray(full_resize_crop(img, (w0 // 2, h0 // 2), box)))


def test_resize_crop_of_a_grey_photo_is_the_full_resize():
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 70), dtype=np.uint8))
    out = resize_crop(img, (40, 50), (-3, 4, 30, 40))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full_resize_crop(img, (40, 50), (-3, 4, 30, 40))))


def test_unknown_pillow_falls_back_to_the_full_resize(monkeypatch):
    import PIL

    monkeypatch.setattr(PIL, "__version__", "99.0.0")
    assert pil_vertical_first(100, 400, 50, 200) is None
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 60, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(resize_crop(img, (40, 50), (3, 4, 30, 40))),
                                  np.asarray(full_resize_crop(img, (40, 50), (3, 4, 30, 40))))


def test_pillow_12_2_pass_order(monkeypatch):
    """Pillow 12.2-12.x: horizontal pass first (as <= 12.1) except photos over 100x taller than
    wide, whose Python-level vertical step is left to the full resize."""
    import PIL

    for version in ("12.2.0", "12.3.1"):
        monkeypatch.setattr(PIL, "__version__", version)
        assert pil_vertical_first(100, 400, 50, 200) is False  # Pillow 13 would go vertical first
        assert pil_vertical_first(1920, 1080, 480, 270) is False
        assert pil_vertical_first(10, 1001, 5, 500) is None


# ----------------------------------------------------------------------------- uint8 crops
def test_uint8_crops_convert_to_the_original_floats():
    from data.image_folder import images_to_float
    from util.preprocess import unit_float_table

    every = np.arange(256, dtype=np.uint8)
    assert unit_float_table().dtype == np.float32
    np.testing.assert_array_equal(unit_float_table(), (every / 255.0).astype(np.float32))
    crop = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    u8 = torch.from_numpy(np.asarray(crop).transpose(2, 0, 1).copy())[None]
    out = images_to_float(u8)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(out[0].numpy(), image_to_array(crop))


def test_colors_to_uint8_on_device_matches_numpy():
    from pipeline.render import colors_to_uint8 as on_device
    from util.mesh_io import colors_to_uint8

    rng = np.random.default_rng(4)
    c = np.concatenate([rng.uniform(-0.5, 1.5, (5000, 3)), (np.arange(256)[:, None] / 255.0).repeat(3, 1),
                        np.nextafter(np.arange(256)[:, None] / 255.0, 2).repeat(3, 1)]).astype(np.float32)
    np.testing.assert_array_equal(on_device(torch.from_numpy(c)).numpy(), colors_to_uint8(c))


# ----------------------------------------------------------------------------- .obj formatting
def reference_obj(v, f, c) -> bytes:
    """The .obj bytes from the general per-column formatter (format_fixed), row by row."""
    from util.mesh_io import OBJ_HEADER, format_fixed

    def cols(arrays):
        blocks = [format_fixed(a) for a in arrays]
        return [b"".join(b" " + bytes(b[i]) for b in blocks) for i in range(len(arrays[0]))]

    lines = [b"v" + row + b"\n" for row in cols([v[:, 0], v[:, 1], v[:, 2]] +
                                                 ([] if c is None else [c[:, k] / 255.0 for k in range(3)]))]
    fi = f + 1
    widths = [len(str(fi[:, k].max())) for k in range(3)]
    lines += [b"f" + b"".join(b" " + str(x).rjust(wd).encode() for x, wd in zip(row, widths)) + b"\n" for row in fi]
    return OBJ_HEADER + b"".join(lines)


@pytest.mark.parametrize("scale", [1.0, 0.01, 300.0, 5000.0])
def test_obj_fast_paths_match_the_general_formatter(tmp_path, scale):
    from util.mesh_io import colors_to_uint8, face_lines, write_obj

    rng = np.random.default_rng(int(scale * 7))
    v = (rng.normal(size=(300, 3)) * scale).astype(np.float32).astype(np.float64)
    v[:6] = [[-4e-9, 0.5e-8, 99.999999996], [-0.0, 0.0, 999.999999996], [-999.99999999, 1e-8, -1e-8],
             [0.123456785, 0.123456775, -0.5], [1, 2, 3], [-1, -2, -3]]
    f = rng.integers(0, 300, size=(500, 3))
    c = colors_to_uint8(rng.uniform(-0.2, 1.2, size=(300, 3)))
    c[:3] = [[0, 255, 128], [255, 255, 255], [0, 0, 0]]
    for colors in (c, None):
        write_obj(str(tmp_path / "a.obj"), v, f, colors)
        write_obj(str(tmp_path / "b.obj"), v, face_lines(f), colors)
        ref = reference_obj(v, f, colors)
        assert (tmp_path / "a.obj").read_bytes() == ref
        assert (tmp_path / "b.obj").read_bytes() == ref


# ----------------------------------------------------------------------------- writers
def tiny_results(n: int, rng) -> list:
    from util.results_io import FaceResult

    return [FaceResult(name=f"face{i:02d}", rel_dir="sub" if i % 2 else "",
                       coeffs=rng.normal(size=257).astype(np.float32),
                       lm68=rng.uniform(0, 223, (68, 2)).astype(np.float32),
                       vertex=rng.normal(size=(40, 3)).astype(np.float32),
                       color=rng.integers(0, 256, (40, 3), dtype=np.uint8),
                       image=rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
                       overlay=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                       lm_gt=rng.uniform(0, 223, (5, 2)).astype(np.float32)) for i in range(n)]


def tiny_config(out_dir: str):
    from models.coeffs import COEFFS
    from util.mesh_io import face_lines
    from util.results_io import OutputConfig, mat_files, obj_files, png_files

    tri = np.random.default_rng(0).integers(0, 40, (60, 3))
    return OutputConfig(out_dir=out_dir, files=(png_files, obj_files, mat_files), coeff_slices=tuple((k, s.start, s.stop) for k, s in COEFFS.slices().items()),
                        face_lines=face_lines(tri))


def read_all(folder) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            data = open(os.path.join(d, f), "rb").read()
            out[os.path.relpath(os.path.join(d, f), folder)] = data[116:] if f.endswith(".mat") else data
    return out  # .mat: the 116-byte header holds the creation time


def test_writer_processes_write_what_the_main_process_writes(tmp_path):
    from util.results_io import ResultWriter

    results = tiny_results(7, np.random.default_rng(5))
    outcomes = {}
    for workers in (0, 2):
        w = ResultWriter(tiny_config(str(tmp_path / f"w{workers}")), workers=workers, max_pending=3, chunk=2)
        w.start()
        got = w.submit(results[:4])
        assert w._n_pending <= 3  # bounded in-flight work: memory stays flat
        got += w.submit(results[4:])
        assert w._n_pending <= 3
        got += w.finish()
        outcomes[workers] = got
    assert outcomes[0] == outcomes[2] == [(r.name, None) for r in results]  # every face, in order
    a, b = read_all(tmp_path / "w0"), read_all(tmp_path / "w2")
    assert len(a) == 21 and a == b
    assert not [f for f in a if f.endswith(".part")]


def test_writer_processes_do_not_rerun_the_callers_script(tmp_path):
    """Python re-runs the main script in forkserver/spawn children; the writers must not (a script
    importing torch at its top would cost every writer seconds)."""
    import subprocess

    marker = tmp_path / "executions.txt"
    script = tmp_path / "caller.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from util.results_io import OutputConfig, ResultWriter\n"
        "if __name__ == '__main__':\n"
        f"    w = ResultWriter(OutputConfig(out_dir={str(tmp_path / 'out')!r}), workers=2)\n"
        "    w.start()\n"
        "    assert w._pool.submit(os.getpid).result() != os.getpid()  # a writer process ran it\n"
        "    w.finish()\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    assert marker.read_text().split() == ["__main__"]


def test_main_module_hidden_restores_main_even_on_errors():
    from util.subprocesses import main_module_hidden

    main = sys.modules["__main__"]
    with pytest.raises(RuntimeError):
        with main_module_hidden():
            assert sys.modules["__main__"] is not main and not hasattr(sys.modules["__main__"], "__file__")
            raise RuntimeError("boom")
    assert sys.modules["__main__"] is main


def test_writer_reports_each_failed_face(tmp_path):
    from util.results_io import ResultWriter

    (tmp_path / "blocked").write_text("a file where the sub-folder should be")
    results = tiny_results(3, np.random.default_rng(6))
    for r in results:
        r.rel_dir = "blocked" if r.name == "face01" else ""
    for workers in (0, 2):
        w = ResultWriter(tiny_config(str(tmp_path)), workers=workers)
        got = w.submit(results) + w.finish()
        assert [n for n, e in got if e is None] == ["face00", "face02"]
        (name, err), = [(n, e) for n, e in got if e is not None]
        assert name == "face01" and err.startswith("writing results failed:")


def test_writer_survives_a_dead_writer_process(tmp_path):
    from util.results_io import ResultWriter

    results = tiny_results(6, np.random.default_rng(7))
    w = ResultWriter(tiny_config(str(tmp_path / "out")), workers=2, max_pending=100)
    got = w.submit(results[:2])
    got += w._drain(0)  # the pool has started and written two faces
    for p in list(w._pool._processes.values()):
        p.kill()
        p.join()
    got += w.submit(results[2:]) + w.finish()  # written in this process instead
    assert got == [(r.name, None) for r in results]
    assert len(read_all(tmp_path / "out")) == 18


def test_default_batch_size_by_device():
    from pipeline.workers import default_batch_size

    assert default_batch_size(torch.device("cpu")) == 8
    assert default_batch_size(torch.device("cuda", 1)) == 64  # no GPU needed to ask


def test_worker_counts(monkeypatch):
    from pipeline import workers

    monkeypatch.setattr(workers, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers.loader_workers(-1, 10_000, 64) == 15
    assert workers.loader_workers(-1, 10_000, 64, world=2) == 7
    assert workers.loader_workers(-1, 64, 64) == 0  # one batch: decoded in the main process
    assert workers.loader_workers(-1, 100, 8) == 13 and workers.loader_workers(4, 100, 8) == 4
    assert workers.writer_workers(-1, 10_000) == 16
    assert workers.writer_workers(-1, 32) == 0  # small runs write in the main process
    assert workers.writer_workers(3, 2) == 2 and workers.writer_workers(0, 10_000) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert workers.writer_workers(-1, 10_000, world=8) == 4


def test_run_with_processes_equals_run_in_the_main_process(standin, tmp_path):
    """test.py with DataLoader workers and writer processes writes byte-identical files."""
    from conftest import make_photo_folder

    import test as test_cli

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png", "trump_hillary.jpg"])
    base = [f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}", "--device=cpu",
            f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
            "--batch_size=2"]
    assert test_cli.main(base + [f"--results_dir={tmp_path / 'a'}", "--num_threads=0", "--write_workers=0"]) == 0
    assert test_cli.main(base + [f"--results_dir={tmp_path / 'b'}", "--num_threads=2", "--write_workers=2"]) == 0
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert len(a) == 9 and a == b


# ----------------------------------------------------------------------------- start-up
def test_face_model_cache_holds_the_same_arrays(tmp_path, tiny_model_dict):
    from scipy.io import loadmat, savemat

    from models.bfm import load_front_model
    from util.mat_cache import cache_path

    savemat(str(tmp_path / "BFM_model_front.mat"), tiny_model_dict)
    path = str(tmp_path / "BFM_model_front.mat")
    ref = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    first = load_front_model(str(tmp_path))  # reads the .mat, writes the cache
    assert os.path.isfile(cache_path(path)) and cache_path(path).endswith("BFM_model_front.cache.npz")
    cached = load_front_model(str(tmp_path))
    for m in (first, cached):
        assert set(ref) <= set(m)
        for k in ref:
            assert m[k].dtype == ref[k].dtype and m[k].shape == ref[k].shape and np.array_equal(m[k], ref[k]), k
    assert set(cached) == set(ref)

    # a new .mat (other size / time) makes a new cache
    changed = dict(tiny_model_dict, meantex=tiny_model_dict["meantex"] + 1)
    savemat(path, changed)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    np.testing.assert_array_equal(load_front_model(str(tmp_path))["meantex"], changed["meantex"])
    np.testing.assert_array_equal(load_front_model(str(tmp_path))["meantex"], changed["meantex"])

    # a damaged cache is ignored (and rebuilt)
    with open(cache_path(path), "r+b") as f:
        f.truncate(100)
    np.testing.assert_array_equal(load_front_model(str(tmp_path))["meantex"], changed["meantex"])
    assert os.path.getsize(cache_path(path)) > 100


def test_face_model_cache_in_a_read_only_folder(tmp_path, tiny_model_dict, monkeypatch):
    from scipy.io import savemat

    from models import bfm
    from util import mat_cache

    savemat(str(tmp_path / "BFM_model_front.mat"), tiny_model_dict)

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("util.atomic_files.temp_path", refuse)  # the cache's temporary file cannot be made
    m = bfm.load_front_model(str(tmp_path))
    assert not os.path.exists(mat_cache.cache_path(str(tmp_path / "BFM_model_front.mat")))
    np.testing.assert_array_equal(m["tri"], tiny_model_dict["tri"])


def fake_nvdiffrast(monkeypatch, version="0.3.3.1"):
    import types

    pkg, sub, ops = (types.ModuleType(n) for n in ("nvdiffrast", "nvdiffrast.torch", "nvdiffrast.torch.ops"))
    pkg.__version__, pkg.torch, sub.ops = version, sub, ops
    pkg.__path__, sub.__path__ = [], []
    ops._cached_plugin = {}
    for name, mod in (("nvdiffrast", pkg), ("nvdiffrast.torch", sub), ("nvdiffrast.torch.ops", ops)):
        monkeypatch.setitem(sys.modules, name, mod)
    return ops


def test_nvdiffrast_plugin_fast_path(monkeypatch, tmp_path):
    """A built plugin goes straight into nvdiffrast's plugin cache; without a build, or for another
    nvdiffrast version, the cache is left to nvdiffrast's own loader."""
    from models.renderer import nvdiffrast_backend as nb

    ops = fake_nvdiffrast(monkeypatch)
    name = nb.plugin_module_name("0.3.3.1", torch.__version__, gl=False)
    assert name.startswith("nvdiffrast_plugin_0_3_3_1_torch") and "." not in name and "+" not in name
    plugin = tmp_path / f"{name}.py"  # a stand-in for the built .so
    plugin.write_text("LOADED = True\n")
    monkeypatch.setattr(nb, "_plugin_file", lambda n: str(plugin) if n == name else None)
    monkeypatch.delitem(sys.modules, name, raising=False)

    assert nb.preload_plugins("opengl") is False  # the '_gl' plugin is not built
    assert ops._cached_plugin[False].LOADED and True not in ops._cached_plugin
    assert sys.modules[name] is ops._cached_plugin[False]
    assert nb.preload_plugins("cuda") is True  # already cached: nothing to do

    ops = fake_nvdiffrast(monkeypatch, version="0.4.0")
    assert nb.preload_plugins("cuda") is False and ops._cached_plugin == {}

    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('undefined symbol')\n")
    ops = fake_nvdiffrast(monkeypatch)
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(nb, "_plugin_file", lambda n: str(broken))
    assert nb.preload_plugins("cuda") is False and ops._cached_plugin == {}
    assert nb.warm_up("cuda") is False  # never raises


def test_plugin_file_is_where_torch_builds_it(monkeypatch, tmp_path):
    from models.renderer import nvdiffrast_backend as nb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert nb._plugin_file("nvdiffrast_plugin_x") is None  # (torch creates the empty folder, as for nvdiffrast)
    (tmp_path / "nvdiffrast_plugin_x").mkdir(exist_ok=True)
    (tmp_path / "nvdiffrast_plugin_x" / "nvdiffrast_plugin_x.so").write_bytes(b"")
    assert nb._plugin_file("nvdiffrast_plugin_x") == str(tmp_path / "nvdiffrast_plugin_x" / "nvdiffrast_plugin_x.so")


def test_multi_gpu_bench_run_parses_the_summary_and_samples_the_cpus(tmp_path):
    """bench_multi_gpu's test.py runner: test.py's printed run time and summary, the wall time,
    the CPUs' busy share sampled from /proc/stat while the command ran (a share in 0..1), and the
    run's timeline from its log."""
    from benchmarks.bench_multi_gpu import cpu_times, run, test_py_runner

    script = ("import sys, time; time.sleep(0.3); print('done: 3 face(s) reconstructed, 0 failed, 0 skipped (1.5 s)'); "
              "print('INFO: run timeline: scanned 0.01 s, first_crops 0.75 s, written 1.49 s', file=sys.stderr)")
    secs, wall, line, busy, timeline = test_py_runner([sys.executable, "-c", script], [])(3, str(tmp_path),
                                                                                           str(tmp_path))
    assert secs == 1.5 and line.startswith("done: 3 face(s)") and wall >= 0.3
    assert timeline == {"scanned": 0.01, "first_crops": 0.75, "written": 1.49}
    if cpu_times() is not None:
        assert busy is not None and 0.0 <= busy <= 1.0
    with pytest.raises(SystemExit, match="failed \\(3\\)"):
        run([[sys.executable, "-c", "import sys; sys.exit(3)"]])


def test_multi_gpu_bench_rates_between_sizes_and_within_a_run(tmp_path):
    """measure(): end to end = N / run time; steady = the marginal rate between the two sizes;
    after the first results = N / (last batch - first result) of the larger run's timeline."""
    from benchmarks.bench_multi_gpu import measure

    runs = {800: (10.0, {"first_result": 2.0, "last_batch": 9.9}), 200: (4.0, {"first_result": 1.5, "last_batch": 3.9})}
    fake = lambda n, folder, res: (runs[n][0], runs[n][0] + 1, "done", None, runs[n][1])  # noqa: E731
    out = measure("x", fake, {800: "a", 200: "b"}, str(tmp_path))
    assert out["images_per_s"] == 80.0
    assert out["steady_images_per_s"] == 600 / 6.0
    assert out["after_first_result_images_per_s"] == 800 / 7.9
    runs[800] = (10.0, {})  # no timeline (a test.py without --verbose's log): no such rate
    assert measure("x", fake, {800: "a", 200: "b"}, str(tmp_path))["after_first_result_images_per_s"] is None


def test_file_writes_bench_writes_every_file_whole_and_cleans_up(tmp_path):
    """bench_file_writes: K processes write N files (renamed into place) into one folder; the case
    counts them all, reports positive rates and removes its folder."""
    from benchmarks.bench_file_writes import PAYLOAD, _writer, write_case

    r = write_case(str(tmp_path), 3, 40)
    assert r["files"] == 40 and r["procs"] == 3
    assert r["files_per_s"] > 0 and r["first_half_files_per_s"] > 0 and r["second_half_files_per_s"] > 0
    assert os.listdir(tmp_path) == []

    class Go:  # one writer in this process: its files are whole, none left under the temporary name
        def wait(self):
            pass

    half = type("V", (), {"value": 0.0})()
    _writer(str(tmp_path), 1, 2, 6, half, Go())
    assert sorted(os.listdir(tmp_path)) == [f"{i:06d}_photo.mat" for i in (1, 3, 5)]
    assert all(os.path.getsize(tmp_path / f) == PAYLOAD for f in os.listdir(tmp_path)) and half.value > 0


def test_multi_gpu_bench_feed_splits_the_folder_between_ranks(standin, tmp_path):
    """--feed: each of 2 side-by-side processes decodes and aligns its own share of the folder
    through test.py's DataLoader; together they see every photo once."""
    from benchmarks.bench_inference import make_folder
    from benchmarks.bench_multi_gpu import feed_runner

    folder = make_folder(str(tmp_path / "photos"), 7)
    secs, wall, line, _, _ = feed_runner(2, [f"--bfm_folder={standin['bfm_folder']}", "--batch_size=2",
                                          "--num_threads=1"])(7, folder, str(tmp_path / "res"))
    assert line.startswith("fed 7 face(s)") and 0 < secs <= wall
    assert not (tmp_path / "res").exists()  # nothing written


def test_host_cpu_bench_runs_every_task_in_forked_processes(standin, tmp_path):
    """bench_host_cpu: every task runs (a DataLoader worker's share of a face among them), and
    forked processes report their rates back after a common start."""
    from benchmarks.bench_host_cpu import TASKS, Tasks, rate
    from benchmarks.bench_inference import make_folder

    tasks = Tasks(make_folder(str(tmp_path / "photos"), 5), standin["bfm_folder"])
    for name in TASKS:
        tasks.run(name, 0)
    assert rate(tasks, "alloc", 1, 0.1) > 0 and rate(tasks, "load_aligned", 2, 0.1) > 0
