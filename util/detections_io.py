"""Detection files: ``<folder>/detections/<stem>.txt``, 5 lines ``x y`` in image pixels (y down).

Point order (the original's): left eye, right eye, nose tip, left mouth corner, right mouth corner.
When every face of a photo is written (process_images.py --all-faces), the chosen face keeps
``<stem>.txt`` and the others get ``<stem>__face02.txt``, ``<stem>__face03.txt``, ...; test.py
reconstructs each of them, naming its outputs after the detection file.
With --recursive the layout under ``detections/`` mirrors the sub-folders of the photos.
"""
from __future__ import annotations

import os
import re
import tempfile

import numpy as np

DETECTIONS_DIR = "detections"
LANDMARKS_DIR = "landmarks"
FACE_SUFFIX = "__face"
_EXTRA_FACE = re.compile(r"^(?P<stem>.+)__face(?P<k>\d{2,})$")


class DetectionFileError(ValueError):
    """A detection file exists but does not hold 5 points of 2 finite numbers."""


def file_stem(name: str) -> str:
    """``os.path.splitext(name)[0]`` for a file name without folders, in a quarter of the time
    (a folder of 60000 photos computes it for each)."""
    i = name.rfind(".")
    return name[:i] if i > 0 and name[:i].strip(".") else name


def detection_path(folder: str, rel_image: str, face: int = 1, subdir: str = DETECTIONS_DIR) -> str:
    """Where the detection of face ``face`` (1-based) of ``folder/rel_image`` lives."""
    rel_dir, name = os.path.split(rel_image)
    stem = file_stem(name)
    if face > 1:
        stem = f"{stem}{FACE_SUFFIX}{face:02d}"
    return os.path.join(folder, subdir, rel_dir, stem + ".txt")


class _DirIndex:
    """One listing of a detections folder: its ``.txt`` files (regular files, or links to them)
    and each stem's extra faces; ``prefix``: the folder's path with a separator at its end."""

    def __init__(self, det_dir: str):
        self.prefix = os.path.join(det_dir, "")
        try:
            with os.scandir(det_dir) as it:
                names = [e.name for e in it if e.name.endswith(".txt") and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        self.files = set(names)
        self.extra: dict[str, list[tuple[int, str]]] = {}
        for f in names:
            m = _EXTRA_FACE.match(f[:-4])
            if m:
                self.extra.setdefault(m.group("stem"), []).append((int(m.group("k")), f[:-4]))


def face_detection_files(folder: str, rel_image: str, subdir: str = DETECTIONS_DIR,
                         index: dict | None = None) -> list[tuple[str, str]]:
    """All detection files of one photo as ``(output name, path)``, the chosen face first.

    The output name is the detection file's stem (``photo`` or ``photo__face02``).
    ``subdir=LANDMARKS_DIR`` lists the 68-point landmark files instead. Pass the same dict as
    ``index`` for every photo of a folder to list each detections folder only once (a folder of
    N photos then costs O(N), not O(N^2), and no file system call per photo).
    """
    rel_dir, name = os.path.split(rel_image)
    return stem_detection_files(folder, rel_dir, file_stem(name), subdir, {} if index is None else index)


def stem_detection_files(folder: str, rel_dir: str, stem: str, subdir: str, index: dict) -> list[tuple[str, str]]:
    """:func:`face_detection_files` of the photo ``stem.*`` in ``folder/rel_dir`` (for callers
    that have split the photo's path already)."""
    listing = index.get((subdir, rel_dir))  # the paths of detection_path, one join per folder
    if listing is None:
        listing = index[(subdir, rel_dir)] = _DirIndex(os.path.join(folder, subdir, rel_dir))
    main_name = stem + ".txt"
    out = [(stem, listing.prefix + main_name)] if main_name in listing.files else []
    extra = listing.extra.get(stem)
    if extra:
        out += [(face, listing.prefix + face + ".txt") for _, face in sorted(extra)]
    return out


def read_points(path: str, n: int = 5) -> np.ndarray:
    """Read ``n`` lines of ``x y`` -> float32 array (n, 2); raise DetectionFileError otherwise."""
    redo = "; re-run ./process_images.sh" + (" --landmarks68" if n == 68 else "") + " on the folder"
    try:
        with open(path, "r", encoding="utf-8") as f:
            rows = [line.split() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise DetectionFileError(f"{path}: not a text file of 'x y' lines") from None
    if len(rows) != n or any(len(r) != 2 for r in rows):
        raise DetectionFileError(
            f"{path}: expected {n} lines of 'x y', found {len(rows)} line(s)"
            + ("" if all(len(r) == 2 for r in rows) else " (some without exactly 2 numbers)")
            + redo)
    try:
        pts = np.array(rows, dtype=np.float64)
    except ValueError:
        raise DetectionFileError(f"{path}: non-numeric values{redo}") from None
    if not np.all(np.isfinite(pts)):
        raise DetectionFileError(f"{path}: non-finite coordinates")
    return pts.astype(np.float32)


def write_points(path: str, points: np.ndarray) -> None:
    """Write (n, 2) points as ``x y`` lines atomically (temp file in the same folder, then rename)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".txt", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for x, y in points:
                f.write(f"{x:.4f} {y:.4f}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
