"""train.py end to end on a tiny face model: checkpoints that test.py loads, resume, clear errors
for missing data; data preparation and augmentation; the recovery experiment's smoke run."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from conftest import ROOT, tiny_face_model_dict
from data.train_dataset import (LM68_MIRROR, AugmentConfig, FaceTrainDataset, apply_affine, augment_landmarks,
                                random_affine, read_list)
from util.detections_io import detection_path, write_points
from util.landmarks import lm68_to_5
from util.preprocess import load_lm3d

N_PHOTOS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny face model folder and a folder of prepared photos (68 landmarks, 5-point detections)."""
    root = tmp_path_factory.mktemp("train")
    bfm = root / "BFM"
    bfm.mkdir()
    savemat(str(bfm / "BFM_model_front.mat"), tiny_face_model_dict())
    shutil.copyfile(os.path.join(ROOT, "BFM", "similarity_Lm3D_all.mat"), bfm / "similarity_Lm3D_all.mat")
    photos = root / "data" / "faces"
    photos.mkdir(parents=True)
    lm3d = loadmat(os.path.join(ROOT, "BFM", "similarity_Lm3D_all.mat"))["lm"]
    rng = np.random.default_rng(0)
    for k in range(N_PHOTOS):
        name = f"p{k}.png"
        scale, (cx, cy) = 90 + 10 * k, (128 + 5 * k, 120 - 3 * k)
        lm68 = np.stack([cx + scale * lm3d[:, 0], cy - scale * lm3d[:, 1]], axis=1)  # y down
        img = (rng.uniform(0, 255, (256, 256, 3)) * 0.3 + 90).astype(np.uint8)
        Image.fromarray(img).save(photos / name)
        write_points(detection_path(str(photos), name, subdir="landmarks"), lm68)
        write_points(detection_path(str(photos), name), lm68_to_5(lm68))
    return {"root": str(root), "bfm": str(bfm), "photos": str(photos), "data_root": str(root / "data")}


def prepare(ws, out_name="list.txt") -> str:
    from data.prepare_list import main as prepare_main

    out = os.path.join(ws["root"], out_name)
    assert prepare_main(["--data_root", ws["data_root"], "--img_folder", "faces", "--out", out]) == 0
    return out


def train_args(ws, flist, name, *extra):
    return ["--name", name, "--checkpoints_dir", os.path.join(ws["root"], "ck"), "--flist", flist,
            "--data_root", ws["data_root"], "--flist_val", "", "--bfm_folder", ws["bfm"], "--net_recon", "resnet18",
            "--init_path", "", "--batch_size", "2", "--n_epochs", "1", "--num_threads", "0", "--device", "cpu",
            "--print_freq", "1", "--display_freq", "1", "--save_latest_freq", "1000", *extra]


def ckpt(ws, name, tag):
    return torch.load(os.path.join(ws["root"], "ck", name, f"epoch_{tag}.pth"), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- data
def test_prepare_list_and_dataset(workspace, tmp_path):
    ws = workspace
    extra = os.path.join(ws["photos"], "no_landmarks.png")
    Image.new("RGB", (64, 64)).save(extra)
    try:
        flist = prepare(ws, "list_check.txt")
    finally:
        os.remove(extra)
    lines = [ln for ln in open(flist).read().splitlines() if not ln.startswith("#")]
    assert len(lines) == N_PHOTOS and all(ln.split("\t")[0].startswith("faces") for ln in lines)
    entries = read_list(flist, ws["data_root"], need_lm5=True)
    assert all(e.lm5 is not None and e.mask is None for e in entries)
    ds = FaceTrainDataset(entries, load_lm3d(ws["bfm"]), AugmentConfig(use_aug=False))
    item = ds[0]
    assert item["imgs"].shape == (3, 224, 224) and item["imgs"].dtype == torch.float32
    assert item["lms"].shape == (68, 2) and item["msks"].shape == (1, 224, 224) and torch.all(item["msks"] == 1)
    # aligned with the 5 points of its own landmarks, they land on the standard 5 points
    five = lm68_to_5(item["lms"].numpy())
    assert np.abs(five[:, 0] - five[:, 0].mean()).max() < 60 and 80 < five[:, 1].mean() < 140
    aug = FaceTrainDataset(entries, load_lm3d(ws["bfm"]), AugmentConfig(), seed=3)
    a, b = aug[1], aug[1]
    assert torch.equal(a["lms"], b["lms"])  # reproducible per (seed, epoch, index)
    aug.set_epoch(2)
    assert not torch.equal(aug[1]["lms"], a["lms"])


def test_augmentation_moves_pixels_and_landmarks_together():
    assert sorted(LM68_MIRROR.tolist()) == list(range(68))
    assert np.array_equal(LM68_MIRROR[LM68_MIRROR], np.arange(68))  # mirroring twice is the identity
    rng = random.Random(0)
    for _ in range(5):
        img = np.zeros((224, 224), np.uint8)
        x, y_down = 150, 60
        img[y_down - 1:y_down + 2, x - 1:x + 2] = 255
        mat, flip = random_affine(AugmentConfig(), 224, rng)
        warped = apply_affine(img, mat, 224, cubic=False)
        yy, xx = np.unravel_index(np.argmax(warped), warped.shape)
        lm = augment_landmarks(np.array([[x, 223.0 - y_down]]), mat, flip, 224)
        assert abs(lm[0, 0] - xx) <= 1.5 and abs(223 - lm[0, 1] - yy) <= 1.5


def test_missing_data_is_a_clear_error_before_training(workspace, tmp_path, capsys):
    from train import main

    ws = workspace
    flist = tmp_path / "bad.txt"
    flist.write_text("faces/p0.png\tfaces/landmarks/p0.txt\n"
                     "faces/p1.png\tfaces/landmarks/missing.txt\n"
                     "faces/nothere.png\tfaces/landmarks/p2.txt\n")
    assert main(train_args(ws, str(flist), "bad")) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "missing.txt" in err and "nothere.png" in err
    assert main(train_args(ws, str(tmp_path / "none.txt"), "bad")) == 2
    assert "training list not found" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(ws["root"], "ck", "bad"))


# ----------------------------------------------------------------------------- train.py
def test_train_checkpoint_loads_in_test_py_and_resume(workspace, caplog):
    import test as test_py
    from models.networks import load_recon_net
    from train import main

    ws = workspace
    flist = prepare(ws)
    with caplog.at_level("WARNING", logger="train"):
        assert main(train_args(ws, flist, "run")) == 0
    assert sum("without the identity loss" in r.message for r in caplog.records) == 1
    folder = os.path.join(ws["root"], "ck", "run")
    first = ckpt(ws, "run", 1)
    assert set(first) >= {"net_recon", "opt_00", "sched_00"} and first["total_iters"] == 2
    assert json.load(open(os.path.join(folder, "train_opt.json")))["batch_size"] == 2
    if importlib.util.find_spec("tensorboard") is not None:  # the train extra; without it train.py logs nothing
        assert any(f.startswith("events") for f in os.listdir(os.path.join(folder, "logs")))
    load_recon_net(os.path.join(folder, "epoch_1.pth"), "resnet18")

    # the checkpoint reconstructs the photos with test.py, unchanged
    out = os.path.join(ws["root"], "results")
    code = test_py.main(["--name", "run", "--epoch", "1", "--checkpoints_dir", os.path.join(ws["root"], "ck"),
                         "--img_folder", ws["photos"], "--bfm_folder", ws["bfm"], "--net_recon", "resnet18",
                         "--device", "cpu", "--num_threads", "0", "--write_workers", "0", "--results_dir", out,
                         "--save_mesh", "false"])
    assert code == 0 and len([f for f in os.listdir(out) if f.endswith(".mat")]) == N_PHOTOS

    # running again with more epochs resumes from epoch_latest: the step count continues
    assert main(train_args(ws, flist, "run", "--n_epochs", "2")) == 0
    second = ckpt(ws, "run", 2)
    assert second["total_iters"] == 4 and second["epoch"] == 2
    assert not torch.equal(second["net_recon"]["final_layers.0.weight"], first["net_recon"]["final_layers.0.weight"])


