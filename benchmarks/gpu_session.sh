#!/usr/bin/env bash
# The GPU verification in one command, run from the repository root on a CUDA machine:
#   bash benchmarks/gpu_session.sh [step ...]      (default: every step below, in order)
# Installs carried wheels (.whl/) and GL libraries (.gl/) where present, builds the stand-in,
# then runs the steps: gpu (the GPU-marked tests and the CUDA cases of the inference tests),
# examples (test.py on examples/ with the CUDA rasterizer, and with OpenGL where .gl/ is present:
# the two .mat sets must be identical), agreement (CPU vs nvdiffrast renders), bench (the
# inference benchmark), detect (process_images.sh on the GPU, its agreement with the CPU port,
# the whole chain and test.py's start-up: benchmarks/bench_detect_pipeline.py on N_DETECT
# photos, default 4032), sets_video (test.py --group_by and --video at scale). Logs and JSON land
# in $OUT (default /tmp/out); the exit code is the number of failed steps. DRY_RUN=1 lists the
# steps it would run and runs none (tests/test_gpu_session.py).
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
failed=0
run_step() { local name=$1; shift; echo "== $name"; [ -z "${DRY_RUN:-}" ] || return 0
  if ! ( time "$@" ) >"$OUT/$name.log" 2>&1; then
  failed=$((failed + 1)); echo "FAILED: $name"; fi; tail -n 25 "$OUT/$name.log"; }

step_gpu() { python3 -m pytest -q -m gpu -p no:cacheprovider tests/ && \
  python3 -m pytest -q -p no:cacheprovider tests/test_inference.py tests/test_startup.py tests/test_image_sets.py \
    tests/test_video.py tests/test_detect_batched.py tests/test_hostile_outputs.py; }
step_examples() {
  ls examples/detections/*.txt >/dev/null 2>&1 || ./process_images.sh examples --detector torch || return 1
  local common=(--name=standin --epoch=20 --img_folder=examples --bfm_folder=standin/BFM --device=cuda)
  python3 test.py "${common[@]}" --results_dir="$OUT/ex_cuda" || return 1
  [ -d .gl ] || return 0
  python3 test.py "${common[@]}" --use_opengl True --results_dir="$OUT/ex_gl" || return 1
  python3 - "$OUT/ex_cuda" "$OUT/ex_gl" <<'PY'
import glob, os, sys
import numpy as np
from scipy.io import loadmat
a, b = sys.argv[1:]
names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(a, "*.mat")))
worst = max(float(np.abs(loadmat(os.path.join(a, n))[k] - loadmat(os.path.join(b, n))[k]).max())
            for n in names for k in ("id", "exp", "tex", "angle", "gamma", "trans", "lm68"))
print(f"{len(names)} faces, CUDA rasterizer vs OpenGL: largest .mat difference {worst}")
sys.exit(worst != 0.0)
PY
}
step_agreement() { python3 benchmarks/render_agreement.py --json "$OUT/render_agreement.json"; }
step_bench() { python3 benchmarks/bench_inference.py --device cuda --n 2048 --json "$OUT/bench_inference.json"; }
step_detect() { PYTHONPYCACHEPREFIX=/tmp/pyc python3 benchmarks/bench_detect_pipeline.py --n "${N_DETECT:-4032}" \
  --batch-sizes 32 --steps warm,detect,agreement,chain --json "$OUT/detect_pipeline_${N_DETECT:-4032}.json" && \
  python3 benchmarks/bench_detect_pipeline.py --steps startup --json "$OUT/startup.json"; }
step_sets_video() { python3 benchmarks/bench_sets_video.py --device cuda --photos 4096 --groups 64 --frames 2048 \
  --picture "$OUT/video_frame.png" --json "$OUT/sets_video.json"; }

if [ -z "${DRY_RUN:-}" ]; then
  [ -f standin/BFM/01_MorphableModel.mat ] && [ -f checkpoints/standin/epoch_20.pth ] || python3 -m tools.standin
  python3 -m tools.build_nvdiffrast || true  # once per machine (~25 s), so that no timed step builds it
fi
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(gpu examples agreement bench detect sets_video)
for s in "${steps[@]}"; do
  declare -F "step_$s" >/dev/null || { echo "unknown step: $s (gpu examples agreement bench detect sets_video)"; exit 2; }
  run_step "$s" "step_$s"
done
echo "gpu_session: ${#steps[@]} step(s), $failed failed"
exit "$failed"
