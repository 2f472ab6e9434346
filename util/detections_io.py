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
import stat

import numpy as np

from util.atomic_files import write_atomic

DETECTIONS_DIR = "detections"
LANDMARKS_DIR = "landmarks"
FACE_SUFFIX = "__face"
_EXTRA_FACE = re.compile(r"^(?P<stem>.+)__face(?P<k>\d{2,})$")
MAX_POINTS_BYTES = 64 * 1024  # 68 lines of "x y" take ~1.3 KB; a larger file is not a detection file


class DetectionFileError(ValueError):
    """A detection (or landmark) file is not usable: not a regular readable file, too large, or not
    the expected number of lines of 2 finite numbers; the message names the file and what to re-run."""


def ensure_folder(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with a message that says which part of ``path`` is
    in the way when a file (not a folder) has one of its names (instead of ``[Errno 17] File
    exists`` / ``[Errno 20] Not a directory``).

    Args:
        path: the folder to create (with its parents) if it is not there.

    Raises:
        NotADirectoryError: a file (not a folder) has ``path``'s name or one of its parents'.
        OSError: another failure (permissions, read-only file system).
    """
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot create the folder {path}: {_blocking_part(path)} exists "
                                 "and is not a folder; move it away") from None


def _blocking_part(path: str) -> str:
    """The first of ``path`` and the folders above it (from the top) that exists but is not a folder."""
    chain = []
    while path and path not in chain:
        chain.append(path)
        path = os.path.dirname(path)
    for p in reversed(chain):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return chain[0] if chain else path


def file_stem(name: str) -> str:
    """``os.path.splitext(name)[0]`` for a file name without folders, computed more cheaply (a
    folder of 60000 photos computes it for each; docs/throughput.md).

    Args:
        name: a file name without folders.

    Returns:
        The name without its last extension; a name of leading dots only (``.bashrc``, ``..x``) is
        kept whole, as ``splitext`` does.
    """
    i = name.rfind(".")
    return name[:i] if i > 0 and name[:i].strip(".") else name


def detection_path(folder: str, rel_image: str, face: int = 1, subdir: str = DETECTIONS_DIR) -> str:
    """Where the detection of one face of a photo lives (not checked).

    Args:
        folder: the photo folder.
        rel_image: the photo's path relative to ``folder``.
        face: the face's number, 1-based: face 1 is ``<stem>.txt``, face k > 1 ``<stem>__faceKK.txt``.
        subdir: :data:`DETECTIONS_DIR` (5 points) or :data:`LANDMARKS_DIR` (68 points).

    Returns:
        ``folder/subdir/<folder of rel_image>/<stem>[__faceKK].txt``.
    """
    rel_dir, name = os.path.split(rel_image)
    stem = file_stem(name)
    if face > 1:
        stem = f"{stem}{FACE_SUFFIX}{face:02d}"
    return os.path.join(folder, subdir, rel_dir, stem + ".txt")


class _DirIndex:
    """One listing of a detections folder: its ``.txt`` entries (of any kind: one that is not a
    regular file, or a link to one, fails its face in :func:`read_points` with the reason) and
    each stem's extra faces; ``prefix``: the folder's path with a separator at its end."""

    def __init__(self, det_dir: str):
        self.prefix = os.path.join(det_dir, "")
        try:
            with os.scandir(det_dir) as it:  # any kind: a folder or a FIFO there fails its face, with why
                names = [e.name for e in it if e.name.endswith(".txt")]
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

    Args:
        folder: the photo folder.
        rel_image: the photo's path relative to ``folder``.
        subdir: :data:`DETECTIONS_DIR` or :data:`LANDMARKS_DIR`.
        index: a cache of folder listings shared between calls (None: a fresh one).

    Returns:
        ``[(output name, path)]``: face 1 (``<stem>.txt``) first when present, then the extra faces
        by number; empty when the photo has none (or the folder is missing).
    """
    rel_dir, name = os.path.split(rel_image)
    return stem_detection_files(folder, rel_dir, file_stem(name), subdir, {} if index is None else index)


def stem_detection_files(folder: str, rel_dir: str, stem: str, subdir: str, index: dict) -> list[tuple[str, str]]:
    """:func:`face_detection_files` of the photo ``stem.*`` in ``folder/rel_dir`` (for callers
    that have split the photo's path already).

    Args:
        folder: the photo folder.
        rel_dir: the photo's folder relative to ``folder`` ('' at top level).
        stem: the photo's name without extension.
        subdir: :data:`DETECTIONS_DIR` or :data:`LANDMARKS_DIR`.
        index: the shared cache of folder listings (filled here).

    Returns:
        As :func:`face_detection_files`.
    """
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
    """Read ``n`` lines of ``x y`` -> float32 array (n, 2); raise DetectionFileError otherwise.

    Numbers are separated by spaces or tabs; Windows line ends (CRLF), a UTF-8 byte-order mark
    and blank lines are fine.
    Refused, each with its reason: not a regular file (a folder, a FIFO, a device), larger than
    :data:`MAX_POINTS_BYTES` (never read whole), not UTF-8 text (binary), a wrong number of
    lines or of numbers on a line, commas, non-numeric or non-finite values. Whether the points
    fit the photo is the alignment's check (:func:`util.preprocess.check_landmarks`).

    Args:
        path: the file (photo pixels, y down, as the detector writes them).
        n: the number of points expected (5 or 68).

    Returns:
        (n, 2) float32 points, as written (x, y).

    Raises:
        DetectionFileError: the file is missing or unusable, as above; the message says to re-run
            ./process_images.sh (with ``--landmarks68`` for 68 points).
    """
    redo = "; re-run ./process_images.sh" + (" --landmarks68" if n == 68 else "") + " on the folder"
    data = _read_small_file(path, redo)
    if b"\0" in data:
        raise DetectionFileError(f"{path}: a binary file, not 'x y' text lines{redo}")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows Notepad) is fine
    except UnicodeDecodeError:
        raise DetectionFileError(f"{path}: not a text file of 'x y' lines{redo}") from None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        raise DetectionFileError(f"{path}: empty, expected {n} lines of 'x y'{redo}")
    if "," in text:
        raise DetectionFileError(f"{path}: numbers separated by commas; the format is {n} lines of 'x y' "
                                 f"separated by spaces{redo}")
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
        raise DetectionFileError(f"{path}: non-finite coordinates (nan or inf){redo}")
    if np.any(np.abs(pts) > np.finfo(np.float32).max):
        raise DetectionFileError(f"{path}: coordinates beyond float32's range{redo}")
    return pts.astype(np.float32)