def test_interrupted_run_resumes_mid_epoch(workspace):
    from train import main

    ws = workspace
    flist = prepare(ws)
    assert main(train_args(ws, flist, "cut", "--max_steps", "1")) == 0
    latest = ckpt(ws, "cut", "latest")
    assert (latest["epoch"], latest["epoch_iter"], latest["total_iters"], latest["epoch_complete"]) == (1, 1, 1, False)
    assert main(train_args(ws, flist, "cut")) == 0
    done = ckpt(ws, "cut", 1)
    assert (done["epoch_iter"], done["total_iters"]) == (2, 2)
    # the two halves saw the epoch's two batches once each: same result as an uninterrupted run
    assert main(train_args(ws, flist, "whole")) == 0
    whole = ckpt(ws, "whole", 1)
    for k, v in whole["net_recon"].items():
        assert torch.allclose(v.float(), done["net_recon"][k].float(), atol=1e-5), k


def test_train_curriculum_trains_landmarks_first_without_rendering(workspace, caplog, capsys, monkeypatch):
    """--curriculum 0.5 over 2 epochs of 2 batches: steps 1-2 train the landmark stage's terms
    without a render (HybridLoss never called), steps 3-4 the whole loss; the run saves and
    resumes as usual. Outside [0, 1) it is a one-line error before training."""
    from models.losses import HybridLoss
    from train import curriculum_steps, main

    ws = workspace
    flist = prepare(ws)
    calls = []
    forward = HybridLoss.forward
    monkeypatch.setattr(HybridLoss, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    with caplog.at_level("INFO", logger="train"):
        assert main(train_args(ws, flist, "cur", "--n_epochs", "2", "--curriculum", "0.5")) == 0
    steps = {int(m.group(1)): r.message for r in caplog.records if (m := re.search(r" step (\d+) \(", r.message))}
    assert sorted(steps) == [1, 2, 3, 4] and len(calls) == 2
    assert all("landmark_stage" in steps[k] and "color" not in steps[k] for k in (1, 2))
    assert all("color" in steps[k] and "landmark_stage" not in steps[k] for k in (3, 4))
    assert sum("step 3: the landmark stage is over" in r.message for r in caplog.records) == 1
    first, second = ckpt(ws, "cur", 1), ckpt(ws, "cur", 2)
    assert (first["total_iters"], second["total_iters"]) == (2, 4)
    assert not torch.equal(second["net_recon"]["backbone.conv1.weight"], first["net_recon"]["backbone.conv1.weight"])
    assert curriculum_steps(0.5, 0, 20, 7) == 70 and curriculum_steps(0.3, 10, 20, 7) == 3
    assert main(train_args(ws, flist, "cur_bad", "--curriculum", "1")) == 2
    assert "--curriculum is a fraction of the training steps in [0, 1)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- recovery experiment
def test_recovery_experiment_smoke(workspace, tmp_path):
    from experiments.recovery import main

    out = tmp_path / "rec"
    code = main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--net_recon", "resnet18",
                 "--batch_size", "2", "--max_steps", "3", "--eval_size", "4", "--curve_size", "2", "--eval_batch", "2",
                 "--minutes", "2", "--eval_reserve_s", "5", "--out", str(out), "--verbose", "false",
                 "--profile_start", "1", "--profile_steps", "1", "--optimum_faces", "0"])
    assert code == 0
    res = json.load(open(out / "recovery.json"))
    assert res["steps"] == 3 and res["figures"]["faces"] == 4
    assert set(res["step_ms"]) == {"render_data", "network_forward", "face_model_render_loss", "backward_step"}
    assert res["pass"]["vertex_vs_optimum"] is None and res["optimum"] is None  # no optimum asked for
    assert all(np.isfinite(res["figures"][k]) for k in ("vertex_error_ratio", "pose_error_deg", "lm_error_px"))
    assert Image.open(out / "learning_curve.png").size[0] > 400
    assert Image.open(out / "samples.png").size == (2 * 64, 2 * 64)
    f = res["figures"]
    assert np.isfinite(f["vertex_error_ratio_aligned"]) and f["orientation_error_deg"] >= 0
    assert set(res["landmark_oracle"]) == {"all", "pose_exp", "pose_only"}
    assert res["landmark_oracle"]["all"]["faces"] == 4 and 0 <= res["rigid_fraction"]["id"] <= 1


def test_recovery_against_the_loss_optimum_with_the_speed_levers(workspace, tmp_path):
    """The per-face optimum of the loss is measured in the same run, the regressor's (and the
    fitted) vertex error are reported as multiples of it on the same faces, and the levers (bf16
    autocast, the batch/lr rule, channels_last, a landmarks-first curriculum) run on the CPU."""
    from experiments.recovery import main

    out = tmp_path / "rec"
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--net_recon", "resnet18",
                 "--batch_size", "4", "--max_steps", "4", "--eval_size", "4", "--curve_size", "2", "--eval_batch", "2",
                 "--minutes", "2", "--eval_reserve_s", "5", "--out", str(out), "--verbose", "false",
                 "--optimum_faces", "3", "--optimum_refine_steps", "2", "--optimum_steps", "3", "--fit_steps", "2", "--oracle_steps", "0",
                 "--amp", "bf16", "--lr_rule", "sqrt", "--channels_last", "true", "--curriculum", "0.5",
                 "--curve_every_s", "0"]) == 0
    res = json.load(open(out / "recovery.json"))
    orc, vs = res["optimum"], res["vs_optimum"]
    assert orc["faces"] == 3 and orc["steps"] == [2, 3]
    # the kept end of each face is the lower of the two: its mean loss is at most either end's
    assert orc["loss"] <= min(orc["loss_from_truth"], orc["loss_from_mean_face"]) + 1e-7
    assert vs["regressor_vertex_vs_optimum"] == pytest.approx(vs["regressor"]["vertex_error_ratio"]
                                                              / orc["vertex_error_ratio"])
    assert vs["fitted_vertex_vs_optimum"] == pytest.approx(vs["fitted"]["vertex_error_ratio"] / orc["vertex_error_ratio"])
    assert res["pass"]["vertex_vs_optimum"] == (vs["regressor_vertex_vs_optimum"] <= 1.25)
    assert res["pass_fitted"]["vertex_vs_optimum"] == (vs["fitted_vertex_vs_optimum"] <= 1.05)
    assert res["amp"] == "bf16" and res["channels_last"] is True and res["peak_lr"] == pytest.approx(1e-3 * (4 / 32) ** 0.5)
    stages = [p["stage"] for p in res["curve"] if "stage" in p]
    assert stages[0] == "landmarks" and res["landmark_steps"] >= 1 and res["steps"] == 4
    assert all(np.isfinite(p["loss"]) for p in res["curve"])


def tiny_recovery_args(ws, out, *extra) -> list[str]:
    """A recovery run at 64 px on the tiny face model, a few faces, no landmark oracle."""
    return ["--bfm_folder", ws["bfm"], "--device", "cpu", "--size", "64", "--net_recon", "resnet18",
            "--batch_size", "2", "--eval_size", "4", "--curve_size", "2", "--eval_batch", "2", "--minutes", "2",
            "--eval_reserve_s", "5", "--out", str(out), "--verbose", "false", "--oracle_steps", "0",
            "--profile_start", "1", "--profile_steps", "1", *extra]


EVAL_ARGS = ("--optimum_faces", "2", "--optimum_refine_steps", "2", "--optimum_steps", "2", "--fit_steps", "3,2",
             "--fit_faces", "3")


