#!/usr/bin/env bash
# One call on a lent GPU machine (the lead's `device` tool): install carried wheels and GL
# libraries, build the stand-in, run the GPU tests, the examples on CUDA and OpenGL, the
# renderer agreement and the inference benchmark. Everything lands in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ -d .gl ]; then  # EGL/GL runtime into /, headers and link names elsewhere (for nvdiffrast's GL plugin)
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  mkdir -p /tmp/gldev/lib; for f in .gl/dev/*.deb; do dpkg -x "$f" /tmp/gldev; done
  for l in EGL GL; do ln -sf /usr/lib/x86_64-linux-gnu/lib$l.so.1 /tmp/gldev/lib/lib$l.so; done
  export CPATH=/tmp/gldev/usr/include LIBRARY_PATH=/tmp/gldev/lib
  [ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ] && \
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
step() { echo "== $1"; shift; ( time "$@" ) 2>&1 | tee -a "$OUT/log.txt" | tail -n 25; }
