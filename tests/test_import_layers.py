"""Layers only look down (issue #17): util imports nothing of ours above it, models only util,
data only util and models, detect only models, util and data, pipeline those and detect (video
frames are detected in the run); the CLI scripts and options sit on top. Every import statement of every module is read (those inside functions too)."""
import ast
import os

from conftest import ROOT

SCRIPTS = {"test", "train", "process_images", "run_pipeline", "mtcnn_detector"}
ALLOWED = {
    "util": {"util"},
    "models": {"models", "util"},
    "data": {"data", "models", "util"},
    "pipeline": {"pipeline", "models", "util", "data", "detect"},  # video frames are detected there
    "detect": {"detect", "models", "util", "data"},
}
OURS = set(ALLOWED) | {"options", "benchmarks", "experiments", "tools"} | SCRIPTS
# modules another change of issue #17 moves or mends (detection into detect/, the train side's
# imports); empty this once those are in
PENDING = {"util/prepare.py", "util/synthetic.py", "util/standin.py"}


def imported_packages(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


def test_no_import_from_a_higher_layer():
    wrong = []
    for layer, allowed in ALLOWED.items():
        top = os.path.join(ROOT, layer)
        for d, _, files in os.walk(top):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                if f.endswith(".py") and rel not in PENDING:
                    wrong += [f"{rel} imports {p}" for p in sorted(imported_packages(os.path.join(d, f)) - allowed)]
    assert wrong == []


def test_the_run_lives_in_pipeline_not_in_models():
    for gone in ("models/inference.py", "models/ranks.py", "models/output_extras.py"):
        assert not os.path.exists(os.path.join(ROOT, gone))
