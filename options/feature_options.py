"""test.py's options for image sets and video (:mod:`pipeline.image_sets`, :mod:`pipeline.video`).

Each group is a dataclass of fields (the same ``opt()`` fields as the other options, turned into
flags by :func:`options.base_options.build_parser`) that TestOptions inherits; the functions
below turn parsed options into the pipelines' frozen settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from options.base_options import opt


@dataclass
class ImageSetOptions:
    group_by: str = opt("", "image sets: reconstruct every photo, then aggregate one identity and albedo per person "
                            "(<results>/image_sets/<person>.obj/.mat; .ply/.glb with --mesh_format). 'folder' = a "
                            "sub-folder per person (implies --recursive), or the path of a CSV file with the columns "
                            "photo,person", group="sets")
    confidence: str = opt("fit", "image sets: per-photo confidence of the aggregation: fit (from the landmark and "
                                 "photometric residuals) | uniform | path of a TorchScript confidence network", group="sets")


@dataclass
class VideoOptions:
    video: str = opt("", "a video file, or a folder of them: frames are decoded (PyAV), detected (MTCNN in PyTorch) "
                         "and reconstructed in batches into <results>/<video stem>.npz (T x 257 coefficients, "
                         "68 landmarks, frame times, frames without a face)", group="video")
    video_overlay: bool = opt(False, "video: also write <video stem>_overlay.mp4 (the render over each frame)", group="video")
    smooth: float = opt(0.0, "video: Gaussian smoothing of pose and expression over time, sigma in frames "
                             "(0 = off; runs of frames with a face are smoothed separately)", group="video")
    max_frames: int = opt(0, "video: decode at most this many frames per video (0 = all)", group="video")


def feature_inputs_error(o) -> str | None:
    """A missing --video or --group_by CSV path, or a photo sub-folder whose results would land in
    the report's or the image sets' own folder, as one line (None: none); checked by path only so
    that test.py reports it before torch loads."""
    import os

    if o.video and not os.path.exists(o.video):
        return f"--video {o.video}: no such file or folder"
    if o.group_by and o.group_by != "folder" and not os.path.isfile(o.group_by):
        return (f"--group_by {o.group_by!r}: give 'folder' (a sub-folder per person) or the path of a CSV file "
                "with the columns photo,person")
    if not o.video and (o.recursive or o.group_by == "folder"):
        return reserved_subfolder_error(o.img_folder, o.report, bool(o.group_by))
    return None


def reserved_subfolder_error(img_folder: str, report: bool, image_sets: bool) -> str | None:
    """With --recursive, a photo sub-folder ``report/`` (with --report) or ``image_sets/`` (with
    --group_by) would write its photos' results into ``<results>/report/`` or
    ``<results>/image_sets/``, the run's own folders for the report's and the people's files:
    one line saying so and what to do (None: no such sub-folder)."""
    import os

    from util.report import REPORT_DIR

    # "image_sets": pipeline.image_sets.SETS_DIR (that module imports torch; this check runs before it loads)
    for wanted, sub, flag in ((report, REPORT_DIR, "--report"), (image_sets, "image_sets", "--group_by")):
        if wanted and img_folder and os.path.isdir(os.path.join(img_folder, sub)):
            return (f"{os.path.join(img_folder, sub)}: a photo sub-folder named {sub!r} would put its results "
                    f"into the results folder's {sub}/, where {flag} writes its own files; rename that "
                    f"sub-folder (or leave out {flag})")
    return None


def image_set_settings(o):
    from pipeline.image_sets import ImageSetSettings

    return ImageSetSettings(group_by=o.group_by, confidence=o.confidence, mesh_format=o.mesh_format)


def video_settings(o, device):
    """``device``: the run's torch.device (the detector runs there; batch size -1 = its default)."""
    from pipeline.workers import default_batch_size
    from pipeline.video import VideoSettings

    return VideoSettings(batch_size=default_batch_size(device) if o.batch_size <= 0 else o.batch_size,
                         overlay=o.video_overlay, smooth=o.smooth, max_frames=o.max_frames, device=str(device))
