"""Build nvdiffrast's plugin ahead of the first run: ``python -m tools.build_nvdiffrast``.

nvdiffrast (``diffrp-nvdiffrast``) compiles its CUDA plugin the first time a run renders on the
GPU: about 25 s with the CUDA toolkit's nvcc, once per machine and torch version (kept in torch's
extension folder, ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). This does it now,
by rendering one triangle, so that the first ``test.py`` on a fresh machine (or a timed
benchmark) does not pay for it. ``--opengl`` also builds the OpenGL plugin (needs EGL).

Exit status: 0 built or already built, 2 no CUDA device / nvdiffrast missing / the build failed
(one line saying what to do).
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--opengl", action="store_true", help="also build the OpenGL plugin (--use_opengl True)")
    p.add_argument("--device", default="cuda", help="the CUDA device to render on (default: cuda)")
    a = p.parse_args(argv)
    import torch

    from models.renderer.nvdiffrast_backend import NvdiffrastUnavailableError, build_plugins

    if not torch.cuda.is_available():
        print(f"build_nvdiffrast: error: torch {torch.__version__} sees no CUDA device; nvdiffrast's plugin is "
              "built on a machine with a GPU (the CPU renderer needs none)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    built = []
    try:
        for context in ("cuda", "opengl") if a.opengl else ("cuda",):
            built += build_plugins(context, a.device)
    except (NvdiffrastUnavailableError, ValueError, RuntimeError) as e:
        print(f"build_nvdiffrast: error: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    print(f"build_nvdiffrast: built {', '.join(built)} in {took:.1f} s" if built else
          f"build_nvdiffrast: already built ({took:.1f} s to load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
