"""One place that checks for files the user must provide, with a message that says how."""
from __future__ import annotations

import os

BFM_HELP = (
    "The Basel Face Model is licensed and cannot be shipped: request BFM 2009 at "
    "https://faces.dmi.unibas.ch/bfm/main.php?nav=1-2&id=downloads and put 01_MorphableModel.mat "
    "in {folder}; get Exp_Pca.bin (Guo et al., CoarseData) from "
    "https://github.com/Juyong/3DFace and put it in {folder}. "
    "For a demo without licensed files run `python -m tools.standin` and pass "
    "--bfm_folder standin/BFM --name standin."
)
CHECKPOINT_HELP = (
    "Put the trained model at {path} (e.g. the authors' epoch_20.pth from the Deep3DFaceRecon_pytorch "
    "README, in checkpoints/<name>/), or run `python -m tools.standin` for the stand-in model "
    "(--name standin)."
)


class MissingAssetError(FileNotFoundError):
    """A file the user must provide is missing; ``str(err)`` says what to do, in one line."""


def require_file(path: str, what: str, how: str) -> str:
    """Check that a file the user must provide is there.

    Args:
        path: the file.
        what: what it is, for the message (e.g. ``"Face model"``).
        how: what to do to get it, appended to the message.

    Returns:
        ``path`` itself.

    Raises:
        MissingAssetError: ``path`` is not a file; ``"<what> not found: <path>. <how>"``.
    """
    if not os.path.isfile(path):
        raise MissingAssetError(f"{what} not found: {path}. {how}")
    return path


def checkpoint_file(checkpoints_dir: str, name: str, epoch: str) -> str:
    """Where a model's checkpoint lies (the original's layout); not checked here.

    Args:
        checkpoints_dir: e.g. ``./checkpoints``.
        name: the model's name (``--name``).
        epoch: its epoch as given on the command line (e.g. ``'20'``).

    Returns:
        ``<checkpoints_dir>/<name>/epoch_<epoch>.pth``.
    """
    return os.path.join(checkpoints_dir, name, f"epoch_{epoch}.pth")


def inputs_error(img_folder: str, checkpoint: str, bfm_folder: str, bfm_model: str) -> str | None:
    """The first missing input of a test.py run, as one line saying what to do (None: all there).

    Only looks at paths (no import beyond ``os``), so test.py reports a mistyped path before it
    loads torch; the model loaders check the files' contents later.

    Args:
        img_folder: the photo folder (must be a folder).
        checkpoint: the checkpoint file (:func:`checkpoint_file`).
        bfm_folder: the face model's folder.
        bfm_model: the face model's file name in it (or ``01_MorphableModel.mat`` there to convert).

    Returns:
        The message for the first missing input, in that order, or None when all are there.
    """
    if not os.path.isdir(img_folder):
        return f"--img_folder {img_folder} is not a folder; give the folder of photos that ./process_images.sh prepared"
    if os.path.isdir(checkpoint):
        return f"the checkpoint {checkpoint} is a folder, not a file. {CHECKPOINT_HELP.format(path=checkpoint)}"
    if not os.path.isfile(checkpoint):
        return f"checkpoint not found: {checkpoint}. {CHECKPOINT_HELP.format(path=checkpoint)}"
    if not os.path.isdir(bfm_folder):
        return f"--bfm_folder {bfm_folder} is not a folder. {BFM_HELP.format(folder=bfm_folder)}"
    model = os.path.join(bfm_folder, bfm_model)
    if not (os.path.isfile(model) or os.path.isfile(os.path.join(bfm_folder, "01_MorphableModel.mat"))):
        return (f"Face model not found: {model} (nor 01_MorphableModel.mat to convert it from). "
                f"{BFM_HELP.format(folder=bfm_folder)}")
    return None


def error_line(e: BaseException) -> str:
    """An exception as one line for a message.

    Args:
        e: any exception.

    Returns:
        ``"<TypeName>: <first non-empty line of str(e)>"``, or the type's name alone for an empty text.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
