"""run_pipeline's photos as detection reports them: pipeline.scan.entries_of (what the feed's
scan(only=...) calls) takes them without listing the folder, and gives the faces a full scan would."""
from __future__ import annotations

import itertools
import os

import pytest

from data import image_folder
from pipeline import scan
from util.detections_io import LANDMARKS_DIR, detection_path

PHOTOS = ["a.jpg", "a.png", "b.png", "nodet.jpg", "sub/c.jpg", "sub/deeper/d.jpeg", "z.jpg"]


def make_folder(root) -> str:
    """Photos (empty files: a scan never reads them) with detections: a.jpg has two faces and 68
    landmarks; a.png shares its stem (and detection file); nodet.jpg has none."""
    folder = str(root / "photos")
    for rel in PHOTOS:
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        open(os.path.join(folder, rel), "wb").close()
    dets = [detection_path(folder, r) for r in PHOTOS if r not in ("a.png", "nodet.jpg")]
    dets += [detection_path(folder, "a.jpg", face=2), detection_path(folder, "a.jpg", subdir=LANDMARKS_DIR),
             detection_path(folder, "sub/c.jpg", face=3)]
    for p in dets:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write("1 2\n" * 5)
    return folder


@pytest.mark.parametrize("lm68", [False, True])
def test_the_reported_photos_give_the_faces_of_a_full_scan(tmp_path, lm68):
    folder = make_folder(tmp_path)
    full, _ = image_folder.scan_folder(folder, recursive=True, lm68=lm68)
    assert len(full) == 7  # a.jpg x2, b, sub/c x2, sub/deeper/d, z
    prefix = os.path.join(folder, "")
    reported = [r for r in PHOTOS if r != "a.png"]  # the detection process marks a.png duplicate_stem
    for k in (1, 2, 3, len(reported)):
        for only in itertools.combinations(reported, k):
            want = [e for e in full if e.image_path[len(prefix):] in only]
            assert scan.entries_of(folder, set(only), lm68) == want, only
    os.remove(os.path.join(folder, "z.jpg"))  # gone since detection: left out, as the listing would
    assert [e.name for e in scan.entries_of(folder, {"z.jpg", "b.png"})] == ["b"]


def test_reported_photos_are_scanned_without_listing_the_folder(tmp_path, monkeypatch):
    from pipeline.settings import ModelSpec, RunSpec

    folder = make_folder(tmp_path)
    spec = RunSpec(img_folder=folder, out_dir=str(tmp_path / "out"), model=ModelSpec(checkpoint=""),
                   recursive=True)

    def no_listing(*a, **k):
        raise AssertionError("the scan of reported photos listed the whole folder")
    monkeypatch.setattr(image_folder, "list_images", no_listing)
    entries, summary = scan.scan(spec, only={"sub/c.jpg", "b.png"})
    assert [(e.rel_dir, e.name) for e in entries] == [("", "b"), ("sub", "c"), ("sub", "c__face03")]
    assert summary.photos_without_detection == []


def test_run_pipeline_refuses_a_report_subfolder_with_recursive_report(tmp_path, capsys):
    """As test.py: a photo sub-folder report/ would write into the report's own folder."""
    import run_pipeline

    (tmp_path / "report").mkdir()
    assert run_pipeline.main([str(tmp_path), "--recursive", "true", "--report", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"run_pipeline: error: {tmp_path / 'report'}: a photo sub-folder")
