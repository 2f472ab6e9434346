"""The HTML report of a run (``test.py --report``): ``index.html`` in the results folder.

Per face, the writer processes put three small files under ``<results>/report/<rel_dir>/``
(:func:`write_face_report`): ``<name>.png`` a half-size thumbnail (input | render overlay),
``<name>.json`` its numbers (:func:`face_numbers`), ``<name>.mesh.js`` its mesh for the viewer
(world space, positions quantised to int16 over the mesh's box, colours uint8, base64), and once
``triangles.js`` (the triangle list shared by every face). At the end of the run
:func:`write_report` reads the numbers, lists the failures and skipped photos of the run's summary,
copies the viewer (``viewer.js``, ours) and the vendored three.js (``tools/vendor_viewer.sh``: a
classic script, so that the page works opened from disk, ``file://``, where browsers refuse ES
modules and fetches) into ``report/``, and writes ``index.html``. Without the vendored library the
page still has everything but the 3D view, and says which command installs it.

Numbers per face: the landmark residual (mean distance in crop pixels between the 5 detected
points and the same 5 points of the predicted 68 landmarks, :func:`util.landmarks.lm68_to_5`),
the photometric residual (mean absolute difference in grey levels between render and crop where
the face is drawn) and the head pose in degrees (the coefficients' Euler angles: pitch about x,
yaw about y, roll about z).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
from urllib.parse import quote

import numpy as np

from util.atomic_files import write_bytes_atomic
from util.filenames import printable

REPORT_DIR = "report"
INDEX = "index.html"
REPORT_SUFFIXES = (".png", ".mesh.js", ".json")  # a face's files under report/<rel_dir>/: thumbnail, mesh, numbers
TRIANGLES = "triangles.js"
VIEWER_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_viewer.js")
VENDOR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vendor", "three")
VENDOR_FILES = ("three.min.js", "LICENSE")
INSTALL_HINT = "tools/vendor_viewer.sh"


# --------------------------------------------------------------------------- per face (writer processes)
def face_numbers(res, angles: np.ndarray) -> dict:
    """The report's numbers of one :class:`util.results_io.FaceResult` (see the module's docstring);
    ``angles`` (3,) radians. Missing inputs give None."""
    from util.landmarks import lm68_to_5

    lm_err = None
    if res.lm_gt is not None and res.lm68 is not None:
        gt = res.lm_gt if len(res.lm_gt) == 5 else lm68_to_5(res.lm_gt)
        lm_err = float(np.linalg.norm(lm68_to_5(res.lm68) - gt, axis=1).mean())
    pitch, yaw, roll = (float(np.degrees(a)) for a in angles)
    err = res.arrays.get("photo_error")
    photo = None if err is None or not math.isfinite(err) else float(err)
    return {"name": res.name, "rel_dir": res.rel_dir, "lm5_error_px": lm_err, "photo_error": photo,
            "pitch_deg": pitch, "yaw_deg": yaw, "roll_deg": roll}


def thumbnail(image: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """(H/2, W, 3) uint8: input | overlay, each halved by 2x2 means. image (3, H, W), overlay (H, W, 3)."""
    pair = np.concatenate([image.transpose(1, 2, 0), overlay], axis=1).astype(np.uint16)
    h, w = pair.shape[0] // 2 * 2, pair.shape[1] // 2 * 2
    p = pair[:h, :w]
    return ((p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) // 4).astype(np.uint8)


def face_key(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def mesh_script(key: str, world: np.ndarray, colors: np.ndarray) -> bytes:
    """``D3DFR.mesh(key, {...})``: the mesh for the viewer; positions = centre + q * scale with
    q the int16 in ``p``, colours the uint8 RGB in ``c`` (both little-endian, base64)."""
    lo, hi = world.min(0), world.max(0)
    centre = (lo + hi) / 2
    scale = max(float((hi - lo).max()) / 2 / 32767, 1e-12)
    q = np.clip(np.rint((world - centre) / scale), -32767, 32767).astype("<i2")
    data = {"centre": centre.tolist(), "scale": scale, "n": len(world),
            "p": base64.b64encode(q.tobytes()).decode(), "c": base64.b64encode(np.ascontiguousarray(colors,
                                                                                              np.uint8)).decode()}
    return f"D3DFR.mesh({json.dumps(key)}, {json.dumps(data)});\n".encode()


def triangles_script(faces: np.ndarray) -> bytes:
    """``D3DFR.triangles(bits, base64)``: the shared triangle list (uint16 when it fits)."""
    bits = 16 if faces.max(initial=0) < 65535 else 32
    raw = np.ascontiguousarray(faces, "<u2" if bits == 16 else "<u4").tobytes()
    return f"D3DFR.triangles({bits}, {json.dumps(base64.b64encode(raw).decode())});\n".encode()


def face_report_files(out_dir: str, res, world: np.ndarray, angles: np.ndarray,
                      faces: np.ndarray) -> list[tuple[str, list]]:
    """The face's report files under ``<out_dir>/report/`` as (path, bytes-like chunks): its
    thumbnail, numbers and viewer mesh. Makes the folder, and writes the shared ``triangles.js``
    if it is not there yet."""
    from util.png import png_chunks

    top = os.path.join(out_dir, REPORT_DIR)
    d = os.path.join(top, res.rel_dir)
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, res.name)
    if not os.path.isfile(os.path.join(top, TRIANGLES)):
        write_bytes_atomic(os.path.join(top, TRIANGLES), triangles_script(faces))
    files: list[tuple[str, list]] = []
    if res.image is not None and res.overlay is not None:
        files.append((base + ".png", png_chunks(thumbnail(res.image, res.overlay))))
    files.append((base + ".mesh.js", [mesh_script(printable(face_key(res.rel_dir, res.name)), world, res.color)]))
    files.append((base + ".json", [json.dumps(face_numbers(res, angles)).encode()]))
    return files


def write_face_report(out_dir: str, res, world: np.ndarray, angles: np.ndarray, faces: np.ndarray) -> None:
    """Write :func:`face_report_files` (each complete or absent)."""
    for path, chunks in face_report_files(out_dir, res, world, angles, faces):
        write_bytes_atomic(path, chunks)


# --------------------------------------------------------------------------- the page (end of the run)
def read_face_numbers(out_dir: str) -> list[dict]:
    """Every face's numbers under ``<out_dir>/report/`` (this run's and, with --skip_existing,
    earlier runs'), sorted by sub-folder and name; unreadable files are left out."""
    top = os.path.join(out_dir, REPORT_DIR)
    rows = []
    for d, _, files in os.walk(top):
        for f in files:
            if f.endswith(".json") and not f.startswith("."):
                try:
                    with open(os.path.join(d, f), encoding="utf-8") as fh:
                        rows.append(json.load(fh))
                except (OSError, ValueError):
                    continue
    return sorted(rows, key=lambda r: (r.get("rel_dir", ""), r.get("name", "")))