def test_recovery_in_two_calls(workspace, tmp_path):
    """--train_only writes the checkpoint and a partial recovery.json (no optimum, no figures);
    --from_run evaluates it: the optimum, the final figures and the fitted figures for each
    --fit_steps count (the verdict on the largest), with the training call's curve and steps."""
    from experiments.recovery import main

    run_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    assert main(tiny_recovery_args(workspace, run_dir, "--train_only", "true", "--max_steps", "2", *EVAL_ARGS)) == 0
    part = json.load(open(run_dir / "recovery.json"))
    assert part["stage"] == "trained" and part["steps"] == 2 and part["curve"][-1]["step"] == 2
    assert "figures" not in part and "optimum" not in part and "fitted" not in part
    assert set(part["step_ms"]) == {"render_data", "network_forward", "face_model_render_loss", "backward_step"}
    assert os.path.isfile(run_dir / "regressor.pth") and os.path.isfile(run_dir / "learning_curve.png")
    assert sorted(os.listdir(run_dir)) == ["learning_curve.png", "recovery.json", "regressor.pth"]

    # the evaluation takes its own evaluation options and the run's training options (size, seed, network)
    assert main(["--from_run", str(run_dir), "--bfm_folder", workspace["bfm"], "--device", "cpu", "--eval_size", "4",
                 "--eval_batch", "2", "--oracle_steps", "0", "--out", str(eval_dir), "--verbose", "false",
                 "--fit_min_lr", "0", "--fit_landmark_share", "0.34", "--fit_loss", "train,front", "--fit_uniform_rates",
                 "true", *EVAL_ARGS]) == 0
    res = json.load(open(eval_dir / "recovery.json"))
    assert res["stage"] == "evaluated" and res["from_run"] == str(run_dir)
    assert res["steps"] == 2 and res["curve"] == part["curve"] and res["step_ms"] == part["step_ms"]
    assert res["options"]["size"] == 64 and res["options"]["batch_size"] == 2 and res["figures"]["faces"] == 4
    assert res["optimum"]["faces"] == 2 and res["optimum"]["steps"] == [2, 2]
    by_steps, vs = res["fitted_by_steps"], res["vs_optimum"]
    # --fit_loss train,front: the first loss's counts by number, the second's as "front:N"
    assert set(by_steps) == {"2", "3", "front:2", "front:3"}
    assert [by_steps[n]["steps"] for n in ("2", "3", "front:2", "front:3")] == [2, 3, 2, 3]
    assert all(f["faces"] == 3 and f["min_lr"] == 0.0 for f in by_steps.values())  # --fit_faces, --fit_min_lr
    assert [by_steps[n]["landmark_steps"] for n in ("2", "3")] == [1, 1]  # round(0.34 x steps)
    assert all(by_steps[n]["front_only"] is False for n in ("2", "3"))
    assert all(by_steps[n]["front_only"] is True for n in ("front:2", "front:3"))
    assert all(f["uniform_rates"] is True for f in by_steps.values())
    assert set(vs["fitted_by_steps"]) == set(by_steps)
    assert res["fitted"] == by_steps["3"]  # the largest count gives the verdict
    opt_v = res["optimum"]["vertex_error_ratio"]
    for n in ("2", "3"):
        assert vs["fitted_by_steps"][n]["vertex_vs_optimum"] == pytest.approx(
            vs["fitted_by_steps"][n]["vertex_error_ratio"] / opt_v)
    assert vs["fitted_vertex_vs_optimum"] == vs["fitted_by_steps"]["3"]["vertex_vs_optimum"]
    assert res["pass_fitted"]["vertex_vs_optimum"] == (vs["fitted_vertex_vs_optimum"] <= 1.05)
    assert sorted(os.listdir(eval_dir)) == ["learning_curve.png", "recovery.json", "samples.png"]


def test_recovery_staged_plan_and_mean_start(workspace, tmp_path):
    """--fit_loss staged fits with test.py's plan as it is (its phases recorded); --fit_mean_start
    also fits from the mean face and keeps each face's lower-loss end, so its mean loss is at most
    the prediction-only fit's (per face the lower of two ends; the prediction's end of the paired
    fit equals the single fit up to the batch-wide photometric normalisation, which Adam ignores)."""
    from experiments.recovery import main
    from models.fitting import fit_config

    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    assert main(tiny_recovery_args(workspace, run_dir, "--train_only", "true", "--max_steps", "2")) == 0
    assert main(["--from_run", str(run_dir), "--bfm_folder", workspace["bfm"], "--device", "cpu", "--eval_size", "4",
                 "--eval_batch", "2", "--oracle_steps", "0", "--out", str(eval_dir), "--verbose", "false",
                 "--fit_loss", "staged,train", "--fit_mean_start", "true", "--optimum_faces", "2",
                 "--optimum_refine_steps", "2", "--optimum_steps", "2", "--fit_steps", "20", "--fit_faces", "3"]) == 0
    res = json.load(open(eval_dir / "recovery.json"))
    by_steps = res["fitted_by_steps"]
    assert set(by_steps) == {"20", "20+mean", "train:20", "train:20+mean"}
    plan = [dataclasses.asdict(p) for p in fit_config("staged")]
    for p, n in zip(plan, (1, 3, 16)):  # each phase's own steps of the 20: 5 %, 13 %, the rest
        p["steps"] = n
    assert json.loads(json.dumps(plan)) == by_steps["20"]["plan"] == by_steps["20+mean"]["plan"]
    assert "plan" not in by_steps["train:20"] and by_steps["train:20"]["front_only"] is False
    for key in ("20", "train:20"):
        plain, both = by_steps[key], by_steps[key + "+mean"]
        assert 0.0 <= both["from_mean_face"] <= 1.0 and "from_mean_face" not in plain
        assert both["loss"] <= plain["loss"] * (1 + 1e-3)
        assert plain["loss"] > 0 and math.isfinite(plain["loss"])
    vs = res["vs_optimum"]["fitted_by_steps"]
    assert all("loss" in f for f in vs.values())
    assert res["fitted"] == by_steps["20"]  # the first --fit_loss's plain count gives the verdict


def test_recovery_second_call_equals_one_call(workspace, tmp_path):
    """Evaluating a run's saved weights with --from_run gives exactly the figures that the
    one-call run computed from the same weights (same held-out faces, optimum and fitting)."""
    from experiments.recovery import main

    one, again, ckpt = tmp_path / "one", tmp_path / "again", tmp_path / "net.pth"
    assert main(tiny_recovery_args(workspace, one, "--max_steps", "1", "--checkpoint", str(ckpt), *EVAL_ARGS)) == 0
    assert main(["--from_run", str(one), "--checkpoint", str(ckpt), "--bfm_folder", workspace["bfm"], "--device",
                 "cpu", "--eval_size", "4", "--eval_batch", "2", "--oracle_steps", "0", "--out", str(again),
                 "--verbose", "false", *EVAL_ARGS]) == 0
    a, b = json.load(open(one / "recovery.json")), json.load(open(again / "recovery.json"))

    def timeless(x):
        if isinstance(x, dict):
            return {k: timeless(v) for k, v in x.items() if k != "seconds"}
        return x

    for key in ("figures", "vs_optimum", "pass", "pass_fitted"):
        assert a[key] == b[key], key
    assert timeless(a["optimum"]) == timeless(b["optimum"]) and timeless(a["fitted_by_steps"]) == timeless(
        b["fitted_by_steps"])
    assert b["steps"] == a["steps"] == 1 and b["curve"] == a["curve"]


