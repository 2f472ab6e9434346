#!/usr/bin/env bash
# Detect 5 facial landmarks in every photo of a folder, for test.py. See docs/process_images.md.
# Usage: ./process_images.sh <folder> [options]   (python process_images.py --help for options)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/process_images.py" "$@"