def _fmt(x, unit: str = "", digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def _url(*parts: str) -> str:
    """A relative URL of the file named by ``parts``: each name's exact bytes (``os.fsencode``: a
    name that is not UTF-8 keeps its own), percent-encoded."""
    return "/".join(quote(os.fsencode(p)) for part in parts for p in part.split("/") if p)


def _card(r: dict) -> str:
    key = face_key(r.get("rel_dir", ""), r["name"])
    rows = [("landmarks (5 pts)", _fmt(r.get("lm5_error_px"), " px", 2)),
            ("photometric", _fmt(r.get("photo_error"), " / 255", 1)),
            ("yaw / pitch / roll", " / ".join(_fmt(r.get(k), "°") for k in ("yaw_deg", "pitch_deg", "roll_deg")))]
    table = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in rows)
    shown = html.escape(printable(key))  # the mesh script's key too (face_report_files)
    return (f'<figure class="face" data-key="{shown}" data-mesh="{_url(REPORT_DIR, key)}.mesh.js">'
            f'<img loading="lazy" src="{_url(REPORT_DIR, key)}.png" alt="{shown}: input | overlay">'
            f'<figcaption>{shown} <button type="button" class="view3d">3D</button></figcaption>'
            f"<table>{table}</table></figure>")


def _mean(rows: list[dict], k: str) -> float | None:
    vals = [r[k] for r in rows if r.get(k) is not None]
    return sum(vals) / len(vals) if vals else None


