#!/usr/bin/env bash
# Quick start on a fresh machine: install, build the stand-in model, detect faces in examples/,
# reconstruct them. Results: checkpoints/standin/results/examples/epoch_20_000000/
#
#   ./quickstart.sh [test.py options]
#
# Environment: PYTHON (default python3); EXTRAS, the pyproject.toml extras to install (default
# mtcnn-tf,dev: the default detector and the test suite); TORCH_INDEX_URL, where torch comes from
# when it is not installed (default: PyTorch's CPU index on a machine without an NVIDIA GPU, PyPI's
# CUDA build with one). An installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PYTHON="$PY"   # process_images.sh runs the same interpreter
EXTRAS=${EXTRAS:-mtcnn-tf,dev}
"$PY" tools/install_torch.py
"$PY" -m pip install -q -e ".[$EXTRAS]"
"$PY" -m tools.standin
./process_images.sh examples
"$PY" test.py --name=standin --epoch=20 --img_folder=examples --bfm_folder=standin/BFM "$@"
