"""Install torch for this machine unless one is installed (quickstart.sh and .ci/run call this).

    python tools/install_torch.py

The version range is pyproject.toml's (the one place that states it). Where torch comes from:
``$TORCH_INDEX_URL`` when set; else PyPI's default build (CUDA) when ``nvidia-smi`` lists a GPU;
else PyTorch's CPU index (a few hundred MB instead of several GB). pip's own configuration
(find-links, extra indexes, constraints) applies as always. Standard library only: it runs
before anything is installed.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_requirement(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> str:
    """The torch line of pyproject.toml's dependencies, e.g. ``torch>=2.1,<3``."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return next(d for d in deps if d.replace(" ", "").startswith(("torch>", "torch=", "torch<", "torch~")))


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def torch_index() -> str | None:
    """The index to take torch from (None: pip's default, PyPI)."""
    if os.environ.get("TORCH_INDEX_URL"):
        return os.environ["TORCH_INDEX_URL"]
    return None if has_nvidia_gpu() else CPU_INDEX


def reachable(url: str, timeout: float = 15.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> int:
    req = torch_requirement()
    try:
        print(f"torch {importlib.metadata.version('torch')} is installed: kept (pyproject.toml asks for {req})")
        return 0
    except importlib.metadata.PackageNotFoundError:
        pass
    req = os.environ.get("TORCH_PIN") or req  # a machine's own pin inside the range (CI: its local CPU wheel)
    index = torch_index()
    if index == CPU_INDEX and not reachable(index.rstrip("/") + "/torch/"):
        # a machine that reaches PyPI (or its own mirrors) but not PyTorch's index: pip's configured sources
        print(f"{index} is not reachable: installing from pip's configured sources instead", flush=True)
        index = None
    cmd = [sys.executable, "-m", "pip", "install", "-q", req]
    if index:
        cmd += ["--index-url", index]
    source = index or "pip's configured sources (PyPI: its CUDA build on Linux x86_64)"
    print(f"installing {req} from {source}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        print(f"error: could not install torch; install it for your platform (https://pytorch.org), "
              f"then run this again: {' '.join(cmd[2:])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