def test_recovery_from_run_fails_early_on_a_missing_file(workspace, tmp_path, capsys):
    from experiments.recovery import main, parse_recovery_options

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recovery.json").write_text(json.dumps({"options": {}, "curve": []}))
    assert main(["--from_run", str(empty), "--bfm_folder", workspace["bfm"], "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty / "regressor.pth") in err and "--train_only" in err
    assert main(["--from_run", str(tmp_path / "nothing"), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "recovery.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    for bad in (["--fit_steps", "300,x"], ["--ema", "1"], ["--train_only", "true", "--from_run", "d"],
                ["--fit_loss", "exact"], ["--fit_loss", "train,train"], ["--fit_loss", ","]):
        with pytest.raises(SystemExit):
            parse_recovery_options(bad)
    assert parse_recovery_options(["--fit_steps", "2000, 300,300"]).fit_steps == "2000, 300,300"
    from experiments.recovery import fit_counts

    assert fit_counts("2000, 300,300") == [300, 2000] and fit_counts("0") == []


def test_weight_ema_equals_an_independent_average(workspace, tmp_path, monkeypatch):
    """WeightEma after a few Adam steps equals avg_k = d avg_(k-1) + (1 - d) w_k computed from the
    recorded weights (parameters and batch-norm statistics); in a --train_only run with --ema the
    checkpoint holds that average of the network's weights after each training step."""
    import train as train_module
    from experiments.recovery import WeightEma

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    d = 0.7
    ema = WeightEma(net, d)
    expect = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        ema.update(net)
        for k, v in net.state_dict().items():
            expect[k] = d * expect[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-7)
    assert int(got["1.num_batches_tracked"]) == 3 and not torch.equal(got["0.weight"], net[0].weight)

    # in a run: record the network's weights before training and after each step, average them here
    seen = []
    original = train_module.train_step

    def recording_step(model, *args, **kwargs):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in model.net.state_dict().items()})
        out = original(model, *args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in model.net.state_dict().items()})
        return out

    monkeypatch.setattr(train_module, "train_step", recording_step)
    from experiments.recovery import main

    out = tmp_path / "ema"
    assert main(tiny_recovery_args(workspace, out, "--train_only", "true", "--max_steps", "3", "--ema", "0.6",
                                   "--profile_steps", "0")) == 0
    assert len(seen) == 4 and json.load(open(out / "recovery.json"))["ema"] == 0.6
    avg = dict(seen[0])
    for w in seen[1:]:
        avg = {k: 0.6 * avg[k] + 0.4 * w[k] if w[k].is_floating_point() else w[k] for k in w}
    saved = torch.load(out / "regressor.pth", weights_only=True)["net_recon"]
    assert set(saved) == set(avg)
    for k in avg:
        torch.testing.assert_close(saved[k], avg[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(saved[k], seen[-1][k]) for k in saved if saved[k].is_floating_point())


def test_loss_optimum_keeps_the_lower_end_per_face(workspace):
    """loss_optimum with no refinement: each face keeps whichever of its truth and its fitted
    mean-face start has the lower per-face loss."""
    from experiments.recovery import (loss_optimum, parse_recovery_options, per_face_loss, synthetic_setup,
                                      training_weights)
    from models.losses import HybridLoss

    o = parse_recovery_options(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64"])
    face_model, renderer, _, gen = synthetic_setup(o, torch.device("cpu"))
    batch = gen.sample(3, torch.Generator().manual_seed(1))
    loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
    best, info = loss_optimum(loss_fn, batch, fit_steps=4, refine_steps=0, steps=0, rounds=0)
    at_truth = per_face_loss(loss_fn, batch.coeffs, batch.images, batch.lm68)
    at_best = per_face_loss(loss_fn, best, batch.images, batch.lm68)
    assert bool((at_best <= at_truth + 1e-6).all())
    assert info["loss_from_truth"] == pytest.approx(float(at_truth.mean()), rel=1e-5)
    assert info["loss"] == pytest.approx(float(at_best.mean()), rel=1e-5)
    kept_truth = (best == batch.coeffs).all(dim=1)
    assert info["from_truth"] == pytest.approx(float(kept_truth.float().mean()))


def test_use_ddp_help_and_the_ranks_shares_of_a_batch():
    """--use_ddp (the original's flag) now means DistributedDataParallel; each rank's sampler
    yields its part of every whole batch, so the ranks together take the batches one process
    takes (also when resuming mid-epoch), and a batch that does not split is refused."""
    from options.base_options import build_parser
    from options.train_options import TrainOptions, parse_train_options
    from train import EpochSampler, torchrun_args

    assert parse_train_options(["--use_ddp", "False"]).use_ddp is False
    helps = [a.help for a in build_parser(TrainOptions)._actions if a.dest == "use_ddp"]
    assert "DistributedDataParallel" in helps[0]
    for start in (0, 8):
        one = list(EpochSampler(22, 3, 2, start=start, batch_size=8))
        parts = [list(EpochSampler(22, 3, 2, start=start, rank=r, world=2, batch_size=8)) for r in range(2)]
        whole = (len(one) // 8) * 8  # only whole batches: each rank steps as often as the others
        assert [len(p) for p in parts] == [whole // 2] * 2
        for b in range(whole // 8):
            assert parts[0][4 * b:4 * b + 4] + parts[1][4 * b:4 * b + 4] == one[8 * b:8 * b + 8]
    with pytest.raises(ValueError, match="does not split"):
        EpochSampler(22, 3, 2, rank=0, world=3, batch_size=8)
    assert torchrun_args(2, ["--name", "x"])[:4] == ["--standalone", "--nnodes", "1", "--nproc_per_node"]


def test_several_gpu_ids_without_those_gpus_is_a_clear_error(workspace, capsys):
    from train import main

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    assert main(["--name", "x", "--gpu_ids", "0,1", "--init_path", ""]) == 2
    assert "torch sees" in capsys.readouterr().err


@pytest.mark.gpu
def test_train_on_cuda_and_gpu_ids_beyond_the_machine(workspace, capsys):
    """One process on the GPU: two steps, a checkpoint test.py's loader reads; --gpu_ids naming
    more GPUs than the machine has is a one-line error (exit 2) before anything starts."""
    from models.networks import load_recon_net
    from train import main

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ws = workspace
    flist = prepare(ws)
    assert main(train_args(ws, flist, "gpu", "--device", "cuda", "--gpu_ids", "0", "--max_steps", "2")) == 0
    load_recon_net(os.path.join(ws["root"], "ck", "gpu", "epoch_latest.pth"), "resnet18")
    assert ckpt(ws, "gpu", "latest")["total_iters"] == 2
    n = torch.cuda.device_count()
    assert main(train_args(ws, flist, "gpus", "--device", "cuda", "--gpu_ids", ",".join(map(str, range(n + 1))))) == 2
    assert f"asks for GPU {n}, but torch sees {n} CUDA device(s)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["whole", "landmarks"])
def test_two_ranks_average_their_gradients(workspace, tmp_path, stage):
    """torchrun --nproc_per_node 2 train.py on the CPU (gloo): one step on a batch of 4, each rank
    taking 2 faces, gives the weights of one Adam step on the mean of the two halves' gradients
    (computed here, in one process, each half from the same start), with rank 0's batch-norm
    statistics; rank 0 alone wrote the checkpoint, which test.py's loader reads. The same for the
    first step of ``--curriculum`` (the landmark stage's terms, no render): epoch 1 of 2."""
    import copy
    import subprocess
    import sys

    from models.fitting import landmark_stage_loss
    from models.networks import load_recon_net
    from options.train_options import parse_train_options
    from train import EpochSampler, Trainer

    ws = workspace
    flist = prepare(ws)
    # the landmark stage sees aligned landmarks, alike in every photo: augmented (reproducibly per
    # seed, epoch and index) the two halves' gradients differ enough for Adam's first step to tell
    common = ["--serial_batches", "True", "--use_aug", str(stage == "landmarks"), "--gpu_ids", "-1"]
    common += ["--max_steps", "1"] if stage == "whole" else ["--n_epochs", "2", "--curriculum", "0.5"]
    name = f"ddp_{stage}"
    args = train_args(ws, flist, name, "--batch_size", "4", *common)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc_per_node", "2", os.path.join(ROOT, "train.py"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes of 2 faces a batch" in r.stderr
    folder = os.path.join(ws["root"], "ck", name)
    saved = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    if stage == "whole":
        assert saved == ["epoch_latest.pth"]
    else:  # step 1 the landmark stage (epoch_1.pth), step 2 the whole loss
        assert saved == ["epoch_1.pth", "epoch_2.pth", "epoch_latest.pth"]
        assert "step 1 (" in r.stderr and "landmark_stage" in r.stderr
        assert "step 2: the landmark stage is over" in r.stderr
    tag = "latest" if stage == "whole" else "1"
    got = ckpt(ws, name, tag)["net_recon"]
    load_recon_net(os.path.join(folder, f"epoch_{tag}.pth"), "resnet18")

    # the same step in one process: each half's gradients from the same start, averaged
    tr = Trainer(parse_train_options(train_args(ws, flist, "ref", "--batch_size", "2", *common)))
    net = tr.model.net
    tr.train_set.set_epoch(1)  # as the run's first epoch
    start = copy.deepcopy(net.state_dict())
    grads, rank0_buffers = [], None
    for k, batch in enumerate(tr.loader(tr.train_set, 2, EpochSampler(N_PHOTOS, 0, 1, shuffle=False))):
        net.load_state_dict(start)
        net.train()
        images, lms, msks = tr.to_device(batch)
        coeffs = tr.model.predict_coeffs(images)
        loss = (tr.loss_fn(coeffs, images, lms, atten_mask=msks).terms.total if stage == "whole"
                else landmark_stage_loss(tr.model.face_model, coeffs, lms, tr.loss_fn.weights))
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        if k == 0:
            rank0_buffers = {n: b.clone() for n, b in net.named_buffers()}
    assert len(grads) == 2
    def one_step(grad_of) -> dict:
        net.load_state_dict(start)
        tr.optimizer.state.clear()
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = grad_of(g0, g1)
        tr.optimizer.step()
        return {**copy.deepcopy(net.state_dict()), **rank0_buffers}

    alone = one_step(lambda g0, g1: g0)  # what rank 0 would have done without DDP: told apart below
    want = one_step(lambda g0, g1: (g0 + g1) / 2)
    assert any(not torch.allclose(got[k].float(), alone[k].float(), atol=1e-6, rtol=1e-5) for k in want)
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-6, rtol=1e-5), k
    changed = [k for k in want if k.endswith("weight") and not torch.equal(want[k], start[k])]
    assert changed  # the step moved the weights


@pytest.mark.slow
def test_several_processes_stop_together_on_ctrl_c(workspace):
    """The launch that --gpu_ids 0,1 makes (train.py under torchrun), here with 2 CPU ranks:
    Ctrl-C stops both ranks after the same step, rank 0 saves epoch_latest.pth (mid-epoch), and
    the command exits with 130 without a traceback."""
    import signal
    import subprocess
    import sys
    import time

    ws = workspace
    flist = prepare(ws)
    args = train_args(ws, flist, "stop", "--batch_size", "4", "--n_epochs", "500", "--gpu_ids", "-1")
    code = f"import sys, train\nsys.exit(train.run_under_torchrun(2, {args!r}))"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, t0 = "", time.time()
    while "step 3 " not in seen and time.time() - t0 < 240 and p.poll() is None:
        seen += p.stdout.readline()
    os.killpg(p.pid, signal.SIGINT)
    seen += p.communicate(timeout=120)[0]
    assert p.returncode == 130, seen[-3000:]
    assert "Traceback" not in seen
    stopped = [ln for ln in seen.splitlines() if "signal 2: stopping after this step" in ln]
    assert {ln.split("rank ")[1][0] for ln in stopped} == {"0", "1"}
    latest = ckpt(ws, "stop", "latest")
    assert latest["epoch_complete"] is False and latest["total_iters"] >= 3


def test_recovery_oracles_only(workspace, tmp_path):
    from experiments.recovery import main

    out = tmp_path / "orc"
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--eval_size", "3",
                 "--eval_batch", "2", "--oracle_only", "true", "--oracle_steps", "30", "--out", str(out),
                 "--verbose", "false"]) == 0
    res = json.load(open(out / "oracles.json"))
    orc = res["landmark_oracle"]
    assert res["faces"] == 3 and set(orc) == {"all", "pose_exp", "pose_only"}
    # fitting more groups to the same true landmarks can only fit them better (same start, same steps)
    assert orc["all"]["lm_error_px"] <= orc["pose_only"]["lm_error_px"] + 1e-6


def test_training_loss_oracle_descends_from_the_truth(workspace, tmp_path):
    """The oracle starts at the true coefficients and only lowers the training loss; --oracle_only
    with --loss_oracle_steps writes its figures."""
    from experiments.recovery import (main, parse_recovery_options, synthetic_setup, training_loss_oracle,
                                      training_weights)
    from models.losses import HybridLoss

    o = parse_recovery_options(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64"])
    face_model, renderer, _, gen = synthetic_setup(o, torch.device("cpu"))
    batch = gen.sample(2, torch.Generator().manual_seed(0))
    loss_fn = HybridLoss(face_model, renderer, training_weights(o), use_crop_face=True)
    torch.testing.assert_close(training_loss_oracle(loss_fn, batch, 0), batch.coeffs)
    refined = training_loss_oracle(loss_fn, batch, 5, lr=1e-4)
    with torch.no_grad():
        before = float(loss_fn(batch.coeffs, batch.images, batch.lm68).terms.total)
        after = float(loss_fn(refined, batch.images, batch.lm68).terms.total)
    assert after < before and not torch.equal(refined, batch.coeffs)

    out = tmp_path / "orc"
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--eval_size", "2",
                 "--eval_batch", "2", "--oracle_only", "true", "--oracle_steps", "5", "--loss_oracle_steps", "2",
                 "--out", str(out), "--verbose", "false"]) == 0
    res = json.load(open(out / "oracles.json"))["training_loss_oracle"]
    assert res["steps"] == 2 and res["faces"] == 2 and np.isfinite(res["pose_error_deg"])


def test_synthetic_faces_in_range(workspace):
    """in_range: every face's lit colours end in 0..1; a face already in range keeps its lighting,
    one out of range keeps its lighting direction (only scaled toward neutral light)."""
    import dataclasses

    from experiments.recovery import parse_recovery_options, synthetic_setup
    from models.coeffs import COEFFS
    from data.synthetic import SyntheticFaces

    o = parse_recovery_options(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64"])
    face_model, renderer, syn, _ = synthetic_setup(o, torch.device("cpu"))
    bright = dataclasses.replace(syn, light_dir=0.3)
    raw = SyntheticFaces(face_model, renderer, bright).sample_coeffs(16, torch.Generator().manual_seed(3))
    fixed = SyntheticFaces(face_model, renderer, dataclasses.replace(bright, in_range=True)).sample_coeffs(
        16, torch.Generator().manual_seed(3))
    with torch.no_grad():
        before, after = face_model(raw).color, face_model(fixed).color
    was_out = ((before < 0) | (before > 1)).flatten(1).any(dim=1)
    assert was_out.any() and (~was_out).any()  # the fixture has both kinds
    assert float(after.min()) >= 0.0 and float(after.max()) <= 1.0
    g_raw, g_fix = COEFFS.split(raw)["gamma"], COEFFS.split(fixed)["gamma"]
    torch.testing.assert_close(g_fix[~was_out], g_raw[~was_out])
    s = (g_fix[was_out] * g_raw[was_out]).sum(1) / g_raw[was_out].pow(2).sum(1)  # scale per face
    assert bool(((s >= 0) & (s < 1)).all())
    torch.testing.assert_close(g_fix[was_out], s[:, None] * g_raw[was_out])
    # everything but the lighting is the same draw
    keep = [k for k in COEFFS.names if k != "gamma"]
    for k in keep:
        torch.testing.assert_close(COEFFS.split(fixed)[k], COEFFS.split(raw)[k])


def test_fitting_figures_from_the_mean_face(workspace, tmp_path):
    """--fit_steps in --oracle_only fits test.py's way from the mean face: its start is the mean
    face (vertex ratio exactly 1) and fitting to the true 68 landmarks brings them closer."""
    from experiments.recovery import main

    out = tmp_path / "orc"
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--eval_size", "2",
                 "--eval_batch", "2", "--oracle_only", "true", "--oracle_steps", "0", "--fit_steps", "12",
                 "--out", str(out), "--verbose", "false"]) == 0
    res = json.load(open(out / "oracles.json"))["fitting_from_mean_face"]
    assert res["steps"] == 12 and res["faces"] == 2 and res["seconds"] > 0
    assert res["start"]["vertex_error_ratio"] == pytest.approx(1.0)
    assert res["lm_error_px"] < res["start"]["lm_error_px"]


