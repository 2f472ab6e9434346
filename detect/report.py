"""process_images' report: one row per photo, a summary, written atomically and read back for resuming.

Report file format 1 (UTF-8 JSON): ``tool``, ``format``, ``folder``, ``written``, ``interrupted``,
``options``, ``settings``, ``summary`` (:func:`summarize`) and ``images`` (rows, :func:`make_row`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from detect.settings import Plan
from util.atomic_files import write_atomic
from util.detections_io import DETECTIONS_DIR, ensure_folder
from util.filenames import from_hex, is_plain, json_text, raw_hex

REPORT_NAME = "process_report.json"
REPORT_TOOL = "process_images"
REPORT_FORMAT = 1
MIN_IMAGE_SIDE = 20  # MTCNN's smallest face size; a smaller photo cannot hold a usable face
NAME_KEYS = ("path", "outputs", "debug_vis")  # row fields holding file names (see write_report)
# Reasons a photo gets no detection file, besides util.image_io.LOAD_REASONS.
SKIP_REASONS = {
    "no_face": "no face found",
    "low_confidence": "faces found, but all below --min_score",
    "too_small": f"the image is smaller than {MIN_IMAGE_SIDE} pixels on a side",
    "duplicate_stem": "another photo in the same folder has the same name stem",
    "name_clash": "the name looks like an extra-face name (<stem>__faceNN) of another photo",
    "detector_error": "the detector raised an error on this image",
    "output_blocked": "a folder or special file has the name of one of its detection files",
}


@dataclass
class Report:
    """Result of :func:`run_plan`: the rows (sorted by path), the summary, whether interrupted,
    and whether its worker processes were left ending on their own (``run_plan(...,
    wait_for_workers=False)``)."""

    path: str
    rows: list[dict]
    summary: dict
    interrupted: bool = False
    workers_left: bool = False


def file_stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def make_row(rel: str, status: str, reason: str = "", detail: str = "", stat: os.stat_result | None = None,
             settings: dict | None = None, **extra) -> dict:
    """One report row. Keys:

    path (relative, '/'-separated), status ('ok' | 'skipped'), reason ('' or a key of
    SKIP_REASONS / util.image_io.LOAD_REASONS), detail (human text), faces (faces at or above
    min_score), weak_faces (below it), confidence (chosen face's score), box (chosen face's
    [x, y, w, h], pixels), width, height, outputs (files written, relative to the folder),
    size_bytes, mtime_ns (the photo when processed), settings, seconds (load + detection time;
    None when the detector did not run), debug_vis (the picture written, or None), reused (row
    kept from an earlier run).
    """
    row = {"path": rel, "status": status, "reason": reason, "detail": detail, "faces": 0, "weak_faces": 0,
           "confidence": None, "box": None, "width": None, "height": None, "outputs": [],
           "size_bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None,
           "settings": settings, "seconds": None, "debug_vis": None, "reused": False}
    row.update(extra)
    return row


def atomic_write_into(path: str, write) -> None:
    """:func:`util.atomic_files.write_atomic` into ``path``'s folder, made first if need be."""
    ensure_folder(os.path.dirname(path) or ".")
    write_atomic(path, write)


def summarize(rows: list[dict], seconds: float) -> dict:
    """The report's summary.

    Args:
        rows: report rows (:func:`make_row`); seconds: the run's duration.

    Returns:
        ``{"images", "ok", "faces_written", "reused", "skipped": {reason: count}, "loaded",
        "seconds"}``.
    """
    skipped: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    processed = sum(1 for r in rows if not r.get("reused"))
    faces_written = sum(sum(1 for p in r.get("outputs", []) if p.startswith(DETECTIONS_DIR + "/")) for r in rows)
    return {
        "images": len(rows),
        "ok": sum(1 for r in rows if r["status"] == "ok"),
        "faces_written": faces_written,
        "reused": len(rows) - processed,
        "skipped": dict(sorted(skipped.items())),
        "loaded": sum(1 for r in rows if r.get("width") is not None),
        "seconds": round(seconds, 3),
    }


