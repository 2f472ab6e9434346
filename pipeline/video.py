"""Reconstruction of videos: every frame detected and reconstructed, one coefficient file per video.

    frames (PyAV) -> MTCNN 5 points (detect.mtcnn_port, batched) -> aligned 224 crops
    -> network in batches -> <out_dir>/<stem>.npz [-> <stem>_overlay.mp4]

The .npz holds, for the T decoded frames: ``coeffs`` (T, 257) float32 (NaN where no face was
found) and its parts ``id`` ``exp`` ``tex`` ``angle`` ``gamma`` ``trans`` (T, n); ``lm68`` (T, 68, 2)
predicted landmarks in frame pixels, y down (NaN without a face); ``lm5`` (T, 5, 2) the
detections, frame pixels, y down; ``has_face`` (T,) bool; ``no_face`` the indices of the frames
without one; ``frame_index`` (T,) and ``time`` (T,) seconds from the stream's start; ``fps``;
``smooth`` (the sigma used, 0 = raw). One face per frame: the detector's most confident.

With ``smooth > 0`` the pose (angle, trans) and expression of each run of consecutive frames with
a face are smoothed with a Gaussian of that sigma (frames), reflected at the run's ends
(``scipy.ndimage.gaussian_filter1d``, mode 'nearest'); identity, albedo and lighting are left
as predicted. The overlay video shows each frame with the render pasted over the face (the crop's
render scaled back into the frame), frames without a face unchanged, at the source's frame rate.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.coeffs import COEFFS

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
SMOOTHED = ("angle", "trans", "exp")


@dataclass(frozen=True)
class VideoSettings:
    """batch_size: frames per batch (detector and network). overlay: write the overlay video.
    smooth: Gaussian sigma in frames for pose and expression (0 = off). max_frames: 0 = all.
    device: where the detector runs (the model runs where it lives)."""

    batch_size: int = 8
    overlay: bool = False
    smooth: float = 0.0
    max_frames: int = 0
    device: str = "cpu"
    min_face_size: float = 20.0


@dataclass
class VideoSummary:
    """Per video: its output file and frame counts; failures (path, reason)."""

    outputs: list[tuple[str, int, int]] = field(default_factory=list)  # (npz path, frames, frames with a face)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.outputs and not self.failures else 1

    def report(self) -> str:
        lines = [f"done: {len(self.outputs)} video(s) reconstructed, {len(self.failures)} failed "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  {p}: {t} frame(s), {f} with a face" for p, t, f in self.outputs]
        lines += [f"failed: {p}: {why}" for p, why in self.failures]
        return "\n".join(lines)


def list_videos(path: str) -> list[str]:
    """``path`` itself when a file, else the video files (by suffix) directly in the folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--video {path}: no such file or folder")
    found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(VIDEO_SUFFIXES))
    if not found:
        raise FileNotFoundError(f"--video {path}: no video files ({', '.join(VIDEO_SUFFIXES)}) in the folder")
    return found


def import_av():
    try:
        import av
    except ImportError:
        raise ImportError('video input needs PyAV: pip install -e ".[video]" (or pip install av)') from None
    return av


def decode_frames(path: str, max_frames: int = 0):
    """Yield (index, time in seconds, (H, W, 3) uint8 RGB) for the frames of ``path``'s first video stream."""
    av = import_av()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if max_frames and i >= max_frames:
                break
            t = float(frame.time) if frame.time is not None else float("nan")
            yield i, t, frame.to_ndarray(format="rgb24")


def frame_rate(path: str) -> float:
    av = import_av()
    with av.open(path) as container:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
    return float(rate) if rate else 25.0


def best_face(detections: list[dict]) -> np.ndarray | None:
    """(5, 2) y-down points of the most confident detection (the detector's first), or None."""
    return None if not detections else np.asarray(detections[0]["keypoints"], dtype=np.float64)


def align_frame(frame: np.ndarray, points: np.ndarray, lm3d: np.ndarray) -> tuple:
    """A frame with its (5, 2) y-down points -> ((3, 224, 224) uint8 crop, its AlignTransform);
    raises ValueError for points that are not a face's (see :func:`util.preprocess.align_params`)."""
    from PIL import Image

    from util.landmarks import flip_y
    from util.preprocess import align_img

    transform, crop, _ = align_img(Image.fromarray(frame), flip_y(points, frame.shape[0]), lm3d)
    return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1), transform


def align_frames(frames: list[np.ndarray], points: list[np.ndarray], lm3d: np.ndarray) -> tuple:
    """:func:`align_frame` of each -> ((B, 3, 224, 224) uint8 crops, their AlignTransforms)."""
    aligned = [align_frame(f, p, lm3d) for f, p in zip(frames, points)]
    return torch.from_numpy(np.stack([a[0] for a in aligned])), [a[1] for a in aligned]


