"""test.py end to end on the stand-in model: outputs, formats, bad input, batching."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.io import loadmat

from conftest import ROOT, make_photo_folder, wait_for_first_result

import test as test_cli

PHOTOS = ["000002.jpg", "trump_hillary.jpg", "vd006.png"]


def cli_args(standin, folder, out, *extra) -> list[str]:
    """test.py's arguments: the stand-in model on ``folder``, results to ``out``, no DataLoader workers."""
    return [f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
            f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
            f"--results_dir={out}", "--num_threads=0", *extra]


def run(standin, folder, out, *extra):
    return test_cli.main(cli_args(standin, folder, out, *extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launcher_args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, os.path.join(ROOT, "test.py")]


def assert_one_summary_of_the_three_photos(stdout: str, out) -> None:
    assert stdout.count("done:") == 1 and "3 face(s) reconstructed, 0 failed" in stdout
    assert sorted(os.listdir(out)) == sorted(f"{s}.{e}" for s in ("000002", "trump_hillary", "vd006")
                                             for e in ("mat", "png"))


@pytest.fixture(scope="module")
def done(standin, tmp_path_factory):
    folder = make_photo_folder(str(tmp_path_factory.mktemp("photos")), PHOTOS)
    out = str(tmp_path_factory.mktemp("results"))
    code = run(standin, folder, out, "--use_opengl", "False", "--batch_size=2")
    return folder, out, code


def test_outputs_written(done, capsys):
    folder, out, code = done
    assert code == 0
    for stem in ("000002", "trump_hillary", "vd006"):
        for ext in ("png", "obj", "mat"):
            assert os.path.isfile(os.path.join(out, f"{stem}.{ext}")), (stem, ext)
    assert not [f for f in os.listdir(out) if f.endswith(".part")]


def test_obj_opens_in_trimesh(done, standin_face_model):
    _, out, _ = done
    mesh = trimesh.load(os.path.join(out, "000002.obj"), process=False)
    assert mesh.vertices.shape == (35709, 3)
    assert np.array_equal(mesh.faces, standin_face_model.face_buf.numpy())
    assert mesh.visual.vertex_colors.shape == (35709, 4)
    # world space: the face is centred near the origin (camera at z = 10 looks down -z)
    assert np.abs(mesh.vertices.mean(0)).max() < 1.0


def test_mat_contents_and_conventions(done, standin_face_model):
    """The .mat holds the original's keys; lm68 is y down and equals the mesh's projection."""
    _, out, _ = done
    m = loadmat(os.path.join(out, "vd006.mat"))
    shapes = {k: m[k].shape for k in ("id", "exp", "tex", "angle", "gamma", "trans", "lm68")}
    assert shapes == {"id": (1, 80), "exp": (1, 64), "tex": (1, 80), "angle": (1, 3), "gamma": (1, 27),
                      "trans": (1, 3), "lm68": (1, 68, 2)}
    coeffs = torch.from_numpy(np.concatenate([m[k] for k in ("id", "exp", "tex", "angle", "gamma", "trans")], 1))
    lm = standin_face_model(coeffs).landmark[0].numpy()
    np.testing.assert_allclose(m["lm68"][0, :, 0], lm[:, 0], atol=1e-4)
    np.testing.assert_allclose(m["lm68"][0, :, 1], 223 - lm[:, 1], atol=1e-4)
    # eyes (y down) above the mouth
    assert m["lm68"][0, 36:48, 1].mean() < m["lm68"][0, 48:68, 1].mean()


def test_png_layout(done):
    _, out, _ = done
    im = np.asarray(Image.open(os.path.join(out, "trump_hillary.png")))
    assert im.shape == (224, 672, 3)
    left, mid, right = im[:, :224], im[:, 224:448], im[:, 448:]
    assert (left != mid).any(axis=2).mean() > 0.2  # the face is rendered over the photo
    # landmarks: red squares exist only in the third panel
    red = (right[..., 0] == 255) & (right[..., 1] == 0) & (right[..., 2] == 0)
    blue = (right[..., 0] == 0) & (right[..., 1] == 0) & (right[..., 2] == 255)
    assert red.sum() > 68 * 4 and blue.sum() >= 5 * 4


def test_batched_equals_one_at_a_time(done, standin, tmp_path, one_thread):
    """fp32: batches of 2 and batches of 1 give the same coefficients (<= 1e-5) and meshes, on
    the default device: CUDA where there is one (there cuDNN's TF32, PyTorch's default, made them
    differ by 0.084 on an H100, hence test.py's full float32; identical since).

    One CPU thread: the CPU's convolutions may split their sums by threads and batch size (on a
    32-core CPU the network's outputs for batch 1 and 2 were 3e-6 apart with all threads, equal
    with one)."""
    folder = done[0]
    out, out1 = str(tmp_path / "b2"), str(tmp_path / "b1")
    assert run(standin, folder, out, "--use_opengl", "False", "--batch_size=2") == 0
    assert run(standin, folder, out1, "--batch_size=1", "--save_png=false") == 0
    for stem in ("000002", "trump_hillary", "vd006"):
        a, b = loadmat(os.path.join(out, stem + ".mat")), loadmat(os.path.join(out1, stem + ".mat"))
        for k in ("id", "exp", "tex", "angle", "gamma", "trans"):
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["lm68"], b["lm68"], atol=1e-4, rtol=0)  # pixels: float32 ulp ~1e-5
        va = trimesh.load(os.path.join(out, stem + ".obj"), process=False)
        vb = trimesh.load(os.path.join(out1, stem + ".obj"), process=False)
        np.testing.assert_allclose(va.vertices, vb.vertices, atol=1e-5)
        np.testing.assert_array_equal(va.faces, vb.faces)
    assert not os.path.exists(os.path.join(out1, "000002.png"))


