"""What test.py and process_images tell the user (issue #23, item 5), and test.py's --help.

An empty folder, a folder where process_images.sh found no face, and photos never processed each
get their own last line; a run that reconstructs nothing leaves no empty results folder; a
mistyped path or a bad option value is reported in one line before torch is imported."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers_images import register_fake, squares_image

import test as test_cli


def run(standin, folder, out, *extra) -> int:
    return test_cli.main([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
                          f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
                          f"--results_dir={out}", "--num_threads=0", *extra])


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_empty_folder_says_no_photos_and_leaves_no_results_folder(standin, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    out = tmp_path / "results" / "deeper" / "epoch_20_000000"
    assert run(standin, str(tmp_path / "empty"), str(out)) == 1
    assert last_line(capsys) == f"nothing was reconstructed: no photos found in {tmp_path / 'empty'}"
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # every folder the run made is gone again


def test_no_face_points_at_the_report_and_counts_its_reasons(standin, tmp_path, capsys, monkeypatch):
    """process_images (the fake detector: solid squares are faces) finds no face in any photo."""
    import process_images

    register_fake(monkeypatch)
    folder = tmp_path / "photos"
    folder.mkdir()
    squares_image().save(folder / "a.png")
    squares_image().save(folder / "b.png")
    squares_image(squares=[(40, 30, 60, 0.3)]).save(folder / "weak.png")
    (folder / "c.jpg").write_text("not an image")
    process_images.main([str(folder), "--no-progress", "--detector", "fake"])  # no face: no detection file
    capsys.readouterr()
    out = tmp_path / "out"
    assert run(standin, str(folder), str(out)) == 1
    report = os.path.join(str(folder), "process_report.json")
    assert last_line(capsys) == ("nothing was reconstructed: process_images.sh gave no photo a detection file "
                                 f"(no_face 2, low_confidence 1, not_an_image 1); the reason for each photo is "
                                 f"in {report}")
    assert not out.exists()


def test_photos_never_processed_point_at_process_images(standin, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    squares_image().save(folder / "a.png")
    out = tmp_path / "out"
    assert run(standin, str(folder), str(out)) == 1
    text = capsys.readouterr().out
    skipped = "skipped (no detections/<stem>.txt; run ./process_images.sh on the folder first):"
    assert f"{skipped}\n  {folder / 'a.png'}\n" in text
    assert "; no results folder written\n" in text
    assert text.strip().splitlines()[-1] == ("nothing was reconstructed: no photo has a detection file; "
                                             f"run ./process_images.sh {folder} first")
    assert not out.exists()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["--img_folder=no/such/folder"], "error: --img_folder no/such/folder is not a folder; give the folder of photos"),
    (["--img_folder=examples", "--name=no_such_model"], "error: checkpoint not found: ./checkpoints/no_such_model/"
                                                        "epoch_20.pth. Put the trained model at"),
    (["--img_folder=examples", "--name=standin", "--bfm_folder=no/such/bfm"], "error: --bfm_folder no/such/bfm is "
                                                                             "not a folder. The Basel Face Model"),
])
def test_path_errors_take_one_line_before_torch_is_imported(standin, args, expected):
    """Run from the repository (the stand-in's checkpoint is checkpoints/standin/epoch_20.pth)."""
    p = _python(f"import sys, test; code = test.main({['--epoch=20', *args]!r}); "
                "print(code, 'torch' in sys.modules)")
    assert p.stdout.split() == ["2", "False"]
    assert p.stderr.startswith(expected) and len(p.stderr.strip().splitlines()) == 1


def test_bad_option_value_takes_one_line():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "test.py"), "--batch_size", "many"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == ("test.py: error: argument --batch_size: invalid int value: 'many'; "
                        "test.py --help lists the options\n")


def test_help_in_sections_without_training_flags():
    from options.test_options import TestOptions
    from options.base_options import build_parser

    text = build_parser(TestOptions).format_help()
    titles = ["photos and detections:", "model: checkpoint, network, face model:", "renderer and camera:",
              "outputs and messages:", "devices and performance:", "per-image fitting:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    renderer = text[text.index("renderer and camera:"):text.index("outputs and messages:")]
    assert "--focal" in renderer and "--use_opengl" in renderer and "--batch_size" not in renderer
    for flag in ("vis_batch_nums", "eval_batch_nums", "add_image", "init_path", "use_ddp"):
        assert f"--{flag}" not in text
    # the original's flags that test.py ignores: in one section that says so, nowhere else
    ignored = text[text.index("accepted for the original's command lines, ignored:"):]
    listed = text[text.index("\n\n"):text.index("accepted for the original's command lines, ignored:")]  # no usage
    for flag in ("model", "phase", "dataset_mode", "world_size", "display_per_batch"):
        assert f"--{flag} " in ignored and f"--{flag} " not in listed
    # still accepted: the original's command lines keep working
    from options.test_options import parse_test_options

    assert parse_test_options(["--init_path", "x.pth", "--use_ddp", "False"]).init_path == "x.pth"


def test_train_help_lists_the_training_flags():
    from options.base_options import build_parser
    from options.train_options import TrainOptions

    text = build_parser(TrainOptions).format_help()
    training = text[text.index("\ntraining:"):]
    for flag in ("vis_batch_nums", "eval_batch_nums", "display_per_batch", "add_image", "init_path", "use_ddp",
                 "lr", "n_epochs"):
        assert f"--{flag} " in training


def test_default_detector_without_tensorflow_names_the_extra(monkeypatch):
    """No TensorFlow: one line naming the extra that installs it and the TensorFlow-free backend."""
    import importlib.util

    from detect import base, mtcnn_tf, registry

    monkeypatch.setattr(mtcnn_tf, "_MTCNN_MODELS", {})  # a model an earlier test built in this process
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(base.DetectorUnavailableError) as e:
        registry.create_detector("mtcnn")
    msg = str(e.value)
    assert '.[mtcnn-tf]' in msg and "--detector torch" in msg and "\n" not in msg