def test_loss_landscape_compares_the_two_minima(workspace, tmp_path):
    """experiments.loss_landscape: the truth has no error, the line runs from the fitted to the
    refined truth (its ends are those points), and every entry carries the loss terms."""
    from experiments.loss_landscape import main

    out = tmp_path / "landscape.json"
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--faces", "2",
                 "--fit_steps", "6", "--refine_steps", "2", "--line_points", "3", "--more_steps", "2",
                 "--out", str(out)]) == 0
    res = json.load(open(out))
    further = res["refined_further"]
    assert further["steps_per_round"] == 2 and len(further["truth_refined"]) == len(further["fitted_then_refined"]) == 2
    assert res["faces"] == 2 and res["fit_steps"] == 6 and res["refine_steps"] == 2
    assert res["weights"]["w_reg"] == 3e-4 and res["weights"]["w_feat"] == 0.0  # the original's, no identity net
    assert res["truth"]["vertex_error_ratio"] == pytest.approx(0.0, abs=1e-6)
    line = res["line_fitted_to_truth_refined"]
    assert [p["t"] for p in line] == [0.0, 0.5, 1.0]
    for end, key in ((line[0], "fitted_from_mean"), (line[-1], "truth_refined")):
        for k in ("vertex_error_ratio", "loss_all", "loss_color", "loss_reg"):
            assert end[k] == pytest.approx(res[key][k], rel=1e-5, abs=1e-7)
    assert res["fitted_from_mean"]["vertex_error_ratio"] > res["truth_refined"]["vertex_error_ratio"]


