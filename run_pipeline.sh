#!/usr/bin/env bash
# Detect and reconstruct a folder in one command, streaming. See run_pipeline.py and docs/detection_speed.md.
# Usage: ./run_pipeline.sh <folder> --name=<model> --epoch=20 [test.py options] [--detect_device cuda] ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/run_pipeline.py" "$@"