def _read_small_file(path: str, redo: str) -> bytes:
    """The bytes of the regular file ``path`` when it holds at most :data:`MAX_POINTS_BYTES`;
    DetectionFileError naming what it is otherwise. Opened without blocking (a FIFO never
    blocks the run) and checked as opened (no race between a check and the read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise DetectionFileError(f"{path}: a folder, not a detection file; move it away{redo}") from None
    except OSError as e:
        raise DetectionFileError(f"{path}: cannot be opened ({e.strerror or e}){redo}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DetectionFileError(f"{path}: a folder, not a detection file; move it away{redo}")
        if not stat.S_ISREG(st.st_mode):
            raise DetectionFileError(f"{path}: a special file (FIFO, device or socket), not a detection file{redo}")
        if st.st_size > MAX_POINTS_BYTES:
            raise DetectionFileError(f"{path}: {st.st_size} bytes, too large for a detection file "
                                     f"(at most {MAX_POINTS_BYTES}){redo}")
        try:
            data = os.read(fd, MAX_POINTS_BYTES + 1)  # a file growing meanwhile is still not read whole
        except OSError as e:
            raise DetectionFileError(f"{path}: cannot be read ({e.strerror or e}){redo}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_POINTS_BYTES:
        raise DetectionFileError(f"{path}: larger than {MAX_POINTS_BYTES} bytes, too large for a detection file{redo}")
    return data


def write_points(path: str, points: np.ndarray) -> None:
    """Write points as ``x y`` lines atomically (:func:`util.atomic_files.write_atomic`: a
    temporary name in the same folder, then a rename; the file follows the umask).

    Args:
        path: the file; its folder is created when missing.
        points: (n, 2) (or anything reshaping to it) coordinates, written with 4 decimals.

    Raises:
        NotADirectoryError, OSError: as :func:`ensure_folder` and :func:`util.atomic_files.write_atomic`.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    data = "".join(f"{x:.4f} {y:.4f}\n" for x, y in points).encode("utf-8")
    ensure_folder(os.path.dirname(path) or ".")
    write_atomic(path, lambda f: f.write(data))
