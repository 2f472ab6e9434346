"""The documentation's links to files of the repository resolve: every relative markdown link in a
tracked ``.md`` file names a tracked file or folder (three had pointed at files never committed or
one folder too high)."""
import os
import re
import subprocess

import pytest

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def tracked(pattern: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (git ls-files)")
    return out.stdout.split()


def test_relative_links_in_the_docs_name_tracked_files():
    files = set(tracked("*"))
    folders = {os.path.dirname(f) for f in files}
    while any(os.path.dirname(d) not in folders for d in folders if d):
        folders |= {os.path.dirname(d) for d in folders}
    docs = [f for f in files if f.endswith(".md")]
    assert "README.md" in docs and "docs/training.md" in docs
    broken, seen = [], 0
    for doc in docs:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as fh:
            text = fh.read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            seen += 1
            path = os.path.normpath(os.path.join(os.path.dirname(doc), target)).rstrip("/")
            if path not in files and path not in folders:
                broken.append(f"{doc}: {target}")
    assert seen > 50  # the README and docs link to many runs and results
    assert not broken, "links to files that are not in the repository:\n" + "\n".join(broken)