def test_similarity_align_recovers_a_known_transform():
    from experiments.recovery import rotation_error_deg, similarity_align
    from models.bfm import ParametricFaceModel

    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 40, 3, generator=g)
    rot = ParametricFaceModel.compute_rotation(torch.tensor([[0.3, -0.2, 0.1], [0.0, 1.0, 0.0], [-0.5, 0.2, 2.0]]))
    dst = 1.7 * src @ rot + torch.tensor([0.5, -1.0, 2.0])
    aligned, r = similarity_align(src, dst)
    assert torch.allclose(aligned, dst, atol=1e-5)
    assert float(rotation_error_deg(r, rot).max()) < 0.01
    # a reflection is not a rotation: the best proper fit of a mirrored cloud leaves an error
    mirrored = dst * torch.tensor([-1.0, 1.0, 1.0])
    aligned, r = similarity_align(src, mirrored)
    assert torch.allclose(torch.linalg.det(r), torch.ones(3), atol=1e-5)
    assert float((aligned - mirrored).abs().max()) > 0.1


def test_rigid_fraction_and_landmark_oracle(workspace):
    from experiments.recovery import landmark_oracle, rigid_fraction
    from models.bfm import ParametricFaceModel
    from models.coeffs import COEFFS

    fm = ParametricFaceModel.from_folder(workspace["bfm"])
    mean = fm.mean_shape.view(-1, 3)
    # a basis made of a pure translation and a pure rotation field is all rigid; its complement is not
    rigid = torch.stack([torch.ones_like(mean[:, 0:1]).expand_as(mean) * torch.tensor([1.0, 0, 0]),
                         torch.linalg.cross(torch.tensor([0, 1.0, 0]).expand_as(mean), mean - mean.mean(0))], 1)
    fm.id_base = rigid.permute(0, 2, 1).reshape(-1, 2)
    assert rigid_fraction(fm)["id"] == pytest.approx(1.0, abs=1e-6)
    fm = ParametricFaceModel.from_folder(workspace["bfm"])
    true = torch.zeros(2, COEFFS.total)
    true[:, :3] = torch.tensor([[1.0, -0.5, 0.3], [-1.0, 0.2, 0.8]])
    fit = landmark_oracle(fm, true, steps=200, lr=0.05)
    before = (fm.landmarks(torch.zeros_like(true)) - fm.landmarks(true)).norm(dim=-1).mean()
    after = (fm.landmarks(fit) - fm.landmarks(true)).norm(dim=-1).mean()
    assert after < 0.2 * before


