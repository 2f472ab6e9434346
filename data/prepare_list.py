"""Build a training list from prepared photo folders: ``python -m data.prepare_list``.

    ./process_images.sh datasets/faces_a --landmarks68        # detections/ and landmarks/
    python -m data.prepare_list --data_root datasets --img_folder faces_a faces_b \\
        --out datalist/train/list.txt [--val_out datalist/val/list.txt --val_fraction 0.02]

Every photo of each folder (``util.image_io.list_images``) with a 68-point landmark file
``<folder>/landmarks/<stem>.txt`` becomes one line (see :mod:`data.train_dataset` for the format);
its 5-point detections ``<folder>/detections/<stem>.txt`` and skin mask ``<folder>/mask/<name>``
(the original's folder; optional) are listed when present. Each photo is decoded and each
landmark file parsed once here, so that training never meets a broken file. Photos left out are
reported with the reason. Exit code 0 when at least one face was listed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

from data.train_dataset import TrainEntry
from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR, DetectionFileError, detection_path, read_points
from util.image_io import ImageLoadError, list_images, load_image

MASK_DIR = "mask"


def scan(folder: str, recursive: bool = False, check_images: bool = True) -> tuple[list[TrainEntry], list[tuple[str, str]]]:
    """The training entries of one prepared folder.

    Args:
        folder: a folder of photos with ``landmarks/`` (and optionally ``detections/``, ``mask/``).
        recursive: also photos in sub-folders.
        check_images: decode every photo and leave out those that do not decode.

    Returns:
        (entries in listing order, [(photo path, reason it was left out)]): a photo is left out
        without a 68-point landmark file, with a malformed one, or (``check_images``) unreadable.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
    """
    entries, skipped = [], []
    for rel in list_images(folder, recursive):
        if rel.split(os.sep)[0] == MASK_DIR:  # the skin masks themselves
            continue
        image = os.path.join(folder, rel)
        lm68 = detection_path(folder, rel, subdir=LANDMARKS_DIR)
        if not os.path.isfile(lm68):
            skipped.append((image, f"no 68-point landmarks {lm68} (run ./process_images.sh {folder} --landmarks68)"))
            continue
        try:
            read_points(lm68, 68)
        except DetectionFileError as e:
            skipped.append((image, str(e)))
            continue
        if check_images:
            try:
                load_image(image)
            except ImageLoadError as e:
                skipped.append((image, f"unreadable photo: {e.reason}"))
                continue
        lm5 = detection_path(folder, rel, subdir=DETECTIONS_DIR)
        mask = os.path.join(folder, MASK_DIR, rel)
        entries.append(TrainEntry(image, lm68, lm5 if os.path.isfile(lm5) else None,
                                  mask if os.path.isfile(mask) else None))
    return entries, skipped


def write_list(path: str, entries: list[TrainEntry], root: str) -> None:
    """Write a training list: a ``#`` header line, then one :meth:`TrainEntry.to_line` per entry.

    Written to ``<path>.part`` and renamed, creating the folder where needed.

    Args:
        path: the list to write.
        entries: its faces, in order.
        root: paths are written relative to it ('' : as they are).

    Raises:
        OSError: the folder or file cannot be written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# image\tlandmarks68\tdetections\tskin_mask  (paths relative to --data_root; - = none)\n")
        for e in entries:
            f.write(e.to_line(root) + "\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m data.prepare_list`` (this module's docstring is its help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="./", help="folders are relative to it; list paths are written relative to it")
    p.add_argument("--img_folder", nargs="+", required=True, help="folders of prepared photos")
    p.add_argument("--out", default="datalist/train/list.txt", help="training list to write")
    p.add_argument("--val_out", default="", help="also write a validation list with --val_fraction of the faces")
    p.add_argument("--val_fraction", type=float, default=0.0, help="share of faces for --val_out (random, --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recursive", action="store_true", help="also list photos in sub-folders")
    p.add_argument("--no_check_images", action="store_true", help="do not decode every photo (faster)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m data.prepare_list``: scan the folders, write the list(s), print a summary.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 when at least one training face was listed, 1 when none, 2 when a folder
        is not a folder (said on stderr).
    """
    a = build_parser().parse_args(argv)
    entries, skipped = [], []
    for name in a.img_folder:
        folder = os.path.join(a.data_root, name)
        if not os.path.isdir(folder):
            print(f"error: {folder} is not a folder", file=sys.stderr)
            return 2
        e, s = scan(folder, a.recursive, not a.no_check_images)
        entries += e
        skipped += s
    val: list[TrainEntry] = []
    if a.val_out and a.val_fraction > 0 and entries:
        order = list(range(len(entries)))
        random.Random(a.seed).shuffle(order)
        n_val = max(1, int(round(a.val_fraction * len(entries))))
        val_idx = set(order[:n_val])
        val = [e for i, e in enumerate(entries) if i in val_idx]
        entries = [e for i, e in enumerate(entries) if i not in val_idx]
    if entries:
        write_list(a.out, entries, a.data_root)
    if val:
        write_list(a.val_out, val, a.data_root)
    with_mask = sum(e.mask is not None for e in entries + val)
    print(f"{len(entries)} training face(s) -> {a.out}" + (f", {len(val)} validation -> {a.val_out}" if val else "")
          + f"; {with_mask} with skin masks; {len(skipped)} photo(s) left out")
    for image, why in skipped:
        print(f"  left out {image}: {why}")
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main())