def test_batches_readied_in_a_thread_give_the_same_files(done, standin, tmp_path, one_thread):
    """--prefetch_batches 2 (a crops thread; on CUDA by default) writes byte-identical files to
    the CPU's default, the main thread alone (a .mat file's 128-byte header holds the time it was
    written). With one CPU thread (see test_batched_equals_one_at_a_time)."""
    from pipeline.workers import prefetch_depth

    assert prefetch_depth(-1, torch.device("cpu")) == 0 and prefetch_depth(-1, torch.device("cuda")) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3
    folder = done[0]
    main_thread, thread = str(tmp_path / "main_thread"), str(tmp_path / "thread")
    assert run(standin, folder, main_thread, "--use_opengl", "False", "--batch_size=2") == 0
    assert run(standin, folder, thread, "--use_opengl", "False", "--batch_size=2", "--prefetch_batches=2") == 0
    names = sorted(os.listdir(main_thread))
    assert names == sorted(os.listdir(thread)) and len(names) == 9
    for name in names:
        skip = 128 if name.endswith(".mat") else 0
        with open(os.path.join(main_thread, name), "rb") as a, open(os.path.join(thread, name), "rb") as b:
            assert a.read()[skip:] == b.read()[skip:], name


@pytest.mark.gpu
def test_cuda_run_folder_takes_a_device_without_an_index(standin, tmp_path):
    """A library caller's torch.device('cuda') (no index) works: the crops thread uses the current
    device (bench_inference passes one)."""
    from options.run_specs import run_spec
    from options.test_options import parse_test_options
    from pipeline.run import run_folder

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    opt = parse_test_options([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
                              f"--bfm_folder={standin['bfm_folder']}",
                              f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={tmp_path / 'out'}",
                              "--num_threads=0", "--batch_size=2"])
    summary = run_folder(run_spec(opt), torch.device("cuda"), progress=False)
    assert summary.faces_ok == 3 and summary.faces_failed == 0


