#!/usr/bin/env bash
# Quick start on a fresh machine: install, build the stand-in model, detect faces in examples/,
# reconstruct them. Results: checkpoints/standin/results/examples/epoch_20_000000/
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  torch_req=()            # keep the torch you have (CPU or CUDA)
else
  torch_req=(torch==2.13.0)
fi
"$PY" -m pip install -q "${torch_req[@]}" -r requirements.txt -r requirements-dev.txt
"$PY" -m util.standin
./process_images.sh examples
"$PY" test.py --name=standin --epoch=20 --img_folder=examples --bfm_folder=standin/BFM "$@"
