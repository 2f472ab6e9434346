"""Training data: an image list with 68-point landmarks, optional 5-point detections and skin masks.

List file (written by ``python -m data.prepare_list``): one face per line, tab-separated::

    <image> <TAB> <landmarks68> <TAB> <detections or -> <TAB> <skin mask or ->

Relative paths are resolved against ``--data_root`` (the original's flag). Landmark and detection
files are process_images.py's (``x y`` per line, photo pixels, **y down**); a skin mask is an
image of the photo's size whose grey level is the skin probability (the original's ``mask/``
folder; optional, ones when absent).

Each item is the original's training sample: the photo aligned to the 224x224 crop from the 5
points of its 68 landmarks (``--align_lm lm68``, the original) or from its 5-point detections
(``--align_lm lm5``, test.py's alignment), then the original's augmentation (``--preprocess``
shift/scale/rot/flip with ``--shift_pixs``, ``--scale_delta``, ``--rot_angle``), one affine warp
applied to image, mask and landmarks (a flip also mirrors the landmark order).

:func:`read_list` checks every referenced file before training starts (existence and landmark
syntax) and raises :class:`DataError` listing what is missing.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from util.detections_io import DetectionFileError, read_points
from util.image_io import load_image
from util.landmarks import flip_y
from util.preprocess import align_img, image_to_array

CROP = 224
NO_FILE = "-"
# 68-point index of each point's mirror image (iBUG layout), used when an augmentation flips
LM68_MIRROR = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + list(range(35, 30, -1))
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])


class DataError(ValueError):
    """The training list or a file it names is missing or malformed; the message says which."""


@dataclass(frozen=True)
class TrainEntry:
    """One training face, as a line of the training list names it (paths resolved).

    Attributes:
        image: the photo.
        lm68: its 68 landmarks (``x y`` lines, photo pixels, y down).
        lm5: its 5-point detections (same format), or None when absent.
        mask: its skin mask (an image of the photo's size, read as grey 0..255 and scaled to 0..1
            weights), or None when absent.
    """

    image: str
    lm68: str
    lm5: str | None = None
    mask: str | None = None

    def to_line(self, root: str = "") -> str:
        """The entry as a line of the training list (without the newline).

        Args:
            root: write paths relative to it ('' : as they are).

        Returns:
            ``image<TAB>lm68<TAB>lm5<TAB>mask``, ``-`` for an absent file.
        """
        def rel(p):
            return NO_FILE if p is None else (os.path.relpath(p, root) if root else p)

        return "\t".join([rel(self.image), rel(self.lm68), rel(self.lm5), rel(self.mask)])


@dataclass(frozen=True)
class AugmentConfig:
    """The original's augmentation options (``--preprocess`` names which ones are on).

    Attributes:
        use_aug: augment at all (False for validation).
        preprocess: the augmentations on, by name contained in it: 'shift', 'scale', 'rot', 'flip'.
        shift_pixs: largest shift in crop pixels (an integer in -s..s on each axis).
        scale_delta: scale drawn uniformly in 1 +- scale_delta.
        rot_angle: rotation drawn uniformly in +- rot_angle degrees.
    """

    use_aug: bool = True
    preprocess: str = "shift_scale_rot_flip"
    shift_pixs: float = 10.0
    scale_delta: float = 0.1
    rot_angle: float = 10.0


# --------------------------------------------------------------------------- the list
def parse_list_line(line: str, root: str) -> TrainEntry:
    """One line of a training list -> its entry.

    Args:
        line: 2 to 4 tab-separated paths (image, landmarks68, detections, mask; ``-`` or empty for
            none), a trailing newline allowed.
        root: relative paths are resolved against it.

    Returns:
        The entry (files are not checked here: :func:`check_entry`).

    Raises:
        ValueError: not 2 to 4 columns, or no image or landmarks68 path.
    """
    cols = line.rstrip("\n").split("\t")
    if len(cols) < 2 or len(cols) > 4:
        raise ValueError(f"expected 2 to 4 tab-separated paths (image, landmarks68, detections, mask), "
                         f"got {len(cols)} column(s)")
    cols += [NO_FILE] * (4 - len(cols))

    def resolve(p: str) -> str | None:
        p = p.strip()
        if p in ("", NO_FILE):
            return None
        return p if os.path.isabs(p) else os.path.join(root, p)

    image, lm68, lm5, mask = (resolve(c) for c in cols)
    if image is None or lm68 is None:
        raise ValueError("the image and landmarks68 columns are required")
    return TrainEntry(image, lm68, lm5, mask)


def read_list(flist: str, data_root: str = "./", max_size: float = math.inf, need_lm5: bool = False,
              check_files: bool = True) -> list[TrainEntry]:
    """Read and check a training list before any training starts.

    Args:
        flist: the tab-separated list (image, landmarks68, detections, mask; ``-`` for none).
        data_root: relative paths of the list are resolved against it.
        max_size: keep at most this many entries.
        need_lm5: every entry must list its 5-point detections (``--align_lm lm5``).
        check_files: check that every listed file exists and every landmark file holds 68 points.

    Returns:
        the entries, in the list's order.

    Raises:
        DataError: the list is missing or empty, or names problems (up to 10 lines of them, then
            a count).
    """
    if not os.path.isfile(flist):
        raise DataError(f"training list not found: {flist}. Build it with `python -m data.prepare_list "
                        "--img_folder <folders> --out <list>` after `./process_images.sh <folder> --landmarks68`")
    entries, problems = [], []
    with open(flist, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append(parse_list_line(line, data_root))
            except ValueError as e:
                problems.append(f"{flist}:{n}: {e}")
            if len(entries) >= max_size:
                break
    if check_files:
        for e in entries:
            problems += check_entry(e, need_lm5)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} problem(s) in training list {flist} (data_root {data_root}):\n  "
                        f"{shown}{more}\nRe-run `python -m data.prepare_list` (and ./process_images.sh "
                        "--landmarks68 on the folders) to rebuild it.")
    if not entries:
        raise DataError(f"training list {flist} names no faces")
    return entries


def check_entry(e: TrainEntry, need_lm5: bool = False) -> list[str]:
    """Check one entry's files.

    Args:
        e: the entry.
        need_lm5: its 5-point detections must be listed and exist.

    Returns:
        One message per problem (a missing image, landmark file or skin mask; a 68-landmark file
        that is not 68 lines of ``x y``); empty when all is well. Never raises for bad files.
    """
    out = []
    for what, path in (("image", e.image), ("landmarks68", e.lm68), ("skin mask", e.mask)):
        if path is not None and not os.path.isfile(path):
            out.append(f"{what} not found: {path}")
    if need_lm5:
        if e.lm5 is None:
            out.append(f"no 5-point detections listed for {e.image} (needed by --align_lm lm5)")
        elif not os.path.isfile(e.lm5):
            out.append(f"detections not found: {e.lm5}")
    if os.path.isfile(e.lm68):
        try:
            read_points(e.lm68, 68)
        except DetectionFileError as err:
            out.append(str(err))
    return out


# --------------------------------------------------------------------------- alignment and augmentation
def random_affine(cfg: AugmentConfig, size: int, rng: random.Random) -> tuple[np.ndarray, bool]:
    """The original's random augmentation: flip, shift, rotate, scale about the crop centre.

    Args:
        cfg: which augmentations and how strong (``cfg.use_aug`` is not read here).
        size: the crop's side in pixels (224).
        rng: the random source (drawn in this order: shift, scale, rotation, flip).

    Returns:
        ((2, 3) float64 matrix mapping source to destination pixels, y down, pixel centres at
        integers; whether the crop is mirrored).
    """
    shift_x = shift_y = 0.0
    scale, rot, flip = 1.0, 0.0, False
    p = cfg.preprocess
    if "shift" in p:
        s = int(cfg.shift_pixs)
        shift_x, shift_y = rng.randint(-s, s), rng.randint(-s, s)
    if "scale" in p:
        scale = 1 + cfg.scale_delta * (2 * rng.random() - 1)
    if "rot" in p:
        rot = math.radians(cfg.rot_angle * (2 * rng.random() - 1))
    if "flip" in p:
        flip = rng.random() > 0.5
    c = (size - 1) / 2.0
    cos, sin = math.cos(rot), math.sin(rot)
    to_origin = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    shift = np.array([[1, 0, shift_x], [0, 1, shift_y], [0, 0, 1.0]])
    rotate = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1.0]])
    zoom = np.diag([scale, scale, 1.0])
    back = np.array([[1, 0, c], [0, 1, c], [0, 0, 1.0]])
    return (back @ zoom @ rotate @ shift @ mirror @ to_origin)[:2], flip


def apply_affine(img: np.ndarray, mat: np.ndarray, size: int, cubic: bool = True) -> np.ndarray:
    """Warp an image with OpenCV, zero border.

    Args:
        img: (H, W) or (H, W, C) uint8.
        mat: (2, 3) source -> destination pixels, y down (:func:`random_affine`).
        size: the output's side in pixels.
        cubic: bicubic, else bilinear interpolation.

    Returns:
        (size, size[, C]) uint8.
    """
    import cv2

    flags = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR
    return cv2.warpAffine(img, mat, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def augment_landmarks(lm_yup: np.ndarray, mat: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Move landmarks with their augmented crop.

    Args:
        lm_yup: (K, 2) crop landmarks in pixels, y up.
        mat: (2, 3) source -> destination pixels, y down (:func:`random_affine`).
        flip: the crop was mirrored: 68 points are reordered by :data:`LM68_MIRROR` (other K are not).
        size: the crop's side in pixels.

    Returns:
        (K, 2) float64 moved landmarks, y up.
    """
    down = flip_y(lm_yup, size)
    moved = down @ mat[:, :2].T + mat[:, 2]
    out = flip_y(moved, size)
    if flip:
        out = out[LM68_MIRROR] if out.shape[0] == 68 else out
    return out


