"""One place that checks for files the user must provide, with a message that says how."""
from __future__ import annotations

import os

BFM_HELP = (
    "The Basel Face Model is licensed and cannot be shipped: request BFM 2009 at "
    "https://faces.dmi.unibas.ch/bfm/main.php?nav=1-2&id=downloads and put 01_MorphableModel.mat "
    "in {folder}; get Exp_Pca.bin (Guo et al., CoarseData) from "
    "https://github.com/Juyong/3DFace and put it in {folder}. "
    "For a demo without licensed files run `python -m util.standin` and pass "
    "--bfm_folder standin/BFM --name standin."
)
CHECKPOINT_HELP = (
    "Put the trained model at {path} (e.g. the authors' epoch_20.pth from the Deep3DFaceRecon_pytorch "
    "README, in checkpoints/<name>/), or run `python -m util.standin` for the stand-in model "
    "(--name standin)."
)


class MissingAssetError(FileNotFoundError):
    """A file the user must provide is missing; ``str(err)`` says what to do, in one line."""


def require_file(path: str, what: str, how: str) -> str:
    """Return ``path`` if it is a file, else raise :class:`MissingAssetError` naming it and ``how``."""
    if not os.path.isfile(path):
        raise MissingAssetError(f"{what} not found: {path}. {how}")
    return path


def error_line(e: BaseException) -> str:
    """``e`` as one line for a message: its type and the first non-empty line of its text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