def crop_landmarks_to_frame(lm68_yup: np.ndarray, transform, crop_size: int = 224) -> np.ndarray:
    """(68, 2) crop pixels, y up -> frame pixels, y down."""
    ydown = np.stack([lm68_yup[:, 0], crop_size - 1 - lm68_yup[:, 1]], axis=1)
    return transform.crop_to_image(ydown)


def paste_overlay(frame: np.ndarray, overlay: np.ndarray, mask: np.ndarray, transform) -> np.ndarray:
    """The frame with the crop's render (``overlay`` (224, 224, 3) uint8 where ``mask`` (224, 224)
    is set) scaled back to where the crop came from."""
    from PIL import Image

    from util.preprocess import crop_box

    left, up, right, low = crop_box(transform)
    sx, sy = transform.w0 / transform.w, transform.h0 / transform.h
    x0, y0 = int(round(left * sx)), int(round(up * sy))
    w, h = max(1, int(round((right - left) * sx))), max(1, int(round((low - up) * sy)))
    out = Image.fromarray(frame)
    region = Image.fromarray(overlay).resize((w, h), Image.Resampling.BILINEAR)
    alpha = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
    out.paste(region, (x0, y0), alpha)
    return np.asarray(out)


def smooth_coeffs(coeffs: np.ndarray, has_face: np.ndarray, sigma: float) -> np.ndarray:
    """(T, 257) with pose and expression smoothed over each run of frames with a face (module docstring)."""
    from scipy.ndimage import gaussian_filter1d

    out = coeffs.copy()
    if sigma <= 0:
        return out
    cols = np.concatenate([np.arange(COEFFS.slices()[k].start, COEFFS.slices()[k].stop) for k in SMOOTHED])
    t = 0
    while t < len(has_face):
        if not has_face[t]:
            t += 1
            continue
        end = t
        while end < len(has_face) and has_face[end]:
            end += 1
        out[t:end, cols] = gaussian_filter1d(coeffs[t:end, cols].astype(np.float64), sigma, axis=0,
                                             mode="nearest").astype(coeffs.dtype)
        t = end
    return out