# --------------------------------------------------------------------------- the dataset
class FaceTrainDataset(Dataset):
    """Items: dict(imgs (3,224,224) float32 0..1, lms (68,2) float32 crop pixels y up,
    msks (1,224,224) float32 0..1, im_paths str, aug_flag bool) - the original's keys.

    Args:
        entries: from :func:`read_list`. lm3d: (5, 3) standard landmarks (``load_lm3d``).
        augment: :class:`AugmentConfig` (``use_aug`` False for validation).
        align_lm: 'lm68' (align with the 68 landmarks' 5 points, the original) or 'lm5'.
        seed: base of the per-item random augmentation (item i of epoch e is reproducible).

    Raises:
        ValueError: ``align_lm`` is neither 'lm68' nor 'lm5'.
    """

    def __init__(self, entries: list[TrainEntry], lm3d: np.ndarray, augment: AugmentConfig = AugmentConfig(),
                 align_lm: str = "lm68", seed: int = 0):
        if align_lm not in ("lm68", "lm5"):
            raise ValueError(f"align_lm must be 'lm68' or 'lm5', got {align_lm!r}")
        self.entries, self.lm3d, self.augment, self.align_lm = entries, lm3d, augment, align_lm
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next items' augmentations for ``epoch`` (call before each epoch's loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, i: int, rng: random.Random | None = None) -> dict:
        """Item ``i``, aligned (and augmented when ``rng`` is given and ``augment.use_aug``).

        Args:
            i: the entry's index (0-based).
            rng: the augmentation's random source (None: no augmentation).

        Returns:
            The item dict of the class docstring (a mask of ones where the entry has none).

        Raises:
            DataError: a file cannot be loaded (broken since the list was checked) or the skin mask's
                size differs from the photo's.
            AlignmentError: the landmarks cannot be aligned.
        """
        e = self.entries[i]
        try:
            img = load_image(e.image)
            lm68 = flip_y(read_points(e.lm68, 68).astype(np.float64), img.size[1])
            mask = Image.open(e.mask).convert("L") if e.mask is not None else None
            if mask is not None and mask.size != img.size:
                raise DataError(f"skin mask {e.mask} is {mask.size[0]}x{mask.size[1]}, its photo "
                                f"{img.size[0]}x{img.size[1]}")
            ref = lm68 if self.align_lm == "lm68" else flip_y(read_points(e.lm5, 5).astype(np.float64), img.size[1])
        except DataError:
            raise
        except Exception as err:  # a file broken since the list was checked
            raise DataError(f"cannot load training face {e.image}: {err}") from None
        t, crop, _ = align_img(img, ref, self.lm3d)
        lm = t.image_to_crop(lm68, CROP)
        img_np = np.asarray(crop, dtype=np.uint8)
        msk_np = None
        if mask is not None:
            mask = mask.resize((t.w, t.h), resample=Image.Resampling.BICUBIC)
            msk_np = np.asarray(mask.crop((t.left, t.up, t.left + CROP, t.up + CROP)), dtype=np.uint8)
        aug = self.augment.use_aug and rng is not None
        if aug:
            mat, flip = random_affine(self.augment, CROP, rng)
            img_np = apply_affine(img_np, mat, CROP)
            lm = augment_landmarks(lm, mat, flip, CROP)
            if msk_np is not None:
                msk_np = apply_affine(msk_np, mat, CROP)
        if msk_np is None:
            msk = np.ones((1, CROP, CROP), np.float32)
        else:
            msk = (msk_np.astype(np.float32) / 255.0)[None]
        return {"imgs": torch.from_numpy(image_to_array(Image.fromarray(img_np))),
                "lms": torch.from_numpy(lm.astype(np.float32)),
                "msks": torch.from_numpy(msk), "im_paths": e.image, "aug_flag": aug}

    def __getitem__(self, i: int) -> dict:
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) if self.augment.use_aug else None
        return self.load(i, rng)
