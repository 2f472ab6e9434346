"""pipeline.video: smoothing, coordinates, and test.py --video on a clip made here."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, golden_lm5
from models.coeffs import COEFFS
from pipeline.video import crop_landmarks_to_frame, list_videos, smooth_coeffs

import test as test_cli


def test_smoothing_moves_only_pose_and_expression_within_runs_of_faces():
    rng = np.random.default_rng(0)
    coeffs = rng.normal(size=(9, COEFFS.total)).astype(np.float32)
    has = np.array([1, 1, 1, 1, 0, 1, 0, 1, 1], bool)
    assert np.array_equal(smooth_coeffs(coeffs, has, 0.0), coeffs)
    out = smooth_coeffs(coeffs, has, 1.5)
    s = COEFFS.slices()
    for k in ("id", "tex", "gamma"):
        assert np.array_equal(out[:, s[k]], coeffs[:, s[k]])
    for k in ("angle", "trans", "exp"):
        assert not np.allclose(out[:4, s[k]], coeffs[:4, s[k]])
        assert np.array_equal(out[5, s[k]], coeffs[5, s[k]])  # a run of one frame is left alone
        assert np.allclose(out[7:, s[k]].mean(0), coeffs[7:, s[k]].mean(0), atol=1e-5)  # two frames: mixed
    const = np.repeat(coeffs[:1], 9, axis=0)
    assert np.allclose(smooth_coeffs(const, has, 3.0), const, atol=1e-6)


def test_landmarks_go_back_to_the_frame_where_they_were_detected():
    from util.landmarks import flip_y
    from util.preprocess import align_img, load_lm3d

    img = Image.open(os.path.join(ROOT, "examples", "000002.jpg")).convert("RGB")
    lm = np.array(golden_lm5()["000002.jpg"], dtype=np.float64)  # y down
    transform, _, lm_crop = align_img(img, flip_y(lm, img.size[1]), load_lm3d(os.path.join(ROOT, "BFM")))
    back = crop_landmarks_to_frame(np.pad(lm_crop, ((0, 63), (0, 0))), transform)[:5]
    assert np.abs(back - lm).max() < 1.0  # the crop's resize rounds its size to whole pixels


def test_video_paths(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert list_videos(str(tmp_path)) == [str(tmp_path / "a.mp4")]
    assert list_videos(str(tmp_path / "a.mp4")) == [str(tmp_path / "a.mp4")]
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_videos(str(tmp_path / "b.mp4"))
    os.remove(tmp_path / "a.mp4")
    with pytest.raises(FileNotFoundError, match="no video files"):
        list_videos(str(tmp_path))


FRAMES = ["000002.jpg", None, "vd006.png", "JianzhuGuo.jpg", None]  # None: a frame without a face


def write_clip(path: str, size: int = 256, fps: int = 5) -> None:
    """Example photos (squared, resized) and grey frames as a clip (H.264 through PyAV)."""
    pytest.importorskip("av")
    from pipeline.video import VideoWriter

    clip = VideoWriter(path, fps, size, size)
    for name in FRAMES:
        if name is None:
            clip.write(np.full((size, size, 3), 128, np.uint8))
        else:
            img = Image.open(os.path.join(ROOT, "examples", name)).convert("RGB")
            side = min(img.size)
            clip.write(np.asarray(img.crop((0, 0, side, side)).resize((size, size), Image.Resampling.BICUBIC)))
    clip.close()


@pytest.mark.slow
def test_video_coefficients_no_face_frames_and_overlay(standin, tmp_path, capsys):
    import av
    import torch

    from options.run_specs import model_spec
    from options.test_options import parse_test_options
    from pipeline.model import build_model
    from pipeline.video import align_frames, decode_frames
    from data.image_folder import images_to_float
    from util.preprocess import load_lm3d

    clip = str(tmp_path / "clip.mp4")
    write_clip(clip)
    out = tmp_path / "out"
    args = [f"--name={standin['name']}", "--epoch=20", f"--bfm_folder={standin['bfm_folder']}",
            f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={out}", "--device=cpu",
            f"--video={clip}", "--video_overlay", "--batch_size=4"]
    code = test_cli.main(args)
    text = capsys.readouterr().out
    assert code == 0, text
    assert "5 frame(s), 3 with a face" in text
    d = np.load(out / "clip.npz")
    t = len(FRAMES)
    assert d["coeffs"].shape == (t, COEFFS.total) and d["lm68"].shape == (t, 68, 2)
    assert d["has_face"].tolist() == [n is not None for n in FRAMES]
    assert d["no_face"].tolist() == [1, 4] and d["frame_index"].tolist() == list(range(t))
    assert np.allclose(d["time"], np.arange(t) / 5.0) and float(d["fps"]) == 5.0
    assert np.isnan(d["coeffs"][[1, 4]]).all() and np.isfinite(d["coeffs"][[0, 2, 3]]).all()
    assert np.array_equal(d["id"], d["coeffs"][:, COEFFS.slices()["id"]], equal_nan=True)
    # the predicted landmarks lie on the face the detector found (frame pixels, y down)
    for i in (0, 2, 3):
        eyes = d["lm5"][i, :2].mean(0)
        assert np.linalg.norm(d["lm68"][i, 36:48].mean(0) - eyes) < 40
    # smoothing is off by default: the coefficients are the network's on each frame's crop
    opt = parse_test_options(args)
    model = build_model(model_spec(opt), torch.device("cpu"))
    frames = [f for i, _, f in decode_frames(clip) if i in (0, 2, 3)]
    crops, _ = align_frames(frames, [d["lm5"][i].astype(np.float64) for i in (0, 2, 3)],
                            load_lm3d(standin["bfm_folder"]))
    with torch.inference_mode():
        direct = model.predict_coeffs(images_to_float(crops)).numpy()
    assert np.allclose(d["coeffs"][[0, 2, 3]], direct, atol=1e-4)
    with av.open(str(out / "clip_overlay.mp4")) as c:
        shown = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(shown) == t
    assert np.abs(shown[0].astype(int) - frames[0].astype(int)).mean() > 2  # the render covers the face
    assert np.abs(shown[1].astype(int) - 128).mean() < 3  # a frame without a face is shown as it is


def test_missing_video_is_a_one_line_error(tmp_path, capsys):
    assert test_cli.main([f"--video={tmp_path / 'clip.mp4'}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --video") and "no such file" in err and err.count("\n") == 1


class NoFaces:
    """A detector that finds no face: frames reach the .npz and the overlay without the network."""

    def detect_batch(self, frames):
        return [[] for _ in frames]


@pytest.mark.parametrize("fails", [None, "npz", "overlay"])
def test_the_npz_and_its_overlay_are_written_both_or_neither(tmp_path, monkeypatch, fails):
    """A failure writing the .npz or finishing the overlay video leaves neither file (and no
    temporary one), with the reason in the summary; without one, both are there."""
    import errno
    from types import SimpleNamespace

    import torch

    from pipeline import video

    clip = str(tmp_path / "clip.mp4")
    write_clip(clip, size=64)
    out = tmp_path / "out"
    if fails == "npz":
        def no_space(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(video.np, "savez", no_space)
    elif fails == "overlay":
        finish = video.VideoWriter.finish

        def broken(self):
            finish(self)
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(video.VideoWriter, "finish", broken)
    model = SimpleNamespace(face_model=SimpleNamespace(mean_shape=torch.zeros(1)))
    summary = video.reconstruct_videos([clip], model, np.zeros((5, 3)), str(out),
                                       video.VideoSettings(batch_size=2, overlay=True), detector=NoFaces())
    if fails is None:
        assert summary.failures == [] and sorted(os.listdir(out)) == ["clip.npz", "clip_overlay.mp4"]
        assert np.load(out / "clip.npz")["has_face"].tolist() == [False] * len(FRAMES)
        return
    assert os.listdir(out) == []  # neither file, no temporary one
    why = "No space left on device" if fails == "npz" else "Input/output error"
    assert summary.failures == [(clip, f"[Errno {errno.ENOSPC if fails == 'npz' else errno.EIO}] {why}")]
    assert summary.exit_code == 1 and f"failed: {clip}: " in summary.report()
