"""detect/ and util/ import only what their layer may (issue 17): util imports nothing of ours
above it (no detect, models, pipeline, options, top-level scripts); detect imports detect, models,
util and data only; the top-level mtcnn_detector.py keeps the names scripts import from it."""
from __future__ import annotations

import ast
import os

from conftest import ROOT

SCRIPTS = {"mtcnn_detector", "process_images", "run_pipeline", "test", "train"}
OURS = {"detect", "models", "util", "data", "pipeline", "options", "experiments", "benchmarks", "tools"} | SCRIPTS


def _imports(path: str) -> set[str]:
    """Top-level names of the project's modules that the file imports (any depth in the file)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & OURS


def _files(package: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, package)) for f in files
            if f.endswith(".py")]


def test_detect_imports_only_lower_layers():
    bad = {os.path.relpath(p, ROOT): sorted(_imports(p) - {"detect", "models", "util", "data"})
           for p in _files("detect")}
    assert not {k: v for k, v in bad.items() if v}


def test_detection_util_modules_import_nothing_above_util():
    for name in ("landmarks", "preprocess", "detections_io", "image_io", "checks"):
        p = os.path.join(ROOT, "util", name + ".py")
        assert _imports(p) <= {"util"}, (name, _imports(p))
    assert all("detect" not in _imports(p) and not (_imports(p) & SCRIPTS) for p in _files("util"))


def test_top_level_module_keeps_its_names():
    import mtcnn_detector
    from detect import base, registry

    assert mtcnn_detector.create_detector is registry.create_detector
    assert mtcnn_detector.Detection is base.Detection and mtcnn_detector.DETECTORS is registry.DETECTORS
    for name in mtcnn_detector.__all__:
        assert hasattr(mtcnn_detector, name), name
