"""Make the UV layout of the BFM front mesh once: ``BFM/bfm_front_uv.npy`` ((35709, 2) float32).

    python tools/make_bfm_uv.py [--bfm_folder standin/BFM] [--out BFM/bfm_front_uv.npy]

Reads the converted front model (``BFM_model_front.mat``: its triangles and mean shape) and lays
the mesh out with :func:`util.uv_texture.mean_value_layout`. The shipped file was made from the
stand-in model (``python -m tools.standin``), whose front mesh has the BFM's topology and a mean
shape built from ``BFM/standin_mean_shape_53490_dm.npy``; the real BFM gives the same triangles,
so the layout fits it (only the texel density would differ slightly).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from models.bfm import load_front_model
    from util.atomic_files import write_atomic
    from util.uv_texture import UV_FILE, mean_value_layout, signed_areas

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bfm_folder", default=os.path.join(ROOT, "standin", "BFM"))
    p.add_argument("--out", default=os.path.join(ROOT, "BFM", UV_FILE))
    args = p.parse_args(argv)
    model = load_front_model(args.bfm_folder, cache=False)
    vertices = model["meanshape"].reshape(-1, 3)
    faces = model["tri"].astype(np.int64) - 1
    uv = mean_value_layout(vertices, faces).astype(np.float32)
    areas = signed_areas(uv, faces)
    write_atomic(args.out, lambda fh: np.save(fh, uv))
    print(f"{args.out}: {len(uv)} vertices, {int((areas <= 0).sum())} folded triangle(s) of {len(faces)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