def test_default_results_location(standin, tmp_path):
    """Without --results_dir: checkpoints/<name>/results/<folder name>/epoch_<E>_000000/."""
    folder = make_photo_folder(str(tmp_path / "my_photos"), ["vd006.png"])
    ckpt_dir = tmp_path / "ckpts"
    (ckpt_dir / "standin").mkdir(parents=True)
    os.symlink(standin["checkpoint"], ckpt_dir / "standin" / "epoch_20.pth")
    code = test_cli.main(["--name=standin", "--epoch=20", f"--img_folder={folder}/",
                          f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={ckpt_dir}",
                          "--num_threads=0", "--save_mesh=false"])
    assert code == 0
    assert os.path.isfile(ckpt_dir / "standin" / "results" / "my_photos" / "epoch_20_000000" / "vd006.png")


def test_bad_inputs_are_reported_and_others_processed(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png", "015259.jpg"])
    # a photo without detection file
    shutil.copyfile(os.path.join(ROOT, "examples", "JianzhuGuo.jpg"), os.path.join(folder, "nodet.jpg"))
    # a corrupt photo with a detection file
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    shutil.copyfile(os.path.join(folder, "detections", "000002.txt"), os.path.join(folder, "detections", "corrupt.txt"))
    # a detection file with 4 lines
    lines = open(os.path.join(folder, "detections", "015259.txt")).read().splitlines()
    with open(os.path.join(folder, "detections", "015259.txt"), "w") as f:
        f.write("\n".join(lines[:4]) + "\n")
    before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if "." in n}
    out = str(tmp_path / "out")
    code = run(standin, folder, out, "--batch_size=2")
    text = capsys.readouterr()
    assert code == 1
    assert "2 face(s) reconstructed, 2 failed, 1 photo(s) skipped" in text.out
    assert "nodet.jpg" in text.out and "015259" in text.out and "found 4 line(s)" in text.out
    assert "corrupt" in text.out and "Traceback" not in text.out + text.err
    assert os.path.isfile(os.path.join(out, "000002.obj")) and os.path.isfile(os.path.join(out, "vd006.obj"))
    assert not os.path.exists(os.path.join(out, "015259.obj"))
    after = {n: open(os.path.join(folder, n), "rb").read() for n in before}
    assert after == before  # the user's photos are never modified