class VideoWriter:
    """An H.264 (or MPEG-4 where libx264 is absent) video of RGB frames, written by PyAV to a
    temporary name (:func:`util.atomic_files.temp_path`) and renamed on :meth:`close`; or
    :meth:`finish` completes the temporary file for the caller to rename with others."""

    def __init__(self, path: str, fps: float, width: int, height: int):
        from fractions import Fraction

        from util.atomic_files import temp_path

        av = import_av()
        self.path, self.tmp = path, temp_path(path)
        self.container = av.open(self.tmp, "w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"
        self.av, self.frames = av, 0

    def write(self, rgb: np.ndarray) -> None:
        rgb = rgb[: self.stream.height, : self.stream.width]
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> str:
        """Flush the encoder and close the file; returns its temporary path (not yet renamed).
        On a failure the temporary file is removed and the exception propagates."""
        try:
            try:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            finally:
                self.container.close()
        except BaseException:
            self.discard()
            raise
        return self.tmp

    def discard(self) -> None:
        """Close (if still open) and remove the temporary file."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - closing twice, or a broken file: it goes anyway
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def close(self, keep: bool = True) -> None:
        """Finish the file and rename it to ``path`` (``keep``), or remove it."""
        if keep:
            os.replace(self.finish(), self.path)
        else:
            self.discard()


def reconstruct_video(path: str, model, detector, lm3d: np.ndarray, out_dir: str, settings: VideoSettings
                      ) -> tuple[str, int, int]:
    """Reconstruct ``path`` (module docstring); returns (npz path, frames, frames with a face).

    The .npz and the overlay video (``settings.overlay``) are written to temporary names and
    renamed together at the end: a failure anywhere leaves neither (nor a temporary file).

    Raises:
        OSError, ValueError, PyAV's errors: the video could not be read or its files written.
    """
    from data.image_folder import images_to_float
    from pipeline.render import overlay_uint8

    stem = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(out_dir, exist_ok=True)
    device = model.face_model.mean_shape.device
    rows: dict[str, list] = {k: [] for k in ("coeffs", "lm68", "lm5", "has_face", "frame_index", "time")}
    overlay = None
    pending: list[tuple[int, float, np.ndarray]] = []

    def flush() -> None:
        nonlocal overlay
        frames = [f for _, _, f in pending]
        points = [best_face(d) for d in detector.detect_batch(frames)]
        found, aligned = [], []
        for i, p in enumerate(points):
            if p is not None:
                try:
                    aligned.append(align_frame(frames[i], p, lm3d))
                    found.append(i)
                except ValueError as e:  # points no face has: the frame counts as one without
                    log.warning("%s frame %d: %s", path, pending[i][0], e)
                    points[i] = None
        coeffs = np.full((len(frames), COEFFS.total), np.nan, np.float32)
        lm68 = np.full((len(frames), 68, 2), np.nan, np.float32)
        shown = list(frames)
        if found:
            crops = torch.from_numpy(np.stack([a[0] for a in aligned])).to(device)
            transforms = [a[1] for a in aligned]
            with torch.inference_mode():
                c = model.predict_coeffs(images_to_float(crops))
                rec = model.reconstruct(c) if settings.overlay else None
                lm = rec.face.landmark if rec is not None else model.face_model.landmarks(c)
                lm_crop = lm.float().cpu().numpy()
                if rec is not None:
                    over = overlay_uint8(crops, rec.render, rec.mask).cpu().numpy()
                    masks = rec.mask[:, 0].cpu().numpy()
            coeffs[found] = c.float().cpu().numpy()
            for k, i in enumerate(found):
                lm68[i] = crop_landmarks_to_frame(lm_crop[k], transforms[k])
                if rec is not None:
                    shown[i] = paste_overlay(frames[i], over[k], masks[k], transforms[k])
        if settings.overlay:
            if overlay is None:
                h, w = frames[0].shape[:2]
                overlay = VideoWriter(os.path.join(out_dir, f"{stem}_overlay.mp4"), frame_rate(path), w, h)
            for img in shown:
                overlay.write(img)
        rows["coeffs"].append(coeffs)
        rows["lm68"].append(lm68)
        rows["lm5"].append(np.stack([np.full((5, 2), np.nan) if p is None else p for p in points]).astype(np.float32))
        rows["has_face"].append(np.array([p is not None for p in points]))
        rows["frame_index"].append(np.array([i for i, _, _ in pending], np.int64))
        rows["time"].append(np.array([t for _, t, _ in pending], np.float64))
        pending.clear()

    try:
        for item in decode_frames(path, settings.max_frames):
            pending.append(item)
            if len(pending) >= settings.batch_size:
                flush()
        if pending:
            flush()
        if not rows["coeffs"]:
            raise ValueError("no frames could be decoded")
        data = {k: np.concatenate(v) for k, v in rows.items()}
        data["coeffs"] = smooth_coeffs(data["coeffs"], data["has_face"], settings.smooth)
        data.update({k: data["coeffs"][:, s] for k, s in COEFFS.slices().items()})
        data["no_face"] = np.flatnonzero(~data["has_face"])
        data["fps"], data["smooth"] = np.float64(frame_rate(path)), np.float64(settings.smooth)
        out = os.path.join(out_dir, f"{stem}.npz")
        place_together(out, lambda fh: np.savez(fh, **data), overlay)
    except BaseException:
        if overlay is not None:
            overlay.discard()
        raise
    return out, len(data["has_face"]), int(data["has_face"].sum())


def place_together(npz_path: str, write_npz, overlay: VideoWriter | None) -> None:
    """Write the .npz (``write_npz(file)``) to a temporary name, finish ``overlay`` (if any), then
    rename both into place: both are there, or (on any failure, the exception propagating) neither,
    and no temporary file is left."""
    from util.atomic_files import temp_path

    tmp = temp_path(npz_path)
    placed = None
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            write_npz(fh)
        if overlay is not None:
            os.replace(overlay.finish(), overlay.path)
            placed = overlay.path
        os.replace(tmp, npz_path)
    except BaseException:
        for p in (tmp, placed):
            if p is not None and os.path.lexists(p):
                os.remove(p)
        raise


def make_detector(settings: VideoSettings):
    """The PyTorch MTCNN on ``settings.device`` (raises FileNotFoundError naming its weights)."""
    from detect.mtcnn_port.detector import TorchMTCNN

    return TorchMTCNN(device=settings.device, min_face_size=settings.min_face_size)


def reconstruct_videos(paths: list[str], model, lm3d: np.ndarray, out_dir: str, settings: VideoSettings,
                       detector=None, progress: bool = False) -> VideoSummary:
    """Every video of ``paths`` into ``out_dir``; a video that fails is reported, the others go on."""
    t0 = time.perf_counter()
    detector = detector or make_detector(settings)
    summary = VideoSummary()
    for path in paths:
        try:
            summary.outputs.append(reconstruct_video(path, model, detector, lm3d, out_dir, settings))
        except (OSError, ValueError) as e:
            summary.failures.append((path, str(e)))
        except Exception as e:  # noqa: BLE001 - PyAV's decoding errors have their own classes
            if type(e).__module__.split(".")[0] != "av":
                raise
            summary.failures.append((path, f"{type(e).__name__}: {e}"))
        if progress:
            log.info("%s done", path)
    summary.seconds = time.perf_counter() - t0
    return summary