def write_report(plan: Plan, rows: dict[str, dict], seconds: float, interrupted: bool = False) -> Report:
    """Write the report (UTF-8 JSON) atomically. File names that are not valid UTF-8 are
    written escaped (:func:`util.filenames.json_text`: each undecodable byte as ``\\xNN``) and,
    in the fields that name files (:data:`NAME_KEYS`, and ``folder``), also exactly, as the
    hexadecimal digits of their bytes in ``<field>_hex`` (a list for ``outputs``), from which
    :func:`read_report` finds the files again."""
    ordered = [rows[k] for k in sorted(rows)]
    summary = summarize(ordered, seconds)
    folder = os.path.abspath(plan.folder)
    doc = {
        "tool": REPORT_TOOL, "format": REPORT_FORMAT, "folder": folder,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "interrupted": interrupted,
        "options": asdict(plan.options), "settings": plan.options.settings(plan.min_score),
        "summary": summary, "images": [r if is_plain(r["path"]) else _with_raw_names(r) for r in ordered],
    }
    if not is_plain(folder):
        doc["folder_hex"] = raw_hex(folder)
    try:
        data = json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 somewhere (a path, a message quoting one)
        data = json.dumps(_json_safe(doc), indent=1, ensure_ascii=False).encode("utf-8")
    atomic_write_into(plan.report_path, lambda f: f.write(data))
    return Report(path=plan.report_path, rows=ordered, summary=summary, interrupted=interrupted)


def _with_raw_names(row: dict) -> dict:
    """``row`` with ``<key>_hex`` beside each name field (:data:`NAME_KEYS`): the names' bytes."""
    out = dict(row)
    for key in NAME_KEYS:
        v = row.get(key)
        if isinstance(v, str):
            out[key + "_hex"] = raw_hex(v)
        elif isinstance(v, list):
            out[key + "_hex"] = [raw_hex(x) for x in v]
    return out


def _json_safe(obj):
    """``obj`` (JSON-able) with every string passed through :func:`util.filenames.json_text`."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, dict):
        return {json_text(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _restore_names(row: dict) -> dict | None:
    """A row read back: name fields from their ``_hex`` bytes where present; None if damaged."""
    for key in NAME_KEYS:
        raw = row.pop(key + "_hex", None)
        if raw is None:
            continue
        try:
            row[key] = [from_hex(x) for x in raw] if isinstance(raw, list) else from_hex(raw)
        except (TypeError, ValueError):
            return None
    return row


def read_report(path: str) -> dict[str, dict]:
    """The rows of an earlier report, for resuming.

    Args:
        path: the report file.

    Returns:
        rows by photo path; {} when the file is absent, unreadable or of another format. Rows that
        are not well-formed (an edited report) are left out: their photos are processed again.

    Raises:
        ValueError: ``path`` exists but is not a process_images report (it is then never
            overwritten), or is not a file (a folder, a FIFO - never opened, so never waited on).
    """
    if not os.path.lexists(path):
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"{path} exists and is not a file; move it or pass --report")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("tool") != REPORT_TOOL:
        raise ValueError(f"{path} exists and was not written by process_images; move it or pass --report")
    if doc.get("format") != REPORT_FORMAT or not isinstance(doc.get("images"), list):
        return {}
    rows = (_restore_names(dict(r)) for r in doc["images"] if isinstance(r, dict))
    return {r["path"]: r for r in rows if r is not None and _well_formed(r)}


def _well_formed(row: dict) -> bool:
    """Whether a report row read back has the types :func:`plan_folder` relies on."""
    outputs, vis = row.get("outputs", []), row.get("debug_vis")
    return (isinstance(row.get("path"), str) and isinstance(outputs, list) and all(isinstance(p, str) for p in outputs)
            and (vis is None or isinstance(vis, str)))