def _install_viewer(top: str) -> bool:
    """Copy viewer.js and, when vendored, three.js and its licence into ``top``; whether the 3D view works."""
    os.makedirs(os.path.join(top, "vendor"), exist_ok=True)
    with open(VIEWER_JS, "rb") as fh:
        write_bytes_atomic(os.path.join(top, "viewer.js"), fh.read())
    if not all(os.path.isfile(os.path.join(VENDOR_DIR, f)) for f in VENDOR_FILES):
        return False
    for f in VENDOR_FILES:
        dst = os.path.join(top, "vendor", "three." + f if f == "LICENSE" else f)
        with open(os.path.join(VENDOR_DIR, f), "rb") as fh:
            write_bytes_atomic(dst, fh.read())
    return True


def write_report(out_dir: str, failures: list[tuple[str, str]], skipped: list[str],
                 title: str = "Deep3DFaceRecon results") -> tuple[str, bool]:
    """Write ``<out_dir>/index.html`` from the per-face files and the run's ``failures`` ((face,
    reason)) and ``skipped`` photos; returns (its path, whether the 3D viewer is in it)."""
    top = os.path.join(out_dir, REPORT_DIR)
    os.makedirs(top, exist_ok=True)
    rows = read_face_numbers(out_dir)
    viewer = _install_viewer(top)
    lm, photo = _mean(rows, "lm5_error_px"), _mean(rows, "photo_error")
    summary = (f"{len(rows)} face(s) reconstructed, {len(failures)} failed, {len(skipped)} photo(s) skipped. "
               f"Mean landmark residual {_fmt(lm, ' px', 2)}, mean photometric residual {_fmt(photo, ' / 255')}.")
    if viewer:
        scripts = (f'<script src="{REPORT_DIR}/vendor/three.min.js"></script>'
                   f'<script src="{REPORT_DIR}/viewer.js"></script><script src="{REPORT_DIR}/{TRIANGLES}"></script>')
        note = ("Drag to turn the face, wheel to zoom; <b>3D</b> on a face shows its mesh. three.js "
                f'(<a href="{REPORT_DIR}/vendor/three.LICENSE">MIT licence</a>).')
    else:
        scripts = f'<script src="{REPORT_DIR}/viewer.js"></script>'
        note = (f"The 3D viewer is not installed: run <code>{INSTALL_HINT}</code> in the repository "
                "(it fetches three.js from the npm registry), then test.py --report again.")
    fails = "".join(f"<li><b>{html.escape(printable(a))}</b>: {html.escape(printable(b))}</li>" for a, b in failures)
    skips = "".join(f"<li>{html.escape(printable(s))}</li>" for s in skipped)
    problems = ""
    if fails:
        problems += f'<h2>Failed ({len(failures)})</h2><ul class="failures">{fails}</ul>'
    if skips:
        problems += (f"<h2>Skipped: no detection file ({len(skipped)})</h2><p>Run ./process_images.sh on the "
                     f'folder first.</p><ul class="skipped">{skips}</ul>')
    if not problems:
        problems = "<h2>Failures</h2><p>None.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }}
#viewer-panel {{ display: flex; gap: 1em; align-items: flex-start; margin: 1em 0; }}
#viewer {{ width: 420px; height: 420px; background: #20242a; border-radius: 6px; touch-action: none; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }}
.face {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; background: #fafafa; }}
.face img {{ width: 100%; image-rendering: auto; display: block; }}
.face figcaption {{ font-weight: 600; margin: 4px 0; display: flex; justify-content: space-between; }}
.face table {{ font-size: 12px; border-collapse: collapse; width: 100%; }}
.face th {{ text-align: left; font-weight: normal; color: #666; padding-right: 6px; }}
.face.selected {{ outline: 2px solid #2a7ae2; }}
.failures li, .skipped li {{ font-family: monospace; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="summary">{html.escape(summary)}</p>
<div id="viewer-panel"><canvas id="viewer" width="420" height="420"></canvas>
<div><p id="viewer-label"></p><p id="viewer-note">{note}</p></div></div>
<h2>Faces ({len(rows)})</h2>
<p>Each face: the aligned input | the render over it; landmark residual (5 detected points vs the
prediction), photometric residual (render vs photo where the face is drawn), head pose.</p>
<div class="grid">{"".join(_card(r) for r in rows)}</div>
{problems}
{scripts}
</body></html>
"""
    path = os.path.join(out_dir, INDEX)
    write_bytes_atomic(path, page.encode())
    return path, viewer
