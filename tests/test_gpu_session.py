"""benchmarks/gpu_session.sh, the README's GPU verification, is one runnable command: it runs
every step (here with DRY_RUN=1, which lists them without running them) and refuses unknown ones."""
import os
import subprocess

from conftest import ROOT

STEPS = ["gpu", "examples", "agreement", "bench", "detect", "sets_video"]


def _session(tmp_path, *steps: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh"), *steps], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_session_runs_every_step_by_default(tmp_path):
    done = _session(tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line[3:] for line in done.stdout.splitlines() if line.startswith("== ")] == STEPS
    assert done.stdout.splitlines()[-1] == f"gpu_session: {len(STEPS)} step(s), 0 failed"


def test_gpu_session_runs_the_steps_asked_for_and_refuses_unknown_ones(tmp_path):
    done = _session(tmp_path, "bench", "gpu")
    assert [line[3:] for line in done.stdout.splitlines() if line.startswith("== ")] == ["bench", "gpu"]
    bad = _session(tmp_path, "nosuch")
    assert bad.returncode == 2 and "unknown step: nosuch" in bad.stdout
