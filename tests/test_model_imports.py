"""The models side of the layers (issue #17): models import only models and util, the loss does not
import the recogniser (no losses <-> recog cycle), util imports nothing of ours above it, and the
training options load no torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("models", "util", "data", "pipeline", "detect", "options", "experiments", "tools", "benchmarks",
        "train", "test", "run_pipeline", "mtcnn_detector", "process_images")
# files that the parallel #17 work (pipeline/, detect/) moves out of models/ and util/
MOVED_ELSEWHERE = {"models/inference.py", "util/prepare.py"}


def imported(path: str) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth of the file (lazy imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in OURS}


def files(package: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
        out += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(out)


def test_models_import_only_models_and_util():
    bad = {os.path.relpath(p, ROOT): sorted(m for m in imported(p) if m.split(".")[0] not in ("models", "util"))
           for p in files("models") if os.path.relpath(p, ROOT) not in MOVED_ELSEWHERE}
    assert not {k: v for k, v in bad.items() if v}


def test_util_imports_nothing_above_it():
    bad = {os.path.relpath(p, ROOT): sorted(m for m in imported(p) if m.split(".")[0] != "util")
           for p in files("util") if os.path.relpath(p, ROOT) not in MOVED_ELSEWHERE}
    assert not {k: v for k, v in bad.items() if v}


def test_losses_do_not_import_the_recogniser():
    assert "models.recog" not in imported(os.path.join(ROOT, "models", "losses.py"))
    assert "models.losses" not in imported(os.path.join(ROOT, "models", "loss_weights.py"))


def test_train_options_load_no_torch():
    code = ("import sys; import options.train_options as t; t.parse_train_options(['--name', 'x']); "
            "print(sorted(m for m in ('torch', 'models.losses') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