def test_missing_bfm_is_a_one_line_error(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), ["vd006.png"])
    empty_bfm = tmp_path / "BFM"
    shutil.copytree(os.path.join(ROOT, "BFM"), empty_bfm)
    code = run(dict(standin, bfm_folder=str(empty_bfm)), folder, str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and "01_MorphableModel.mat" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_a_one_line_error(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), ["vd006.png"])
    code = run(dict(standin, name="nonexistent"), folder, str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and "nonexistent" in err and "epoch_20.pth" in err and len(err.strip().splitlines()) == 1


def test_truncated_checkpoint_is_a_one_line_error(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), ["vd006.png"])
    (tmp_path / "ck" / "bad").mkdir(parents=True)
    data = open(standin["checkpoint"], "rb").read()
    (tmp_path / "ck" / "bad" / "epoch_20.pth").write_bytes(data[: len(data) // 3])
    code = run(dict(standin, name="bad", checkpoints_dir=str(tmp_path / "ck")), folder, str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot read checkpoint" in err and len(err.strip().splitlines()) == 1


def test_empty_folder(standin, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(standin, str(tmp_path / "empty"), str(tmp_path / "out")) == 1
    assert "nothing was reconstructed" in capsys.readouterr().out


def test_multi_face_detection_files_are_reconstructed(standin, tmp_path):
    """process_images.py --all-faces writes photo.txt + photo__face02.txt; both are reconstructed."""
    folder = make_photo_folder(str(tmp_path / "photos"), ["trump_hillary.jpg"])
    from util.detections_io import detection_path, read_points, write_points

    lm = read_points(detection_path(folder, "trump_hillary.jpg"))
    write_points(detection_path(folder, "trump_hillary.jpg", face=2), lm + np.array([700.0, 0.0]))
    out = str(tmp_path / "out")
    assert run(standin, folder, out, "--save_mesh=false") == 0
    assert os.path.isfile(os.path.join(out, "trump_hillary.mat"))
    assert os.path.isfile(os.path.join(out, "trump_hillary__face02.mat"))


def test_scan_folder_shares_photos_between_ranks(tmp_path):
    """Each of N ranks takes every N-th photo in listing order (all faces of a photo together)
    and reports its share of the photos without a detection: together, exactly the whole scan."""
    from data.image_folder import scan_folder
    from util.detections_io import detection_path, write_points

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "015259.jpg", "trump_hillary.jpg",
                                                          "vd006.png"])
    write_points(detection_path(folder, "trump_hillary.jpg", face=2), np.zeros((5, 2)))
    shutil.copyfile(os.path.join(ROOT, "examples", "JianzhuGuo.jpg"), os.path.join(folder, "JianzhuGuo.jpg"))
    # a folder in place of a detection file is listed: its face fails when read, saying why
    os.makedirs(os.path.join(folder, "detections", "JianzhuGuo.txt"))
    os.remove(os.path.join(folder, "detections", "vd006.txt"))
    whole, missing = scan_folder(folder)
    assert [e.name for e in whole] == ["000002", "015259", "JianzhuGuo", "trump_hillary", "trump_hillary__face02"]
    assert missing == [os.path.join(folder, "vd006.png")]
    parts = [scan_folder(folder, share=(r, 2)) for r in range(2)]
    # listed: 000002.jpg 015259.jpg JianzhuGuo.jpg trump_hillary.jpg vd006.png
    assert [e.name for e in parts[0][0]] == ["000002", "JianzhuGuo"]
    assert [e.name for e in parts[1][0]] == ["015259", "trump_hillary", "trump_hillary__face02"]
    assert parts[0][1] == missing and parts[1][1] == []
    # the scan pauses the garbage collector and leaves it as it found it
    import gc

    assert gc.isenabled()
    gc.disable()
    try:
        assert scan_folder(folder)[0] == whole and not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.slow
def test_torchrun_two_ranks_shard_the_folder(standin, tmp_path):
    """torchrun --nproc_per_node=2 (CPU, gloo): each rank writes its share, one summary."""
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    cmd = torchrun("--nproc_per_node=2", "--master_port=29533") + cli_args(standin, folder, out, "--device=cpu",
                                                                           "--save_mesh=false")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_one_summary_of_the_three_photos(r.stdout, out)


@pytest.mark.slow
def test_torchrun_rendezvous_across_two_nodes(standin, tmp_path):
    """The multi-node command: two torchrun agents (two "nodes" here, one process each, CPU,
    gloo) meet through a c10d rendezvous; the folder is shared between them, one summary."""
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    cmd = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=faces")
    cmd += cli_args(standin, folder, out, "--device=cpu", "--save_mesh=false")
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-2000:]
    assert_one_summary_of_the_three_photos("".join(o for o, _ in outputs), out)


def test_skip_existing_redoes_only_faces_missing_an_output(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    out = tmp_path / "out"
    assert run(standin, folder, str(out)) == 0
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    os.remove(out / "vd006.png")  # one face lacks one of its files
    dead = subprocess.Popen(["true"])
    dead.wait()  # a killed run's writer: its temporary file does not count, and the next run removes it
    os.rename(out / "000002.png", out / f".d3dfr-{dead.pid}-0123abcd.000002.png.part")
    capsys.readouterr()
    assert run(standin, folder, str(out), "--skip_existing=true") == 0
    text = capsys.readouterr().out
    assert "done: 2 face(s) reconstructed, 0 failed" in text and "1 face(s) left out" in text
    after = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    assert not [n for n in after if n.startswith(".d3dfr-")]
    redone = {n for n in after if after[n] != stamps.get(n)}
    assert redone == {f"{s}.{e}" for s in ("vd006", "000002") for e in ("png", "obj", "mat")}
    # everything there: nothing to do is success; asking for fewer outputs needs only those
    assert run(standin, folder, str(out), "--skip_existing=true") == 0
    assert "3 face(s) left out" in capsys.readouterr().out
    os.remove(out / "trump_hillary.obj")
    assert run(standin, folder, str(out), "--skip_existing=true", "--save_mesh=false") == 0
    assert "3 face(s) left out" in capsys.readouterr().out


def test_without_finished_lists_each_results_folder_once(tmp_path, monkeypatch):
    from data.image_folder import FaceEntry
    from pipeline import scan

    (tmp_path / "sub").mkdir()
    for n in ("a.mat", "a.obj", "b.mat", "sub/c.mat", "sub/c.obj"):
        (tmp_path / n).write_bytes(b"x")
    entries = [FaceEntry("", "", name, rel) for name, rel in (("a", ""), ("b", ""), ("c", "sub"), ("d", "none"))]
    calls = []
    listdir = os.listdir
    monkeypatch.setattr(scan.os, "listdir", lambda p: calls.append(p) or listdir(p))
    todo, left_out = scan.without_finished(entries, str(tmp_path), [".obj", ".mat"])
    assert [e.name for e in todo] == ["b", "d"] and left_out == 2
    assert sorted(calls) == sorted(os.path.join(str(tmp_path), d) for d in ("", "sub", "none"))
    assert scan.without_finished(entries, str(tmp_path), []) == (entries, 0)


@pytest.mark.slow
def test_gpu_ids_ranks_hand_back_large_summaries(standin, tmp_path):
    """--gpu_ids 0,1 spawns one process per GPU, each sending its summary back through a pipe;
    one of 3000 photos without a detection file (~200 KB, more than a pipe holds) must not hang
    the run. Here on the CPU: the spawning itself, called directly."""
    folder = make_photo_folder(str(tmp_path / "photos"), PHOTOS)
    for i in range(3000):
        open(os.path.join(folder, f"no_detection_for_this_photo_{i:05d}.jpg"), "wb").close()
    argv = cli_args(standin, folder, tmp_path / "out", "--device=cpu", "--save_mesh=false", "--save_png=false",
                    f"--ddp_port={free_port()}")
    code = ("from pipeline.ranks import run_spawned; from options.test_options import parse_test_options\n"
            "from options.run_specs import run_spec\n"
            f"s = run_spawned(2, run_spec(parse_test_options({argv!r})))\n"
            "print(s.faces_ok, s.faces_failed, len(s.photos_without_detection))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["3", "0", "3000"]


def test_long_lists_go_to_files_beside_the_results(standin, tmp_path, capsys):
    """A summary names at most 20 photos skipped (and 20 faces failed); a longer list is written
    whole, one line each, to a file in the results folder that the summary names."""
    folder = make_photo_folder(str(tmp_path / "photos"), ["vd006.png"])
    names = [os.path.join(folder, f"photo_{i:02d}.jpg") for i in range(25)]
    for n in names:
        open(n, "wb").close()
    out = tmp_path / "out"
    assert run(standin, folder, str(out), "--save_mesh=false", "--save_png=false") == 0
    text = capsys.readouterr().out
    listed = [line.strip() for line in text.splitlines() if "photo_" in line and line.startswith("  /")]
    assert listed == names[:20]
    assert f"  ... and 5 more: all 25 in {out / 'skipped_photos.txt'}" in text
    assert (out / "skipped_photos.txt").read_text().splitlines() == names
    assert sorted(os.listdir(out)) == ["skipped_photos.txt", "vd006.mat"]  # no list of failures: none failed
    for n in names[3:]:
        os.remove(n)
    assert run(standin, folder, str(out), "--save_mesh=false", "--save_png=false") == 0
    assert "photo_02.jpg" in capsys.readouterr().out
    assert os.listdir(out) == ["vd006.mat"]  # the earlier run's list, no longer this run's, is gone


def test_same_stem_photos_do_not_share_a_detection(standin, tmp_path, capsys):
    folder = make_photo_folder(str(tmp_path / "photos"), ["vd006.png"])
    shutil.copyfile(os.path.join(ROOT, "examples", "000002.jpg"), os.path.join(folder, "vd006.jpg"))
    out = str(tmp_path / "out")
    assert run(standin, folder, out, "--save_mesh=false") == 0
    text = capsys.readouterr().out
    assert "1 face(s) reconstructed" in text and "vd006.png (same name as vd006.jpg" in text


def test_ranks_map_to_gpus(monkeypatch):
    """torchrun: rank r uses GPU r (default --gpu_ids 0), or the r-th of several --gpu_ids."""
    from pipeline import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto", "0", local_rank=1) == torch.device("cuda:1")
    assert runtime.resolve_device("cuda", "2,3", local_rank=1) == torch.device("cuda:3")
    assert runtime.resolve_device("auto", "1", local_rank=None) == torch.device("cuda:1")
    assert runtime.resolve_device("auto", "-1") == torch.device("cpu")


def test_fitting_uses_68_landmarks_where_present(standin, tmp_path):
    """test.py --fit_steps fits a face to landmarks/<name>.txt when it exists (the others to
    their 5 points, in the same batch)."""
    from data.image_folder import scan_folder
    from util.detections_io import detection_path, read_points, write_points
    from util.landmarks import flip_y
    from util.preprocess import align_img, load_lm3d

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    flags = ("--save_mesh=false", "--save_png=false", "--batch_size=2")
    assert run(standin, folder, str(tmp_path / "plain"), *flags) == 0
    pred = loadmat(str(tmp_path / "plain" / "000002.mat"))["lm68"][0]  # crop pixels, y down
    # target: the prediction with the mouth and jaw moved 8 px down, written in photo pixels
    target = pred.copy()
    target[list(range(4, 13)) + list(range(48, 68)), 1] += 8.0
    img = Image.open(os.path.join(folder, "000002.jpg")).convert("RGB")
    lm5 = flip_y(read_points(detection_path(folder, "000002.jpg")).astype(np.float64), img.size[1])
    transform, _, _ = align_img(img, lm5, load_lm3d(standin["bfm_folder"]))
    write_points(detection_path(folder, "000002.jpg", subdir="landmarks"), transform.crop_to_image(target))
    entries, _ = scan_folder(folder, lm68=True)
    assert [bool(e.lm68_path) for e in entries] == [True, False]
    assert run(standin, folder, str(tmp_path / "fit"), *flags, "--fit_steps=30") == 0
    fitted = loadmat(str(tmp_path / "fit" / "000002.mat"))["lm68"][0]
    before = np.linalg.norm(pred - target, axis=1).mean()
    after = np.linalg.norm(fitted - target, axis=1).mean()
    assert after < 0.75 * before, (before, after)  # 3.41 -> 2.14 px when written
    assert os.path.isfile(tmp_path / "fit" / "vd006.mat")  # fitted to its 5 points beside it


def test_fit_loss_train_fits_the_training_loss(standin, tmp_path, monkeypatch, capsys):
    """test.py --fit_loss train hands fitting the training loss's settings (models.fitting.fit_config):
    the whole face rendered, one rate for every group, no landmark-only stage; staged its three
    phases; the default stays test.py's front-only fitting; an unknown loss is a usage error."""
    import models.fitting as fitting

    seen = []
    real = fitting.fit_batch
    monkeypatch.setattr(fitting, "fit_batch", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    flags = ("--save_mesh=false", "--save_png=false", "--fit_steps=2")
    assert run(standin, folder, str(tmp_path / "train"), *flags, "--fit_loss=train") == 0
    assert run(standin, folder, str(tmp_path / "front"), *flags) == 0
    assert run(standin, folder, str(tmp_path / "staged"), *flags, "--fit_loss=staged") == 0
    train, front, staged = seen
    assert train == fitting.fit_config("train") and front == fitting.fit_config("front") == fitting.FitConfig()
    assert staged == fitting.fit_config("staged") and staged[-1] == train
    assert not train.front_only and train.landmark_steps == 0 and train.min_lr_ratio == 0
    assert {f for _, f in train.lr_scale} == {1.0} and front.front_only
    a = loadmat(str(tmp_path / "train" / "000002.mat"))["id"]
    b = loadmat(str(tmp_path / "front" / "000002.mat"))["id"]
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    with pytest.raises(SystemExit) as e:
        run(standin, folder, str(tmp_path / "bad"), *flags, "--fit_loss=back")
    assert e.value.code == 2 and "--fit_loss" in capsys.readouterr().err
    with pytest.raises(ValueError, match="front"):
        fitting.fit_config("back")


@pytest.mark.gpu
def test_staged_fitting_on_cuda(standin, tmp_path):
    """test.py --fit_loss staged on CUDA (nvdiffrast's CUDA rasterizer): its three phases run and
    move the coefficients; the results are finite."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    flags = ("--save_mesh=false", "--save_png=false", "--device=cuda")
    assert run(standin, folder, str(tmp_path / "plain"), *flags) == 0
    assert run(standin, folder, str(tmp_path / "staged"), *flags, "--fit_steps=40", "--fit_loss=staged") == 0
    a = loadmat(str(tmp_path / "staged" / "000002.mat"))
    b = loadmat(str(tmp_path / "plain" / "000002.mat"))
    for key in ("id", "exp", "tex", "angle", "gamma", "trans"):
        assert np.isfinite(a[key]).all() and not np.array_equal(a[key], b[key]), key


def test_a_malformed_landmarks_file_fails_only_its_face(standin, tmp_path, capsys):
    from util.detections_io import detection_path

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    bad = detection_path(folder, "000002.jpg", subdir="landmarks")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "w") as f:
        f.write("1 2\n3 4\n")
    before = open(bad).read()
    out = tmp_path / "out"
    assert run(standin, folder, str(out), "--save_mesh=false", "--save_png=false", "--fit_steps=2") == 1
    report = capsys.readouterr().out
    assert "000002:" in report and "expected 68 lines" in report and "process_images.sh --landmarks68" in report
    assert os.path.isfile(out / "vd006.mat") and not os.path.exists(out / "000002.mat")
    assert open(bad).read() == before  # the user's file is only read


@pytest.mark.parametrize("prefetch,sig", [("0", "SIGINT"), ("2", "SIGINT"), ("2", "SIGTERM")])
def test_ctrl_c_stops_the_run_at_once_and_leaves_whole_files(standin, tmp_path, prefetch, sig):
    """SIGINT (Ctrl-C) or SIGTERM (a batch scheduler's stop) in the middle of a run (DataLoader
    workers, writer processes, with and without the crops thread): test.py exits with 130 within
    seconds, says so, and every file it wrote is whole (no .part file; every .mat loads)."""
    import signal
    import time

    from benchmarks.bench_inference import make_folder

    folder = make_folder(str(tmp_path / "photos"), 200)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), f"--name={standin['name']}", "--epoch=20",
           f"--img_folder={folder}", f"--bfm_folder={standin['bfm_folder']}",
           f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={out}", "--device=cpu",
           "--batch_size=2", "--num_threads=2", "--write_workers=2", "--save_png=false",
           f"--prefetch_batches={prefetch}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_result(proc, out)
    proc.send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "--skip_existing true" in err
    assert time.monotonic() - t0 < 15
    names = os.listdir(out)
    assert not [n for n in names if n.endswith(".part")]
    mats = [n for n in names if n.endswith(".mat")]
    assert 0 < len(mats) < 200
    for n in mats:
        assert loadmat(os.path.join(out, n))["id"].shape == (1, 80)
    if prefetch == "0":  # once: the same command with --skip_existing does only the rest
        done = {n[:-4] for n in mats} & {n[:-4] for n in names if n.endswith(".obj")}
        stamps = {n: os.stat(out / f"{n}.mat").st_mtime_ns for n in done}
        r = subprocess.run(cmd + ["--skip_existing=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"done: {200 - len(done)} face(s) reconstructed, 0 failed" in r.stdout
        assert f"{len(done)} face(s) left out: their outputs were there already" in r.stdout
        assert len([n for n in os.listdir(out) if n.endswith(".mat")]) == 200
        assert {n: os.stat(out / f"{n}.mat").st_mtime_ns for n in done} == stamps
