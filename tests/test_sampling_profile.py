"""benchmarks/sampler (every process of a command samples itself) and its summary."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_every_process_samples_itself_and_the_summary_names_them(tmp_path):
    """A command whose process forks a child: both write their samples (the child's sampler restarts
    after the fork, and writes at os._exit), with the busy function on top and CPU seconds counted;
    the summary groups the two under their role, with the busy frame."""
    from benchmarks.sampling_profile import summarize

    code = ("import os, time\n"
            "def busy(s):\n"
            "    t = time.time()\n"
            "    while time.time() - t < s:\n"
            "        sum(range(1000))\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    busy(0.4)\n"
            "    os._exit(0)\n"
            "busy(0.6)\n"
            "os.waitpid(pid, 0)\n")
    env = {**os.environ, "D3DFR_SAMPLE_DIR": str(tmp_path), "D3DFR_SAMPLE_INTERVAL": "0.002",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "benchmarks", "sampler"), ROOT])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    runs = [json.load(open(f)) for f in glob.glob(str(tmp_path / "*.json"))]
    assert len(runs) == 2 and len({r["pid"] for r in runs}) == 2
    for r in runs:
        assert r["samples"] > 20 and max(r["cpu"].values()) - min(r["cpu"].values()) > 0.1
        top = max(r["stacks"].items(), key=lambda kv: kv[1])[0]
        assert top.startswith("MainThread;") and ":busy:" in top
    text = summarize(str(tmp_path), 5, 0.25)
    assert text.startswith("2 processes") and "## -c MainProcess: 2 process(es)" in text and "busy" in text
