"""A folder of photos with their 5-point detections, aligned to the regressor's 224x224 crop.

One item per detected face (``photo.txt``, ``photo__face02.txt``, ...). Photos without a
detection file are reported by :func:`scan_folder`, not silently dropped. An item that fails to
load (corrupt photo, malformed detection file) comes back with ``error`` set instead of raising, so
one bad file never stops a run.

Crops travel as uint8 (a quarter of float32's bytes through the DataLoader's shared memory and
the host-to-device copy); :func:`images_to_float` converts a batch on its device to exactly the
float32 values of the original's ``np.array(img) / 255.``.

With ``resample_on_device`` the workers only decode and fit the alignment: each item carries the
part of the photo the crop reads and the plan of PIL's resize (:mod:`util.pil_resample`), and
:func:`batch_crops` makes the crops where the batch goes (the same pixels, on the GPU). With
``decode_on_device`` as well, the workers do not even decode plain JPEGs: they read the file's
bytes and its size, and :func:`batch_crops` decodes them there (nvJPEG on a GPU, whose pixels are
not libjpeg's: it trades PIL's exact pixels for the host's CPU time; other photos are decoded as
before).
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR, file_stem, read_points, stem_detection_files
from util.image_io import decode_error_reason, list_images, load_image, read_plain_jpeg
from util.pil_resample import (PlanBatch, ResizeCropPlan, apply_plans, identity_plan, pad_regions, plan_resize_crop,
                               region_shape)
from util.landmarks import flip_y
from util.preprocess import (AlignTransform, align_params, crop_box, pil_vertical_first, resize_crop,
                             unit_float_table)

@dataclass(frozen=True)
class FaceEntry:
    """One face to reconstruct: ``name`` names its outputs (``photo`` or ``photo__face02``)."""

    image_path: str
    det_path: str
    name: str
    rel_dir: str  # sub-folder of the photo relative to the image folder ('' at top level)
    lm68_path: str = ""  # its 68-point landmarks (landmarks/<name>.txt) when asked for and present


def scan_folder(folder: str, recursive: bool = False, lm68: bool = False, share: tuple[int, int] = (0, 1)
                ) -> tuple[list[FaceEntry], list[str]]:
    """Return (faces to reconstruct, photos skipped for lack of a detection file), photos listed
    by the same :func:`util.image_io.list_images` the detector uses. With ``lm68``, each face
    also gets the path of its 68-point landmarks (``landmarks/<name>.txt``, as
    ``process_images.sh --landmarks68`` writes them) where that file exists.

    ``share`` (rank, world): only every world-th photo from the rank-th (in listing order), as one
    of ``world`` processes sharing the folder takes them; the others' detection files are not
    even looked up.

    Photos sharing a stem (``a.jpg``, ``a.png``) share ``detections/a.txt``: like
    process_images.py, only the first in listing order uses it; the others are skipped, with why.
    """
    with _gc_paused():  # a run's scan makes ~10 objects a photo: the collector's passes cost a third of it
        return _scan(folder, recursive, lm68, share)


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _scan(folder: str, recursive: bool, lm68: bool, share: tuple[int, int]) -> tuple[list[FaceEntry], list[str]]:
    rank, world = share
    entries, missing = [], []
    owner: dict[tuple[str, str], str] = {}
    index: dict = {}  # one listing per detections (and landmarks) folder
    prefix = os.path.join(folder, "")  # prefix + rel == os.path.join(folder, rel)
    for i, rel in enumerate(list_images(folder, recursive)):
        rel_dir, _, name = rel.rpartition("/")  # list_images' paths are '/'-separated everywhere
        key = (rel_dir, file_stem(name))
        mine = i % world == rank
        if key in owner:
            if mine:
                missing.append(f"{prefix + rel} (same name as {owner[key]}, whose detection file it would reuse)")
            continue
        owner[key] = name
        if not mine:
            continue
        faces = stem_detection_files(folder, rel_dir, key[1], DETECTIONS_DIR, index)
        path = prefix + rel
        if not faces:
            missing.append(path)
            continue
        lm_files = dict(stem_detection_files(folder, rel_dir, key[1], LANDMARKS_DIR, index)) if lm68 else {}
        entries += [FaceEntry(path, det, face, rel_dir, lm_files.get(face, "")) for face, det in faces]
    return entries, missing


def _photo_alignment(entry: FaceEntry, lm3d: np.ndarray) -> tuple:
    """Photo + detection -> (the photo, its AlignTransform, (5,2) float32 crop landmarks y up)."""
    img = load_image(entry.image_path)
    return (img,) + _alignment(entry, img.size, lm3d)


def _alignment(entry: FaceEntry, size: tuple[int, int], lm3d: np.ndarray) -> tuple[AlignTransform, np.ndarray]:
    """Detection of a (width, height) photo -> (its AlignTransform, (5,2) float32 crop landmarks y up)."""
    transform, lm_crop = align_params(size, flip_y(read_points(entry.det_path, 5), size[1]), lm3d)
    return transform, lm_crop.astype(np.float32)


def load_aligned(entry: FaceEntry, lm3d: np.ndarray) -> tuple[np.ndarray, np.ndarray, AlignTransform]:
    """Photo + detection -> ((3,224,224) uint8 crop, (5,2) crop landmarks y up, transform)."""
    img, transform, lm_crop = _photo_alignment(entry, lm3d)
    crop = resize_crop(img, (transform.w, transform.h), crop_box(transform))
    return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1).copy(), lm_crop, transform


def load_aligned_region(entry: FaceEntry, lm3d: np.ndarray
                        ) -> tuple[np.ndarray, ResizeCropPlan, np.ndarray, AlignTransform]:
    """Photo + detection -> ((R, C, 3) uint8 part of the photo the crop reads, its plan, (5,2)
    crop landmarks y up, transform) for :func:`batch_crops`. Where the installed Pillow's pass
    order is not known, the crop itself ((224, 224, 3), made here) and the identity plan."""
    img, transform, lm_crop = _photo_alignment(entry, lm3d)
    size, box = (transform.w, transform.h), crop_box(transform)
    order = pil_vertical_first(*img.size, *size)
    if order is None:
        crop = np.array(resize_crop(img, size, box), dtype=np.uint8)
        return crop, identity_plan(crop.shape[1], crop.shape[0]), lm_crop, transform
    plan = plan_resize_crop(img.size, size, box, order)
    (r0, r1), (c0, c1) = plan.rows, plan.cols
    region = np.array(img.crop((c0, r0, c1, r1)), dtype=np.uint8)  # only the region is copied (writable)
    return region, plan, lm_crop, transform


def load_aligned_jpeg(entry: FaceEntry, lm3d: np.ndarray
                      ) -> tuple[np.ndarray, ResizeCropPlan, np.ndarray, AlignTransform] | None:
    """Photo + detection -> ((n,) uint8 bytes of the JPEG file, the plan of its crop, (5,2) crop
    landmarks y up, transform) for :func:`batch_crops` to decode and resample on its device,
    without decoding here; None where :func:`load_aligned_region` must do it (not a plain JPEG,
    see :func:`util.image_io.read_plain_jpeg`, or Pillow's pass order unknown)."""
    found = read_plain_jpeg(entry.image_path)
    if found is None:
        return None
    data, img_size = found
    transform, lm_crop = _alignment(entry, img_size, lm3d)
    size, box = (transform.w, transform.h), crop_box(transform)
    order = pil_vertical_first(*img_size, *size)
    if order is None:
        return None
    return data, plan_resize_crop(img_size, size, box, order), lm_crop, transform


def _collate_jpegs(batch: dict, good: list[dict]) -> None:
    """Batch items of which some carry JPEG files to decode where the batch goes: 'plans' with a
    placeholder for the regions, which :func:`batch_crops` makes there ('region_shape'); 'jpeg'
    (the files' bytes, one after another: a DataLoader worker hands each tensor over through its
    own file descriptor, a few hundred microseconds of the main process each), 'jpeg_sizes',
    'jpeg_slots' (their places in the batch), 'jpeg_boxes' ((rows, cols) each reads); the others'
    regions in 'cpu_regions' with their 'cpu_slots'."""
    plans = [it["plan"] for it in good]
    slots = [i for i, it in enumerate(good) if "jpeg" in it]
    others = [i for i, it in enumerate(good) if "jpeg" not in it]
    batch["plans"], batch["region_shape"] = PlanBatch.collate(None, plans), region_shape(plans)
    batch["jpeg"] = torch.from_numpy(np.concatenate([good[i]["jpeg"] for i in slots]))
    batch["jpeg_sizes"] = [len(good[i]["jpeg"]) for i in slots]
    batch["jpeg_slots"], batch["jpeg_boxes"] = slots, [(plans[i].rows, plans[i].cols) for i in slots]
    batch["jpeg_shapes"] = [(good[i]["transform"].h0, good[i]["transform"].w0) for i in slots]
    if others:
        batch["cpu_regions"] = torch.from_numpy(pad_regions([good[i]["region"] for i in others]))
        batch["cpu_slots"] = others


def batch_crops(batch: dict, device: torch.device) -> torch.Tensor:
    """A collated batch's (B, 3, 224, 224) uint8 crops on ``device``: its 'image', or made there
    from its 'plans' (a :class:`util.pil_resample.PlanBatch`; see :func:`load_aligned_region`),
    which then become the batch's 'image' (the pictures take their left panel from there).

    Its 'jpeg' photos (:func:`load_aligned_jpeg`) are decoded on ``device`` first; one that does
    not decode leaves the batch (:func:`drop_faces`) for its 'failed', with the reason."""
    if "image" in batch:
        return batch["image"].to(device, non_blocking=True)
    plans = batch["plans"].to(device, non_blocking=True)
    if "jpeg" in batch:
        regions = torch.empty((len(batch["meta"]), *batch.pop("region_shape"), 3), dtype=torch.uint8, device=device)
        if "cpu_regions" in batch:  # photos the workers decoded
            cpu = batch.pop("cpu_regions").to(device, non_blocking=True)
            regions[batch.pop("cpu_slots"), :cpu.shape[1], :cpu.shape[2]] = cpu
        datas = list(torch.split(batch.pop("jpeg"), batch.pop("jpeg_sizes")))
        errors = decode_into(regions, datas, batch.pop("jpeg_slots"), batch.pop("jpeg_boxes"),
                             batch.pop("jpeg_shapes"), device)
        plans = plans.with_regions(regions)
        if errors:
            plans = plans.select(drop_faces(batch, errors))
    batch["image"] = apply_plans(plans)
    return batch["image"]


RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB
_image_ops_loaded = False  # torchvision's image operators registered in this process
_image_ops_lock = threading.Lock()  # the warm-up and the prefetch threads may both ask first


def torchvision_jpeg_decoder():
    """``decode(datas, device)``: (n,) uint8 tensors of JPEG files -> (3, H, W) uint8 RGB images on
    ``device`` (nvJPEG on CUDA), by torchvision's image operators; raises ImportError that says
    what to install where torchvision is missing."""
    global _image_ops_loaded
    with _image_ops_lock:
        if not _image_ops_loaded:
            if not _load_torchvision_image_ops():
                try:
                    import torchvision.io  # noqa: F401 - registers the operators
                except Exception as e:  # noqa: BLE001 - absent, or built for another torch
                    raise ImportError(f"--decode_on_device needs torchvision, the release built for torch "
                                      f"{torch.__version__} (pip install torchvision; see pytorch.org for the "
                                      f"pairs): {e}") from None
            _image_ops_loaded = True
    return _decode_jpegs


def warm_up_decoder(device: torch.device) -> None:
    """Decode a small JPEG on ``device``: the first call readies the decoder (nvJPEG's handles
    and kernels on CUDA), so that the first batch does not wait for it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, "JPEG")
    torchvision_jpeg_decoder()([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":
        return torch.ops.image.decode_jpegs_cuda(datas, RGB_MODE, device)
    return [torch.ops.image.decode_jpeg(d, RGB_MODE, False) for d in datas]


def _load_torchvision_image_ops() -> bool:
    """Load torchvision's compiled image library alone (its operators, torch.ops.image), without
    importing the torchvision package, whose ``__init__`` imports its models, datasets and torch's
    compiler stack (about 5 s of start-up where nothing is byte-compiled). False where that cannot
    be done; the caller then imports torchvision.io."""
    import glob
    import importlib.util

    try:
        spec = importlib.util.find_spec("torchvision")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        libs = [p for d in folders for p in glob.glob(os.path.join(d, "image.*")) if p.endswith((".so", ".pyd"))]
        if not libs:
            return False
        torch.ops.load_library(libs[0])
        args = [a.name for a in torch.ops.image.decode_jpegs_cuda.default._schema.arguments]
        return len(args) == 3 and hasattr(torch.ops.image, "decode_jpeg")  # (encoded, mode, device)
    except Exception:  # noqa: BLE001 - another layout or release: the public import decides
        return False


def decode_into(regions: torch.Tensor, datas: list[torch.Tensor], slots: list[int], boxes: list[tuple],
                shapes: list[tuple[int, int]], device) -> dict[int, str]:
    """Decode JPEG files on ``device`` into ``regions`` (B, R, C, 3) uint8 there: ``datas[k]``'s
    rows x cols ``boxes[k]`` go to ``regions[slots[k]]``; it must decode to (height, width)
    ``shapes[k]`` (its header's, which the alignment used). All in one batched call; where that
    fails, one at a time. Returns {slot: reason} of the files that would not decode."""
    decode = torchvision_jpeg_decoder()
    try:
        images = decode(datas, device)
    except Exception:  # noqa: BLE001 - one bad file fails the batch: find it
        images = []
        for data in datas:
            try:
                images.append(decode([data], device)[0])
            except Exception as e:  # noqa: BLE001
                images.append(e)
    errors = {}
    for img, slot, ((r0, r1), (c0, c1)), shape in zip(images, slots, boxes, shapes):
        if isinstance(img, BaseException):
            errors[slot] = f"{decode_error_reason(img)} ({img})"
            continue
        if tuple(img.shape) != (3, *shape):
            errors[slot] = f"corrupt (decoded to {tuple(img.shape)}, the header says 3 x {shape[0]} x {shape[1]})"
            continue
        regions[slot, :r1 - r0, :c1 - c0] = img[:, r0:r1, c0:c1].permute(1, 2, 0)
    return errors


def drop_faces(batch: dict, errors: dict[int, str]) -> torch.Tensor:
    """Move the faces at ``errors``' slots (index in the batch -> reason) from a collated batch to
    its 'failed'; returns the (B,) bool mask of those kept, for the batch's other tensors."""
    keep = torch.ones(len(batch["meta"]), dtype=torch.bool)
    keep[list(errors)] = False
    for slot, reason in sorted(errors.items()):
        m = batch["meta"][slot]
        batch["failed"].append(dict(m, error=f"{m['image_path']}: {reason}"))
    batch["meta"] = [m for m, k in zip(batch["meta"], keep.tolist()) if k]
    for key in ("lm", "lm68", "has_lm68"):
        if key in batch:
            batch[key] = batch[key][keep.to(batch[key].device)]
    return keep


_FLOAT_TABLES: dict[torch.device, torch.Tensor] = {}


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 crops -> float32 in 0..1 on their device, with exactly the values of
    :func:`util.preprocess.image_to_array` (the original's float64 ``/ 255.`` then float32): a
    256-entry table lookup, so no device arithmetic can round differently."""
    table = _FLOAT_TABLES.get(images.device)
    if table is None:
        table = _FLOAT_TABLES[images.device] = torch.from_numpy(unit_float_table()).to(images.device)
    return table[images.to(torch.int64)]


def load_lm68(path: str, transform: AlignTransform) -> np.ndarray:
    """A 68-landmark file (photo pixels, y down) -> (68, 2) float32 crop pixels, y up."""
    return transform.image_to_crop(flip_y(read_points(path, 68).astype(np.float64), transform.h0)).astype(np.float32)


class AlignedFaces(Dataset):
    """Items: dict(index, name, rel_dir, image_path, image (3,224,224) uint8, lm (5,2) float32
    crop pixels y up, lm68 (68,2) float32 crop pixels y up or None (entries without
    ``lm68_path``), transform AlignTransform | None, error str | None). With
    ``resample_on_device``, 'region' and 'plan' (:func:`load_aligned_region`) instead of 'image';
    with ``decode_on_device`` too, 'jpeg' and 'plan' (:func:`load_aligned_jpeg`) for plain JPEGs."""

    def __init__(self, entries: list[FaceEntry], lm3d: np.ndarray, resample_on_device: bool = False,
                 decode_on_device: bool = False):
        self.entries, self.lm3d = entries, lm3d
        self.resample_on_device, self.decode_on_device = resample_on_device or decode_on_device, decode_on_device

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        item = dict(index=i, name=e.name, rel_dir=e.rel_dir, image_path=e.image_path, transform=None, error=None,
                    lm68=None)
        try:
            jpeg = load_aligned_jpeg(e, self.lm3d) if self.decode_on_device else None
            if jpeg is not None:
                item["jpeg"], item["plan"], item["lm"], item["transform"] = jpeg
            elif self.resample_on_device:
                item["region"], item["plan"], item["lm"], item["transform"] = load_aligned_region(e, self.lm3d)
            else:
                item["image"], item["lm"], item["transform"] = load_aligned(e, self.lm3d)
            if e.lm68_path:
                item["lm68"] = load_lm68(e.lm68_path, item["transform"])
        except Exception as err:  # reported per face by the caller; never stops the run
            item["error"] = str(err)
        return item


def collate_faces(items: list[dict]) -> dict:
    """Batch the good items (tensors 'image' (B,3,H,W) uint8 or 'plans', a PlanBatch of their
    regions and plans (see :func:`_collate_jpegs` where some are JPEGs to decode on the device);
    'lm' (B,5,2); where any item has 68 landmarks 'lm68' (B,68,2) with 'has_lm68' (B,) bool,
    zeros for those without); keep failed ones in 'failed'."""
    good = [it for it in items if it["error"] is None]
    batch = {"failed": [it for it in items if it["error"] is not None],
             "meta": [{k: it[k] for k in ("index", "name", "rel_dir", "image_path", "transform")} for it in good]}
    if good:
        if any("jpeg" in it for it in good):
            _collate_jpegs(batch, good)
        elif "plan" in good[0]:
            batch["plans"] = PlanBatch.collate([it["region"] for it in good], [it["plan"] for it in good])
        else:
            batch["image"] = torch.from_numpy(np.stack([it["image"] for it in good]))
        batch["lm"] = torch.from_numpy(np.stack([it["lm"] for it in good]))
        if any(it["lm68"] is not None for it in good):
            batch["has_lm68"] = torch.tensor([it["lm68"] is not None for it in good])
            batch["lm68"] = torch.from_numpy(np.stack([np.zeros((68, 2), np.float32) if it["lm68"] is None
                                                       else it["lm68"] for it in good]))
    return batch