def test_train_with_an_identity_network(workspace, tmp_path, caplog):
    pytest.importorskip("kornia", reason='the identity loss needs kornia: pip install -e ".[train]"')
    from test_losses import TinyRecog
    from train import main

    ws = workspace
    path = tmp_path / "recog.pt2"
    exported = torch.export.export(TinyRecog().eval(), (torch.rand(2, 3, 112, 112),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(exported, str(path))
    with caplog.at_level("INFO", logger="train"):
        assert main(train_args(ws, prepare(ws), "ident", "--net_recog", "export", "--net_recog_path", str(path),
                               "--max_steps", "1")) == 0
    line = next(r.message for r in caplog.records if "step 1 " in r.message)
    assert float(line.split(" feat ")[1].split()[0]) > 0
    assert main(train_args(ws, prepare(ws), "ident2", "--net_recog_path", str(tmp_path / "nothere.pth"))) == 2


def test_synthetic_batches_drawn_in_chunks(workspace):
    """SyntheticFaces.batches(n, g, chunk): batches of n fresh faces, each chunk the same draw and
    render as one sample of chunk * n faces from the same seed (no face repeated)."""
    from experiments.recovery import parse_recovery_options, synthetic_setup

    o = parse_recovery_options(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "32"])
    _, _, _, gen = synthetic_setup(o, torch.device("cpu"))
    stream = gen.batches(3, torch.Generator().manual_seed(5), chunk=2)
    got = [next(stream) for _ in range(4)]  # two chunks
    g = torch.Generator().manual_seed(5)
    want = [gen.sample(6, g), gen.sample(6, g)]
    for i, b in enumerate(got):
        w, part = want[i // 2], slice(3 * (i % 2), 3 * (i % 2) + 3)
        assert b.images.shape == (3, 3, 32, 32) and b.lm68.shape == (3, 68, 2)
        torch.testing.assert_close(b.images, w.images[part])
        torch.testing.assert_close(b.coeffs, w.coeffs[part])
        torch.testing.assert_close(b.lm68, w.lm68[part])
    coeffs = torch.cat([b.coeffs for b in got])
    assert torch.cdist(coeffs, coeffs).add(torch.eye(12) * 1e9).min() > 1.0  # 12 different faces
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        next(gen.batches(3, torch.Generator(), chunk=0))


def test_recovery_speed_options_on_the_cpu(workspace, tmp_path, capsys):
    """--data_chunk, --fused_adam and --appearance_grad train on the CPU; --cuda_graph on the CPU is a one-line
    error before anything runs, as is a chunk below 1; graphing a module needs a CUDA input."""
    from experiments.recovery import main
    from models.networks import ReconNet, graphed_for_training

    out = tmp_path / "rec"
    assert main(tiny_recovery_args(workspace, out, "--max_steps", "3", "--data_chunk", "2", "--fused_adam", "true",
                                   "--appearance_grad", "0.5", "--train_only", "true")) == 0
    res = json.load(open(out / "recovery.json"))
    assert res["steps"] == 3 and res["data_chunk"] == 2 and res["fused_adam"] is True and res["appearance_grad"] == 0.5
    assert res["cuda_graph"] is False  # auto: off on the CPU
    assert all(np.isfinite(p["loss"]) for p in res["curve"])
    for bad, msg in ((["--cuda_graph", "true"], "--cuda_graph needs a CUDA device"),
                     (["--data_chunk", "0"], "--data_chunk must be >= 1")):
        with pytest.raises(SystemExit):
            main(tiny_recovery_args(workspace, tmp_path / "bad", *bad))
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA input"):
        graphed_for_training(ReconNet("resnet18"), torch.zeros(1, 3, 64, 64))


def test_appearance_grad_hooks_are_registered_once_per_session(workspace, tmp_path):
    """--appearance_grad's hooks go on the network where the session builds it: training the same
    session twice (as bench_train_step's warm-up and timed steps do) leaves one hook per head."""
    import time

    from experiments.recovery import make_session, parse_recovery_options, train
    from models.coeffs import COEFFS

    o = parse_recovery_options(tiny_recovery_args(workspace, tmp_path / "r", "--max_steps", "1", "--appearance_grad",
                                                  "0.5", "--optimum_faces", "0"))
    s = make_session(o)
    heads = [s.net.final_layers[COEFFS.names.index(n)] for n in ("tex", "gamma")]
    for _ in range(2):
        assert train(o, s, deadline=time.perf_counter() + 60)["steps"] == 1
        assert [len(h._forward_pre_hooks) for h in heads] == [1, 1]


def test_photometric_ramp_after_the_landmark_stage(workspace, tmp_path, capsys):
    """--curriculum_ramp: the photometric weight is 0 in the landmark stage, rises linearly over
    the ramp, then stays at --w_color (stage_at, with the appearance stage's place; stage_changes
    finds where stages begin on a curve, for the picture); a run inside the ramp records its scale on the curve and
    leaves the loss with its whole weights for evaluation; fractions outside [0, 1) are errors."""
    import time

    from experiments.recovery import (main, make_session, parse_recovery_options, stage_at, stage_changes, train,
                                      training_weights)

    curve = [{"step": 1, "stage": "landmarks"}, {"step": 5, "stage": "landmarks"}, {"step": 9, "stage": "appearance"},
             {"step": 12, "stage": "all"}, {"step": 15, "stage": "all"}, {"step": 16}]
    assert stage_changes(curve) == [(9, "appearance"), (12, "all")]
    at = [stage_at(f, 0.3, 0.1, 0.2) for f in (0.0, 0.29, 0.3, 0.35, 0.4, 0.5, 0.9)]
    assert [a[0] for a in at] == ["landmarks", "landmarks", "appearance", "appearance", "all", "all", "all"]
    assert [a[1] for a in at] == pytest.approx([0, 0, 0, 0.25, 0.5, 1, 1])
    assert stage_at(0.3, 0.3, 0.0, 0.0) == ("all", 1.0) and stage_at(0.0, 0.0, 0.0, 0.0) == ("all", 1.0)
    o = parse_recovery_options(tiny_recovery_args(workspace, tmp_path / "r", "--max_steps", "2", "--curriculum_ramp",
                                                  "0.99", "--curve_every_s", "0"))
    s = make_session(o)
    rec = train(o, s, time.perf_counter() + 600)
    points = [p for p in rec["curve"] if "w_color_scale" in p]
    assert rec["steps"] == 2 and len(points) == 2 and all(p["stage"] == "all" for p in points)
    assert all(0.0 <= p["w_color_scale"] < 0.01 for p in points)  # 2 steps into a 10-minute ramp
    # the photometric term is scaled with it (an image distance of 0..1 colours stays below 2)
    assert all(0 <= p["color"] <= 2 * 1.92 * p["w_color_scale"] for p in points)
    assert s.loss_fn.weights == training_weights(o) and s.loss_fn.weights.w_color == 1.92
    for bad in (["--curriculum_ramp", "1"], ["--curriculum", "-0.1"], ["--curriculum", "1.1"],
                ["--curriculum", "0.6", "--appearance_stage", "0.5"]):
        with pytest.raises(SystemExit):
            main(tiny_recovery_args(workspace, tmp_path / "bad", *bad))
        assert "fractions of the training budget: the first two in [0, 1]" in capsys.readouterr().err
    # the two stages may fill the budget: no step of the whole loss (a last 1% of it undid session 36's
    # landmark-only run); the loop ends when the budget is spent, so frac never reaches 1
    assert stage_at(0.999, 1.0, 0.0, 0.0) == ("landmarks", 0.0)
    assert stage_at(0.999, 0.6, 0.4, 0.0) == ("appearance", 1.0)
    o = parse_recovery_options(tiny_recovery_args(workspace, tmp_path / "lm", "--max_steps", "3", "--curriculum", "1",
                                                  "--curve_every_s", "0"))
    rec = train(o, make_session(o), time.perf_counter() + 600)
    assert rec["steps"] == rec["landmark_steps"] == 3 and rec["appearance_steps"] == 0
    assert parse_recovery_options(tiny_recovery_args(workspace, tmp_path / "ap", "--curriculum", "0.6",
                                                     "--appearance_stage", "0.4")).appearance_stage == 0.4


def test_appearance_stage_trains_texture_and_lighting_only_through_the_render(workspace, tmp_path):
    """--appearance_stage: detach_geometry keeps the values and passes gradients to texture and
    lighting only; an appearance step's loss is the landmark stage's terms plus the photometric
    term; a run in that stage labels its curve points "appearance" and counts its steps."""
    import time

    from experiments.recovery import (appearance_step, detach_geometry, make_session, parse_recovery_options,
                                      train)
    from models.coeffs import COEFFS
    from models.fitting import landmark_stage_loss

    c = torch.randn(2, 257, requires_grad=True)
    d = detach_geometry(c)
    assert torch.equal(d, c)
    d.sum().backward()
    sl = COEFFS.slices()
    for name, passes in (("id", 0), ("exp", 0), ("tex", 1), ("angle", 0), ("gamma", 1), ("trans", 0)):
        assert torch.all(c.grad[:, sl[name]] == passes), name

    o = parse_recovery_options(tiny_recovery_args(workspace, tmp_path / "r", "--max_steps", "2", "--curriculum", "0.5",
                                                  "--appearance_stage", "0.45", "--curriculum_ramp", "0",
                                                  "--curve_every_s", "0"))
    s = make_session(o)
    batch = next(s.gen.batches(2, torch.Generator().manual_seed(0)))
    optimizer = torch.optim.SGD(s.net.parameters(), lr=0.0)  # lr 0: the step leaves the network as it is
    loss, terms = appearance_step(s.model, s.loss_fn, optimizer, batch.images, batch.lm68)
    with torch.no_grad():
        s.net.train()
        coeffs = s.model.predict_coeffs(batch.images).float()
        want = landmark_stage_loss(s.face_model, coeffs, batch.lm68, s.loss_fn.weights) + \
            s.loss_fn(coeffs, batch.images, batch.lm68).terms.color
    assert float(loss) == pytest.approx(float(want), rel=1e-4) and float(terms.color.detach()) > 0
    o = dataclasses.replace(o, curriculum=0.0, appearance_stage=0.99)
    rec = train(o, s, time.perf_counter() + 600)
    assert rec["appearance_steps"] == 2 and rec["landmark_steps"] == 0
    assert [p["stage"] for p in rec["curve"] if "stage" in p] == ["appearance", "appearance"]


def test_gradient_balance_splits_the_photometric_pull_by_coefficient_group(workspace, tmp_path, capsys):
    """experiments.gradient_balance on a checkpoint whose texture and lighting heads are zero: the
    photometric term reaches the backbone through geometry only (its appearance share is exactly
    0, in every part of the backbone), the landmark terms' own row is 1x with cosine 1, the parts'
    squared norms add up to the whole's; a missing, unreadable or other-architecture checkpoint is
    a one-line error."""
    from experiments.gradient_balance import main
    from models.networks import ReconNet

    torch.manual_seed(0)
    net = ReconNet("resnet18")
    with torch.no_grad():
        for i, head in enumerate(net.final_layers):  # heads: id, exp, tex, angle, gamma, txy, tz
            head.weight.normal_(0, 0.0 if i in (2, 4) else 0.01)
    ckpt, out = tmp_path / "reg.pth", tmp_path / "gb.json"
    torch.save({"net_recon": net.state_dict()}, ckpt)
    assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--checkpoint", str(ckpt),
                 "--faces", "4", "--eval_batch", "2", "--out", str(out)]) == 0
    res = json.load(open(out))
    g, parts = res["gradients"], res["by_part"]
    assert list(parts) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    # the parts split the backbone's gradient: their squared norms add up to the whole one's
    for k in g:
        assert sum(parts[p][k]["norm"] ** 2 for p in parts) == pytest.approx(g[k]["norm"] ** 2, rel=1e-6)
    assert all(parts[p]["photometric_appearance"]["norm"] == 0 for p in parts)
    assert g["landmarks"]["x_landmarks"] == pytest.approx(1) and g["landmarks"]["cosine_with_landmarks"] == \
        pytest.approx(1)
    assert g["landmarks"]["norm"] > 0 and g["photometric_geometry"]["norm"] > 0
    assert g["photometric_appearance"]["norm"] == 0
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "none.pth")])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for path, msg in ((bad, "cannot read checkpoint"), (ckpt, "does not fit --net_recon resnet50")):
        assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--checkpoint", str(path),
                     "--net_recon", "resnet50", "--faces", "2", "--eval_batch", "2", "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err


def test_appearance_grad_scales_what_the_appearance_heads_pass_to_the_backbone(workspace, tmp_path, capsys):
    """--appearance_grad a: the photometric gradient reaching the backbone through texture and
    lighting is a times the unscaled one (gradient_balance, same faces), the one through geometry
    is unchanged, the predictions are the same; a < 0 is a one-line error."""
    from experiments.gradient_balance import main
    from experiments.recovery import main as recovery_main, scale_appearance_gradient
    from models.networks import ReconNet

    torch.manual_seed(0)
    net = ReconNet("resnet18")
    with torch.no_grad():
        for head in net.final_layers:
            head.weight.normal_(0, 0.01)
    ckpt = tmp_path / "reg.pth"
    torch.save({"net_recon": net.state_dict()}, ckpt)
    runs = {}
    for a in ("1", "0.25"):
        out = tmp_path / f"gb{a}.json"
        assert main(["--bfm_folder", workspace["bfm"], "--device", "cpu", "--size", "64", "--checkpoint", str(ckpt),
                     "--faces", "2", "--eval_batch", "2", "--appearance_grad", a, "--out", str(out)]) == 0
        runs[a] = json.load(open(out))["gradients"]
    assert runs["0.25"]["photometric_appearance"]["norm"] == pytest.approx(
        0.25 * runs["1"]["photometric_appearance"]["norm"], rel=1e-4)
    # through the geometry unchanged (the landmark stage's terms include the texture and lighting
    # regularisers, which pass through those heads too)
    assert runs["0.25"]["photometric_geometry"]["norm"] == pytest.approx(runs["1"]["photometric_geometry"]["norm"],
                                                                          rel=1e-5)
    x = torch.rand(2, 3, 64, 64)
    net.eval()
    before = net(x)
    handles = scale_appearance_gradient(net, 0.0)
    assert torch.allclose(net(x), before, atol=1e-7) and len(handles) == 2
    with pytest.raises(SystemExit):
        recovery_main(tiny_recovery_args(workspace, tmp_path / "bad", "--appearance_grad", "-1"))
    assert "--appearance_grad must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bfm_folder", workspace["bfm"], "--checkpoint", str(ckpt), "--appearance_net", "separate"])
    assert "share nothing to balance" in capsys.readouterr().err


