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
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from util.checks import check_shape
from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR, file_stem, read_points, stem_detection_files
from util.image_io import decode_error_reason, list_images, load_image, read_plain_jpeg
from util.pil_resample import (PlanBatch, ResizeCropPlan, apply_plans, identity_plan, pad_regions, plan_resize_crop,
                               region_shape)
from util.landmarks import flip_y
from util.preprocess import (AlignTransform, align_params, crop_box, pil_vertical_first, resize_crop,
                             unit_float_table)

@dataclass(frozen=True)
class FaceEntry:
    """One face to reconstruct, as :func:`scan_folder` finds it.

    Attributes:
        image_path: the photo (``folder/rel_dir/photo.ext``).
        det_path: its 5-point detection file (photo pixels, y down).
        name: names its outputs (``photo`` or ``photo__face02``).
        rel_dir: sub-folder of the photo relative to the image folder ('' at top level, ``/``-separated).
        lm68_path: its 68-point landmarks (``landmarks/<name>.txt``) when asked for and present, else ''.
    """

    image_path: str
    det_path: str
    name: str
    rel_dir: str  # sub-folder of the photo relative to the image folder ('' at top level)
    lm68_path: str = ""  # its 68-point landmarks (landmarks/<name>.txt) when asked for and present


@dataclass(frozen=True)
class FaceMeta:
    """Who a batch's face is.

    Attributes:
        index: its index in the dataset (0-based).
        name: its outputs' stem.
        rel_dir: its sub-folder of the results ('' at top level).
        image_path: the photo.
        transform: photo -> crop pixels (:class:`util.preprocess.AlignTransform`); None by default
            (:func:`collate_faces` always sets it).
    """

    index: int
    name: str
    rel_dir: str
    image_path: str
    transform: AlignTransform | None = None


@dataclass(frozen=True)
class JpegParts:
    """JPEG files of a batch to decode where the batch goes (``--decode_on_device``).

    Attributes:
        data: (n_bytes,) uint8, the files one after another (a DataLoader worker hands each tensor
            over through a file descriptor of its own, so one tensor for all).
        sizes: each file's bytes.
        slots: each file's index in the batch (0-based).
        boxes: ((r0, r1), (c0, c1)) the photo rows and columns (end exclusive, row 0 at the top)
            each file's crop reads.
        shapes: (height, width) each must decode to (its header's, which the alignment used).
        region_shape: (R, C) of the batch's padded regions.
        cpu_regions: (K, R', C', 3) uint8 regions of the faces the workers decoded (None: none).
        cpu_slots: the batch indices of ``cpu_regions``' K faces.
    """

    data: torch.Tensor
    sizes: tuple[int, ...]
    slots: tuple[int, ...]
    boxes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    shapes: tuple[tuple[int, int], ...]
    region_shape: tuple[int, int]
    cpu_regions: torch.Tensor | None = None
    cpu_slots: tuple[int, ...] = ()

    def pin_memory(self) -> "JpegParts":
        """A copy with ``data`` and ``cpu_regions`` in pinned memory (the DataLoader calls it)."""
        return replace(self, data=self.data.pin_memory(),
                       cpu_regions=None if self.cpu_regions is None else self.cpu_regions.pin_memory())


