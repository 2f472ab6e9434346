"""The scan stage of a run: where the results go, whether they can be written there, and which
faces are left to do (``--skip_existing``)."""
from __future__ import annotations

import os

from pipeline.runtime import SetupError
from pipeline.settings import RunSpec
from pipeline.summary import RunSummary


def make_dirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the folders it created, outermost first."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created[::-1]


def check_results_dir(out_dir: str, recursive: bool = False) -> None:
    """Fail early (before the model loads), creating nothing, unless results can be written.

    The results folder must be a folder that a file can be made in (proved with a temporary
    file), or one that can be created (its nearest existing parent a writable folder). Removes
    the temporary files that killed runs left in it (ours only, of dead processes:
    :func:`util.atomic_files.remove_stale_temp_files`; in sub-folders too with ``recursive``).

    Raises:
        SetupError: one line saying why not and to give another ``--results_dir``.
    """
    from util.atomic_files import remove_stale_temp_files, temp_path

    def refuse(why: str) -> SetupError:
        return SetupError(f"cannot write results into {out_dir}: {why}; give a writable --results_dir")

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SetupError(f"the results folder {out_dir} is a file, not a folder; give another --results_dir")
    if os.path.isdir(out_dir):
        try:
            probe = temp_path(os.path.join(out_dir, "probe"))
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.remove(probe)
        except OSError as e:
            raise refuse(e.strerror) from None
        remove_stale_temp_files(out_dir, recursive)
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise refuse(f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"no folder can be created in {parent} (read-only filesystem or no permission)")


def make_results_dir(out_dir: str) -> list[str]:
    """Create the results folder (:func:`check_results_dir` said it can be).

    Returns:
        the folders it created, outermost first (:func:`make_dirs`).

    Raises:
        SetupError: one line, when it cannot be created after all.
    """
    try:
        return make_dirs(out_dir)
    except OSError as e:
        raise SetupError(f"cannot write results into {out_dir}: {e.strerror}; give a writable --results_dir") from None


def without_finished(entries: list, out_dir: str, suffixes: list) -> tuple[list, int]:
    """``--skip_existing``: (the entries not all of whose files are in ``out_dir``, how many were
    left out). ``suffixes``: the files of a face, each a suffix of its name (under its ``rel_dir``)
    or (folder, suffix) (under ``<folder>/<rel_dir>``, :func:`pipeline.outputs.output_files`). One
    listing per results sub-folder; a file being written has a temporary name, so a name present
    is a complete file."""
    if not suffixes:
        return entries, 0
    wanted = [s if isinstance(s, tuple) else ("", s) for s in suffixes]
    listed: dict[str, set[str]] = {}

    def names_in(d: str) -> set[str]:
        names = listed.get(d)
        if names is None:
            try:
                names = listed[d] = set(os.listdir(os.path.join(out_dir, d)))
            except (FileNotFoundError, NotADirectoryError):
                names = listed[d] = set()
        return names

    todo = [e for e in entries
            if not all(e.name + sfx in names_in(os.path.join(folder, e.rel_dir) if folder else e.rel_dir)
                       for folder, sfx in wanted)]
    return todo, len(entries) - len(todo)


def entries_of(folder: str, photos: set[str], lm68: bool = False) -> list:
    """The faces of ``photos`` (paths relative to ``folder``, '/'-separated, as the detection
    process reports them), as :func:`data.image_folder.scan_folder` would give them, in its order,
    without listing the folder: only their detection (and with ``lm68`` landmark) folders are
    read. Photos no longer there or without a detection file are left out; of photos sharing a
    sub-folder and stem, the first in listing order (the detection process marks the others
    ``duplicate_stem`` and never reports them)."""
    from data.image_folder import FaceEntry
    from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR, file_stem, stem_detection_files

    prefix = os.path.join(folder, "")
    index: dict = {}
    seen: set[tuple[str, str]] = set()
    entries = []
    for rel in sorted(photos):  # list_images' order
        rel_dir, _, name = rel.rpartition("/")
        key = (rel_dir, file_stem(name))
        if key in seen or not os.path.lexists(prefix + rel):
            continue
        seen.add(key)
        faces = stem_detection_files(folder, rel_dir, key[1], DETECTIONS_DIR, index)
        lm_files = dict(stem_detection_files(folder, rel_dir, key[1], LANDMARKS_DIR, index)) if lm68 and faces else {}
        entries += [FaceEntry(prefix + rel, det, face, rel_dir, lm_files.get(face, "")) for face, det in faces]
    return entries


def scan(spec: RunSpec, rank: int = 0, world: int = 1, only: set[str] | None = None) -> tuple[list, RunSummary]:
    """The faces a run (this rank's share) will reconstruct, and its summary so far.

    Args:
        spec: the run (its folder, results folder, ``recursive``, ``skip_existing``, outputs).
        rank, world: this rank's share, every world-th photo from ``rank``.
        only: just these photos (paths relative to the folder, '/'-separated; run_pipeline's
            detected photos), found without listing the folder (:func:`entries_of`; one rank:
            ``rank`` and ``world`` are not used); the others are left out and not reported.

    Returns:
        (the :class:`data.image_folder.FaceEntry` list to do, a :class:`RunSummary` with the
        results folder, the photos without a detection file and the faces done before).

    Raises:
        SetupError: ``spec.img_folder`` is not a folder.
    """
    from data.image_folder import scan_folder
    from pipeline.outputs import output_files

    folder = spec.img_folder
    if not os.path.isdir(folder):
        raise SetupError(f"--img_folder {folder} is not a folder; give the folder of photos "
                         "that ./process_images.sh prepared")
    if only is not None:
        entries, missing = entries_of(folder, only, lm68=spec.fit_steps > 0), []
    else:
        entries, missing = scan_folder(folder, spec.recursive, lm68=spec.fit_steps > 0, share=(rank, world))
    summary = RunSummary(out_dir=spec.out_dir, img_folder=folder, photos_without_detection=missing)
    if spec.skip_existing:
        entries, summary.faces_done_before = without_finished(entries, summary.out_dir, output_files(spec.outputs))
    return entries, summary
