"""The code's layers only look down, nothing imports in a cycle, and no library function takes `opt`.

    scripts: test.py train.py process_images.py run_pipeline.py mtcnn_detector.py,
             experiments/ benchmarks/ tools/                      may import everything below
    options/                                                      -> pipeline, detect, data, models, util
    pipeline/                                                     -> detect, data, models, util
    detect/                                                       -> data, models, util
    data/                                                         -> models, util
    models/                                                       -> util
    util/                                                         -> nothing of ours

Every import counts, also those inside functions (they run as soon as the function does); only
those under ``if TYPE_CHECKING:`` (never run) do not.
"""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

LIBRARY = ["util", "models", "data", "detect", "pipeline", "options"]  # bottom to top
ALLOWED = {layer: set(LIBRARY[:i + 1]) for i, layer in enumerate(LIBRARY)}
SCRIPT_PACKAGES = ["experiments", "benchmarks", "tools"]


def our_modules() -> dict[str, str]:
    """Module name -> file, for every Python file of ours outside tests/."""
    mods = {}
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if name.endswith(".py"):
            mods[name[:-3]] = path
        elif os.path.isdir(path) and name in LIBRARY + SCRIPT_PACKAGES:
            for d, _, files in os.walk(path):
                for f in files:
                    if f.endswith(".py"):
                        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                        mods[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return mods


def imports_of(path: str, module: str, mods: dict[str, str]) -> set[str]:
    """Our modules that ``module`` (file ``path``) imports anywhere in its code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in run_nodes(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def run_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = our_modules()
    return {m: imports_of(p, m, mods) for m, p in mods.items()}


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LIBRARY else None


def test_every_import_looks_down(graph):
    wrong = sorted(f"{m} imports {i}" for m, deps in graph.items() if layer(m)
                   for i in deps if layer(i) not in ALLOWED[layer(m)])
    assert not wrong, "imports from a lower layer to a higher one or to a script:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_library_function_takes_the_whole_opt():
    takers = []
    for m, path in our_modules().items():
        if not layer(m) or layer(m) == "options":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "opt" for a in args):
                    takers.append(f"{m}.{node.name}")
    assert not takers, "library functions that take opt (give them a settings dataclass):\n" + "\n".join(takers)


def test_the_run_lives_in_pipeline_not_in_models():
    for gone in ("models/inference.py", "models/ranks.py", "models/output_extras.py", "util/prepare.py",
                 "util/synthetic.py", "util/standin.py"):
        assert not os.path.exists(os.path.join(ROOT, gone)), gone


def test_train_options_load_no_torch():
    code = ("import sys; import options.train_options as t; t.parse_train_options(['--name', 'x']); "
            "print(sorted(m for m in ('torch', 'models.losses') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The walker sees imports inside functions and relative imports (a check of the check)."""
    pkg = tmp_path / "util"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import z\n"
                              "def f():\n    from models.x import y\n    from . import b\n")
    mods = {"util": str(pkg / "__init__.py"), "util.a": str(pkg / "a.py"), "util.b": "", "models.x": "",
            "pipeline": ""}
    assert imports_of(str(pkg / "a.py"), "util.a", mods) == {"models.x", "util.b", "util"}