@dataclass(frozen=True)
class FaceBatch:
    """A batch of B aligned faces, as :func:`collate_faces` makes it; never changed in place
    (:func:`batch_crops` and :func:`drop_faces` return new ones).

    Attributes:
        meta: B :class:`FaceMeta`, one per good face, in dataset order.
        failed: (name, reason) of the faces of this batch that could not be loaded.
        lm: (B, 5, 2) float32 detected landmarks, crop pixels, y up (None when B is 0).
        image: (B, 3, 224, 224) uint8 RGB crops (None when ``plans`` is given instead).
        plans: :class:`util.pil_resample.PlanBatch` of the crops to make on the device
            (``--resample_on_device``), else None.
        jpeg: :class:`JpegParts` to decode on the device first (``--decode_on_device``), else None.
        lm68: (B, 68, 2) float32 68 landmarks, crop pixels, y up, zeros for faces without
            (None when no face has them); has_lm68: (B,) bool, which faces have them.
    """

    meta: tuple[FaceMeta, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    lm: torch.Tensor | None = None
    image: torch.Tensor | None = None
    plans: PlanBatch | None = None
    jpeg: JpegParts | None = None
    lm68: torch.Tensor | None = None
    has_lm68: torch.Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {"B": len(self.meta)}
        for name, shape in (("lm", ("B", 5, 2)), ("image", ("B", 3, "S", "S")), ("lm68", ("B", 68, 2)),
                            ("has_lm68", ("B",))):
            x = getattr(self, name)
            if x is not None:
                check_shape(x, shape, name, sizes)

    def __len__(self) -> int:
        return len(self.meta)

    def pin_memory(self) -> "FaceBatch":
        """For the DataLoader's ``pin_memory`` (it calls this on custom batch types).

        Returns:
            A new batch whose tensors (and plans, JPEG parts) are in pinned memory.
        """
        def pin(x):
            return None if x is None else x.pin_memory()

        return replace(self, lm=pin(self.lm), image=pin(self.image), plans=pin(self.plans), jpeg=pin(self.jpeg),
                       lm68=pin(self.lm68), has_lm68=pin(self.has_lm68))


def scan_folder(folder: str, recursive: bool = False, lm68: bool = False, share: tuple[int, int] = (0, 1)
                ) -> tuple[list[FaceEntry], list[str]]:
    """The faces to reconstruct in a folder of photos and their detections.

    Photos are listed by the same :func:`util.image_io.list_images` the detector uses. Photos
    sharing a stem (``a.jpg``, ``a.png``) share ``detections/a.txt``: like process_images.py, only
    the first in listing order uses it; the others are skipped, with why.

    Args:
        folder: the photo folder (detections in ``folder/detections/<rel_dir>/<stem>[__faceNN].txt``).
        recursive: also photos in sub-folders.
        lm68: give each face the path of its 68-point landmarks (``landmarks/<name>.txt``, as
            ``process_images.sh --landmarks68`` writes them) where that file exists.
        share: (rank, world): only every world-th photo from the rank-th (in listing order), as one
            of ``world`` processes sharing the folder takes them; the others' detection files are
            not even looked up.

    Returns:
        (faces to reconstruct as :class:`FaceEntry`, in listing order; photos skipped, as paths,
        with the reason in parentheses for a photo whose stem is taken).

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
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
    """Align one face on the CPU, as the original does (PIL resize and crop).

    Args:
        entry: the face.
        lm3d: (5, 3) standard 3D landmarks (:func:`util.preprocess.load_lm3d`).

    Returns:
        ((3, 224, 224) uint8 RGB crop, (5, 2) float32 crop landmarks in pixels, y up, the
        :class:`util.preprocess.AlignTransform` photo -> crop).

    Raises:
        ImageLoadError: the photo cannot be read (``reason`` says why).
        DetectionFileError: the detection file is missing, unreadable or malformed.
        AlignmentError: the points cannot be aligned (:func:`util.preprocess.check_landmarks`).
    """
    img, transform, lm_crop = _photo_alignment(entry, lm3d)
    crop = resize_crop(img, (transform.w, transform.h), crop_box(transform))
    return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1).copy(), lm_crop, transform


def load_aligned_region(entry: FaceEntry, lm3d: np.ndarray
                        ) -> tuple[np.ndarray, ResizeCropPlan, np.ndarray, AlignTransform]:
    """Photo + detection -> the part of the photo the crop reads, for :func:`batch_crops`.

    Args:
        entry: the face.
        lm3d: (5, 3) standard 3D landmarks.

    Returns:
        ((R, C, 3) uint8 RGB region of the photo, its :class:`util.pil_resample.ResizeCropPlan`,
        (5, 2) float32 crop landmarks in pixels, y up, the AlignTransform). Where the installed
        Pillow's pass order is not known, the crop itself ((224, 224, 3), made here) and the
        identity plan.

    Raises:
        ImageLoadError: the photo cannot be read (``reason`` says why).
        DetectionFileError: the detection file is missing, unreadable or malformed.
        AlignmentError: the points cannot be aligned (:func:`util.preprocess.check_landmarks`).
    """
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
    """Photo + detection -> the JPEG file's bytes, for :func:`batch_crops` to decode and resample
    on its device, without decoding here.

    Args:
        entry: the face.
        lm3d: (5, 3) standard 3D landmarks.

    Returns:
        ((n,) uint8 bytes of the JPEG file, the plan of its crop, (5, 2) float32 crop landmarks in
        pixels, y up, the AlignTransform); None where :func:`load_aligned_region` must do it (not a
        plain JPEG, see :func:`util.image_io.read_plain_jpeg`, or Pillow's pass order unknown).

    Raises:
        ImageLoadError: the photo cannot be read (``reason`` says why).
        DetectionFileError: the detection file is missing, unreadable or malformed.
        AlignmentError: the points cannot be aligned (:func:`util.preprocess.check_landmarks`).
    """
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


def _collate_jpegs(good: list[dict]) -> tuple[PlanBatch, "JpegParts"]:
    """Batch items of which some carry JPEG files to decode where the batch goes: their plans
    with a placeholder for the regions (which :func:`batch_crops` makes there), and the files."""
    plans = [it["plan"] for it in good]
    slots = [i for i, it in enumerate(good) if "jpeg" in it]
    others = [i for i, it in enumerate(good) if "jpeg" not in it]
    jpeg = JpegParts(data=torch.from_numpy(np.concatenate([good[i]["jpeg"] for i in slots])),
                     sizes=tuple(len(good[i]["jpeg"]) for i in slots), slots=tuple(slots),
                     boxes=tuple((plans[i].rows, plans[i].cols) for i in slots),
                     shapes=tuple((good[i]["transform"].h0, good[i]["transform"].w0) for i in slots),
                     region_shape=tuple(region_shape(plans)),
                     cpu_regions=torch.from_numpy(pad_regions([good[i]["region"] for i in others])) if others else None,
                     cpu_slots=tuple(others))
    return PlanBatch.collate(None, plans), jpeg


def batch_crops(batch: FaceBatch, device: torch.device) -> tuple[FaceBatch, torch.Tensor]:
    """A batch's aligned crops on ``device``.

    Args:
        batch: a collated batch with at least one face: its ``image``, or its ``plans`` (see
            :func:`load_aligned_region`) and maybe ``jpeg`` files (:func:`load_aligned_jpeg`),
            which are decoded on ``device`` first.
        device: where the crops go.

    Returns:
        (the batch, (B', 3, 224, 224) uint8 crops on ``device``). With ``image`` the batch is
        ``batch`` itself; with plans it is a new batch whose ``image`` is the crops (the result
        pictures take their left panel from there), without ``plans`` and ``jpeg``, and whose
        faces whose JPEG would not decode moved to ``failed`` (:func:`drop_faces`): B' <= B.
    """
    if batch.image is not None:
        return batch, batch.image.to(device, non_blocking=True)
    plans = batch.plans.to(device, non_blocking=True)
    jpeg = batch.jpeg
    if jpeg is not None:
        regions = torch.empty((len(batch.meta), *jpeg.region_shape, 3), dtype=torch.uint8, device=device)
        if jpeg.cpu_regions is not None:  # photos the workers decoded
            cpu = jpeg.cpu_regions.to(device, non_blocking=True)
            regions[list(jpeg.cpu_slots), :cpu.shape[1], :cpu.shape[2]] = cpu
        datas = list(torch.split(jpeg.data, list(jpeg.sizes)))
        errors = decode_into(regions, datas, list(jpeg.slots), list(jpeg.boxes), list(jpeg.shapes), device)
        plans = plans.with_regions(regions)
        if errors:
            batch, keep = drop_faces(batch, errors)
            plans = plans.select(keep)
    crops = apply_plans(plans)
    return replace(batch, image=crops, plans=None, jpeg=None), crops


RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB
_image_ops_loaded = False  # torchvision's image operators registered in this process
_image_ops_lock = threading.Lock()  # the warm-up and the prefetch threads may both ask first


def torchvision_jpeg_decoder():
    """The JPEG decoder of ``--decode_on_device``, by torchvision's image operators (loaded once).

    Returns:
        ``decode(datas, device)``: a list of (n,) uint8 tensors of JPEG files -> a list of (3, H, W)
        uint8 RGB images on ``device`` (nvJPEG on CUDA; one bad file makes the call raise).

    Raises:
        ImportError: torchvision is missing or built for another torch; the message says what to
            install.
    """
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
    and kernels on CUDA), so that the first batch does not wait for it.

    Args:
        device: where batches will be decoded.

    Raises:
        ImportError: as :func:`torchvision_jpeg_decoder`.
    """
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
    compiler stack (seconds of start-up). False where that cannot be done; the caller then
    imports torchvision.io."""
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
    """Decode JPEG files on ``device`` into ``regions``, in place. All in one batched call; where
    that fails, one at a time.

    Args:
        regions: (B, R, C, 3) uint8 on ``device``, written in place.
        datas: (n_k,) uint8 tensors, the JPEG files.
        slots: for each file, its index in ``regions``.
        boxes: for each file, ((r0, r1), (c0, c1)) the decoded image's rows and columns (end
            exclusive, row 0 at the top) that go to ``regions[slot, :r1-r0, :c1-c0]``.
        shapes: for each file, the (height, width) it must decode to (its header's, which the
            alignment used).
        device: where to decode (nvJPEG on CUDA).

    Returns:
        {slot: reason} of the files that would not decode or decoded to another size (their
        regions are left as they were).

    Raises:
        ImportError: as :func:`torchvision_jpeg_decoder`.
    """
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


def drop_faces(batch: FaceBatch, errors: dict[int, str]) -> tuple[FaceBatch, torch.Tensor]:
    """Move faces out of a batch into its ``failed``.

    Args:
        batch: a collated batch of B faces.
        errors: index in the batch -> reason, of the faces to drop.

    Returns:
        (the new batch, without those faces in ``meta``, ``lm``, ``image``, ``lm68``, ``has_lm68``, with
        ``(name, "<image_path>: <reason>")`` added to ``failed``; the (B,) bool CPU mask of the
        faces kept, for the batch's ``plans``).
    """
    keep = torch.ones(len(batch.meta), dtype=torch.bool)
    keep[list(errors)] = False
    failed = tuple((batch.meta[i].name, f"{batch.meta[i].image_path}: {reason}")
                   for i, reason in sorted(errors.items()))

    def kept(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[keep.to(t.device)]

    return replace(batch, meta=tuple(m for m, k in zip(batch.meta, keep.tolist()) if k), failed=batch.failed + failed,
                   lm=kept(batch.lm), image=kept(batch.image), lm68=kept(batch.lm68),
                   has_lm68=kept(batch.has_lm68)), keep


_FLOAT_TABLES: dict[torch.device, torch.Tensor] = {}


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """Crops as the network's input, with exactly the values of :func:`util.preprocess.image_to_array`
    (the original's float64 ``/ 255.`` then float32): a 256-entry table lookup, so no device
    arithmetic can round differently.

    Args:
        images: (B, 3, H, W) uint8 crops (any shape of uint8 works).

    Returns:
        The same shape, float32 in 0..1, on ``images``' device.
    """
    table = _FLOAT_TABLES.get(images.device)
    if table is None:
        table = _FLOAT_TABLES[images.device] = torch.from_numpy(unit_float_table()).to(images.device)
    return table[images.to(torch.int64)]


def load_lm68(path: str, transform: AlignTransform) -> np.ndarray:
    """Read a face's 68 landmarks and move them into its crop.

    Args:
        path: a 68-point file (``x y`` lines, photo pixels, y down).
        transform: the face's alignment (photo -> crop).

    Returns:
        (68, 2) float32 crop pixels, y up.

    Raises:
        DetectionFileError: the file is missing, unreadable or not 68 lines of ``x y``.
    """
    return transform.image_to_crop(flip_y(read_points(path, 68).astype(np.float64), transform.h0)).astype(np.float32)


class AlignedFaces(Dataset):
    """The faces of :func:`scan_folder` as aligned crops; loading never raises.

    Items: dict(index, name, rel_dir, image_path, image (3,224,224) uint8, lm (5,2) float32
    crop pixels y up, lm68 (68,2) float32 crop pixels y up or None (entries without
    ``lm68_path``), transform AlignTransform | None, error str | None). With
    ``resample_on_device``, 'region' and 'plan' (:func:`load_aligned_region`) instead of 'image';
    with ``decode_on_device`` too, 'jpeg' and 'plan' (:func:`load_aligned_jpeg`) for plain JPEGs.
    An item that failed to load has ``error`` set (the exception's text); :func:`collate_faces`
    then moves it to ``failed``.

    Args:
        entries: the faces.
        lm3d: (5, 3) standard 3D landmarks.
        resample_on_device: hand over photo regions and plans instead of crops.
        decode_on_device: hand over plain JPEG files undecoded (implies ``resample_on_device``).
    """

    def __init__(self, entries: list[FaceEntry], lm3d: np.ndarray, resample_on_device: bool = False,
                 decode_on_device: bool = False):
        self.entries, self.lm3d = entries, lm3d
        self.resample_on_device, self.decode_on_device = resample_on_device, decode_on_device

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        return load_face(i, self.entries[i], self.lm3d, self.resample_on_device, self.decode_on_device)


def load_face(index: int, e: FaceEntry, lm3d: np.ndarray, resample_on_device: bool = False,
              decode_on_device: bool = False) -> dict:
    """The :class:`AlignedFaces` item of face ``e`` (``index``: its place in the run); never raises.
    ``decode_on_device`` implies ``resample_on_device`` (here, and only here)."""
    item = dict(index=index, name=e.name, rel_dir=e.rel_dir, image_path=e.image_path, transform=None, error=None,
                lm68=None)
    try:
        jpeg = load_aligned_jpeg(e, lm3d) if decode_on_device else None
        if jpeg is not None:
            item["jpeg"], item["plan"], item["lm"], item["transform"] = jpeg
        elif resample_on_device or decode_on_device:
            item["region"], item["plan"], item["lm"], item["transform"] = load_aligned_region(e, lm3d)
        else:
            item["image"], item["lm"], item["transform"] = load_aligned(e, lm3d)
        if e.lm68_path:
            item["lm68"] = load_lm68(e.lm68_path, item["transform"])
    except Exception as err:  # reported per face by the caller; never stops the run
        item["error"] = str(err)
    return item


class StreamedFaces(IterableDataset):
    """Faces that arrive while the run goes on (run_pipeline: detection still running), as
    :func:`collate_faces` batches.

    Each iterator (one per DataLoader worker, or the main process's) takes lists of (index,
    :class:`FaceEntry`) from ``queue`` (a multiprocessing queue shared by all of them), until it
    takes None; each list becomes one batch, of :class:`AlignedFaces` items.

    Args:
        queue: where the batches of faces come from (:class:`pipeline.stream.FaceFeed`).
        lm3d, resample_on_device, decode_on_device: as :class:`AlignedFaces`'.
    """

    def __init__(self, queue, lm3d: np.ndarray, resample_on_device: bool = False, decode_on_device: bool = False):
        self.queue, self.lm3d = queue, lm3d
        self.resample_on_device, self.decode_on_device = resample_on_device, decode_on_device

    def __iter__(self):
        while True:
            faces = self.queue.get()
            if faces is None:
                return
            yield collate_faces([load_face(i, e, self.lm3d, self.resample_on_device, self.decode_on_device)
                                 for i, e in faces])


def collate_faces(items: list[dict]) -> FaceBatch:
    """Batch :class:`AlignedFaces` items (the DataLoader's ``collate_fn``).

    Args:
        items: the dicts of :meth:`AlignedFaces.__getitem__`, of one kind (crops, regions or JPEGs
            mixed with regions).

    Returns:
        A :class:`FaceBatch`: the good ones' crops (``image``), or their regions and plans
        (``plans``, with ``jpeg`` where some are JPEGs to decode on the device), landmarks and 68
        landmarks where any has them; the failed ones in ``failed`` as (name, reason). With no good
        item, only ``meta`` (empty) and ``failed``.
    """
    good = [it for it in items if it["error"] is None]
    failed = tuple((it["name"], it["error"]) for it in items if it["error"] is not None)
    meta = tuple(FaceMeta(it["index"], it["name"], it["rel_dir"], it["image_path"], it["transform"]) for it in good)
    if not good:
        return FaceBatch(meta=meta, failed=failed)
    image = plans = jpeg = lm68 = has_lm68 = None
    if any("jpeg" in it for it in good):
        plans, jpeg = _collate_jpegs(good)
    elif "plan" in good[0]:
        plans = PlanBatch.collate([it["region"] for it in good], [it["plan"] for it in good])
    else:
        image = torch.from_numpy(np.stack([it["image"] for it in good]))
    if any(it["lm68"] is not None for it in good):
        has_lm68 = torch.tensor([it["lm68"] is not None for it in good])
        lm68 = torch.from_numpy(np.stack([np.zeros((68, 2), np.float32) if it["lm68"] is None else it["lm68"]
                                          for it in good]))
    return FaceBatch(meta=meta, failed=failed, lm=torch.from_numpy(np.stack([it["lm"] for it in good])), image=image,
                     plans=plans, jpeg=jpeg, lm68=lm68, has_lm68=has_lm68)
