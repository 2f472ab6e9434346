"""The files process_images writes for one photo: detection and landmark files, the debug picture."""
from __future__ import annotations

import os
import stat

import numpy as np

from detect.report import atomic_write_into, file_stat
from util.detections_io import LANDMARKS_DIR, detection_path, ensure_folder, face_detection_files, write_points
from util.image_io import DEBUG_VIS_DIR

def vis_rel(rel: str) -> str:
    return f"{DEBUG_VIS_DIR}/{os.path.splitext(rel)[0]}.jpg"


def write_outputs(folder: str, rel: str, faces: list[dict], landmarks68: bool, index: dict | None = None) -> list[str]:
    """Write the detection (and landmark) files of one photo; remove its stale ones.

    Detection files of this photo that are not rewritten are removed (a photo with no face keeps
    none, a photo with fewer faces than before loses the extra ones). Landmark files not
    rewritten are removed too when they are older than the photo.

    Args:
        folder: the photo folder; rel: the photo, relative to it.
        faces: the faces to write, chosen first: dicts with ``lm5`` (5, 2) and ``lm68`` (68, 2)
            or None, pixels, y down.
        landmarks68: write ``landmarks/`` files too.
        index: one dict for all photos of a run, so that each output folder is listed once (its
            listing from before the run is what stale files are looked up in).

    Returns:
        the written paths, relative to ``folder``, '/'-separated.

    Raises:
        OutputBlockedError: one of these names is taken by a folder or a special file (never
            replaced or removed); nothing was written or removed.
        NotADirectoryError: a file stands where an output folder should be.
    """
    targets = []
    for k, f in enumerate(faces, start=1):
        targets.append((detection_path(folder, rel, face=k), f["lm5"]))
        if landmarks68 and f["lm68"] is not None:
            targets.append((detection_path(folder, rel, face=k, subdir=LANDMARKS_DIR), f["lm68"]))
    keep = {p for p, _ in targets}
    photo_mtime = file_stat(os.path.join(folder, rel))
    stale = [p for _, p in face_detection_files(folder, rel, index=index) if p not in keep and os.path.lexists(p)]
    for _, p in face_detection_files(folder, rel, subdir=LANDMARKS_DIR, index=index):
        st = file_stat(p)
        if p not in keep and st and (landmarks68 or (photo_mtime and st.st_mtime_ns < photo_mtime.st_mtime_ns)):
            stale.append(p)
    for p in [p for p, _ in targets] + stale:  # all checked before anything is written: all or nothing
        _check_replaceable(p)
    for d in {os.path.dirname(p) for p, _ in targets}:
        ensure_folder(d)
    for p, points in targets:
        write_points(p, points)
    for p in stale:
        os.remove(p)
    return [os.path.relpath(p, folder).replace(os.sep, "/") for p, _ in targets]


class OutputBlockedError(OSError):
    """A photo's output path is taken by something this tool does not replace (a folder, a FIFO)."""


def _check_replaceable(path: str) -> None:
    """OutputBlockedError when ``path`` exists and is neither a file nor a link (a folder, a FIFO,
    a device): an output name taken by something this tool never replaces or removes."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent (a file in place of a folder above: ensure_folder says)
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a special file (FIFO, device or socket)"
        raise OutputBlockedError(f"{path} is {kind}, not a detection file; move it away")


def draw_and_save(path: str, image: np.ndarray, written: list, extra: list, weak: list) -> None:
    """Save ``image`` with faces drawn: chosen face green, other written/strong faces blue, weak
    faces red; the 5 points as dots (left eye and left mouth corner filled). Atomic write."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    s = min(1.0, 2000.0 / max(h, w))
    im = Image.fromarray(image)
    if s < 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 400))
    groups = [(written[:1], (0, 220, 0)), (written[1:] + extra, (40, 120, 255)), (weak, (255, 40, 40))]
    for faces, colour in groups:
        for d in faces:
            x, y, bw, bh = (float(v) * s for v in d.box)
            draw.rectangle([x, y, x + bw, y + bh], outline=colour, width=lw)
            r = max(2.0, 0.03 * float(np.sqrt(max(d.area, 1.0))) * s)
            for i, (px, py) in enumerate(np.asarray(d.lm5) * s):
                fill = colour if i in (0, 3) else None
                draw.ellipse([px - r, py - r, px + r, py + r], outline=colour, fill=fill, width=max(1, lw // 2))
            draw.text((x + lw, y + lw), f"{d.score:.2f}", fill=colour)
    if not (written or extra or weak):
        draw.text((lw, lw), "no face", fill=(255, 40, 40))
    atomic_write_into(path, lambda f: im.save(f, format="JPEG", quality=90))