def test_split_recon_net_gives_each_backbone_only_its_own_groups():
    """SplitReconNet: geometry groups from the geometry network, texture and lighting from the
    appearance network; a loss on texture and lighting moves only the appearance network's
    parameters, one on the geometry only the geometry network's."""
    from experiments.recovery import GEOMETRY, SplitReconNet
    from models.coeffs import COEFFS

    torch.manual_seed(0)
    net = SplitReconNet("resnet18").eval()
    with torch.no_grad():
        for head in (*net.geometry.final_layers, *net.appearance.final_layers):
            head.weight.normal_(0, 0.01)
            head.bias.normal_(0, 0.1)
    x = torch.rand(2, 3, 64, 64)
    out, geo, app = (COEFFS.split(f(x)) for f in (net, net.geometry, net.appearance))
    for name in COEFFS.names:
        assert torch.equal(out[name], (geo if name in GEOMETRY else app)[name])
    for names, moved, still in ((("tex", "gamma"), net.appearance, net.geometry),
                                (GEOMETRY, net.geometry, net.appearance)):
        net.zero_grad(set_to_none=True)
        sum(COEFFS.split(net(x))[n].square().sum() for n in names).backward()
        assert all(p.grad is None or not p.grad.any() for p in still.parameters())
        assert moved.backbone.conv1.weight.grad.abs().sum() > 0
    # downscaled by 2, the appearance network reads the 2x2 block means, the geometry the image
    half = SplitReconNet("resnet18", appearance_downscale=2).eval()
    half.load_state_dict(net.state_dict())
    blocks = x.reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5))
    got, app_small = COEFFS.split(half(x)), COEFFS.split(net.appearance(blocks))
    for name in COEFFS.names:
        assert torch.allclose(got[name], (geo if name in GEOMETRY else app_small)[name], atol=1e-6)


def test_recovery_with_a_separate_appearance_network(workspace, tmp_path, capsys):
    """--appearance_net separate trains (appearance stage, then the whole loss), saves both
    networks and a --from_run call evaluates them; with --appearance_grad it is a one-line error."""
    from experiments.recovery import main

    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    assert main(tiny_recovery_args(workspace, run_dir, "--train_only", "true", "--max_steps", "3",
                                   "--appearance_net", "separate", "--appearance_stage", "0.5", "--profile_start",
                                   "0", "--appearance_downscale", "2")) == 0
    part = json.load(open(run_dir / "recovery.json"))
    assert part["appearance_net"] == "separate" and part["steps"] == 3 and part["appearance_steps"] >= 1
    assert part["appearance_downscale"] == 2
    state = torch.load(run_dir / "regressor.pth", weights_only=True)["net_recon"]
    assert {k.split(".")[0] for k in state} == {"geometry", "appearance"}
    assert main(["--from_run", str(run_dir), "--bfm_folder", workspace["bfm"], "--device", "cpu", "--eval_size", "4",
                 "--eval_batch", "2", "--oracle_steps", "0", "--out", str(eval_dir), "--verbose", "false",
                 *EVAL_ARGS]) == 0
    res = json.load(open(eval_dir / "recovery.json"))
    assert res["options"]["appearance_net"] == "separate" and np.isfinite(res["figures"]["vertex_error_ratio"])
    with pytest.raises(SystemExit):
        main(tiny_recovery_args(workspace, tmp_path / "bad", "--appearance_net", "separate", "--appearance_grad", "0"))
    assert "with --appearance_net separate nothing is shared" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(tiny_recovery_args(workspace, tmp_path / "bad", "--appearance_downscale", "2"))
    assert "above 1 only with --appearance_net separate" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_graphed_network_equals_the_eager_one():
    """graphed_for_training: in training mode the replayed forward and backward give the eager
    network's outputs, gradients and batch-norm statistics (same weights, same batch), on a
    second batch too (the static input is refilled); eval mode runs eagerly; the capture leaves
    the batch-norm statistics as they were."""
    import copy

    from models.networks import ReconNet, graphed_for_training

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    eager = ReconNet("resnet18").to_empty(device=dev)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.05)
        for name, b in eager.named_buffers():
            b.fill_(1 if name.endswith("running_var") else 0)
    graphed = copy.deepcopy(eager)
    before = [b.clone() for b in graphed.buffers()]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        graphed_for_training(graphed, torch.rand(4, 3, 224, 224, device=dev))
        for a, b in zip(graphed.buffers(), before):
            torch.testing.assert_close(a, b)
        assert graphed_for_training(graphed, torch.rand(4, 3, 224, 224, device=dev)) is graphed  # once only
        with pytest.raises(ValueError, match="already graphed for inputs of shape"):
            graphed_for_training(graphed, torch.rand(2, 3, 224, 224, device=dev))
        for seed in (1, 2):
            x = torch.rand(4, 3, 224, 224, device=dev, generator=torch.Generator(dev).manual_seed(seed))
            outs = []
            for net in (eager, graphed):
                net.train()
                net.zero_grad(set_to_none=True)
                y = net(x)
                (y * torch.linspace(-1, 1, y.shape[1], device=dev)).sum().backward()
                outs.append((y.detach().clone(), [p.grad.clone() for p in net.parameters()],
                             [b.clone() for b in net.buffers()]))
            (y0, g0, b0), (y1, g1, b1) = outs
            torch.testing.assert_close(y1, y0, rtol=1e-3, atol=1e-4)
            for a, b in zip(g1, g0):
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
            for a, b in zip(b1, b0):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-5)
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 224, 224, device=dev)  # another batch size: only the eager path takes it
        torch.testing.assert_close(graphed(x), eager(x), rtol=1e-3, atol=1e-4)


def test_train_step_benchmark_runs_each_variant(workspace, tmp_path):
    """benchmarks/bench_train_step.py on the CPU at a tiny size: one record per variant with the
    steps it timed and ms/step consistent with its seconds; a variant without '=' is an error."""
    spec = importlib.util.spec_from_file_location("bench_train_step",
                                                  os.path.join(ROOT, "benchmarks", "bench_train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--bfm_folder", workspace["bfm"], "--size", "32", "--batch_size", "2",
                       "--warm", "1", "--steps", "2", "--variants", "old=--data_chunk 1;new=--data_chunk 2",
                       "--json", str(out)]) == 0
    res = json.load(open(out))
    assert list(res["variants"]) == ["old", "new"]
    for r in res["variants"].values():
        assert r["steps"] == 2 and r["ms_per_step"] == pytest.approx(1000 * r["seconds"] / 2, rel=0.01)
    assert res["variants"]["new"]["options"] == ["--data_chunk", "2"]
    assert all(r["landmark_steps"] == 0 for r in res["variants"].values())
    # --landmark_steps: every timed step is one of the curriculum's landmark-only steps
    assert bench.main(["--device", "cpu", "--bfm_folder", workspace["bfm"], "--size", "32", "--batch_size", "2",
                       "--warm", "1", "--steps", "2", "--variants", "lm=--data_chunk 1", "--landmark_steps",
                       "--json", str(out)]) == 0
    lm = json.load(open(out))
    assert lm["landmark_steps"] is True and lm["variants"]["lm"]["landmark_steps"] == lm["variants"]["lm"]["steps"] == 2
    with pytest.raises(ValueError, match="name=options"):
        bench.parse_variants("base")
