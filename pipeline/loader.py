"""The load stage: a DataLoader of aligned face crops over a run's entries."""
from __future__ import annotations

import torch

from pipeline.runtime import SetupError
from pipeline.settings import LoaderSpec
from pipeline.workers import loader_worker_init, loader_workers
from util.assets import MissingAssetError


def face_loader(spec: LoaderSpec, bfm_folder: str, entries: list, device: torch.device, world: int = 1,
                batch_size: int | None = None) -> torch.utils.data.DataLoader:
    """The DataLoader of a run over ``entries`` (this rank's share).

    Args:
        spec: batch size, worker count and where the crops are made.
        bfm_folder: the face model's folder (its 3D landmarks align the photos).
        entries: the :class:`data.image_folder.FaceEntry` list to load, in order.
        device: the run's device; batches are pinned for CUDA.
        world: ranks sharing the host's cores (:func:`pipeline.workers.loader_workers`).
        batch_size: overrides ``spec``'s (None: ``spec.batch_size_on(device)``).

    Returns:
        a DataLoader of :func:`data.image_folder.collate_faces` batches (aligned (B, 3, 224, 224)
        uint8 crops or their plans), in entry order; its workers start on the first ``iter()``.

    Raises:
        SetupError: the 3D landmarks file is missing or damaged, or ``decode_on_device`` without
        a usable torchvision.
    """
    from torch.utils.data import DataLoader

    from data.image_folder import AlignedFaces, collate_faces

    bs = batch_size or spec.batch_size_on(device)
    dataset = AlignedFaces(entries, _lm3d(spec, bfm_folder), resample_on_device=spec.resample_on_device,
                           decode_on_device=spec.decode_on_device)
    workers = loader_workers(spec.num_threads, len(entries), bs, world)
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=collate_faces,
                      pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init if workers else None)


def streamed_face_loader(spec: LoaderSpec, bfm_folder: str, queue, device: torch.device,
                         expected: int, batch_size: int) -> torch.utils.data.DataLoader:
    """The DataLoader of a run whose faces arrive as it goes (run_pipeline): batches of
    :class:`data.image_folder.StreamedFaces`, each as ``queue`` gives it (:class:`pipeline.stream.FaceFeed`),
    in the order they are ready, not the order fed.

    Args:
        spec, bfm_folder, device: as :func:`face_loader`'s.
        queue: the multiprocessing queue of batches of faces (None at the end, once per reader).
        expected: faces expected (sizes the workers: :func:`pipeline.workers.loader_workers`).
        batch_size: the faces of a batch (the feed's batches; sizes the workers too).

    Returns:
        the DataLoader; its ``num_workers`` readers (at least one) each need a None to end.

    Raises:
        SetupError: as :func:`face_loader`.
    """
    import inspect

    from torch.utils.data import DataLoader

    from data.image_folder import StreamedFaces

    dataset = StreamedFaces(queue, _lm3d(spec, bfm_folder), resample_on_device=spec.resample_on_device,
                            decode_on_device=spec.decode_on_device)
    workers = loader_workers(spec.num_threads, expected, batch_size)
    # a worker waiting for faces must not hold back the batches the others have ready (torch >= 2.6)
    unordered = {"in_order": False} if "in_order" in inspect.signature(DataLoader).parameters else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                      worker_init_fn=loader_worker_init if workers else None, **unordered)


def _lm3d(spec: LoaderSpec, bfm_folder: str):
    """The (5, 3) standard 3D landmarks the photos align to, once ``spec``'s decoding is checked.

    Raises:
        SetupError: the 3D landmarks file is missing or damaged, or ``decode_on_device`` without
        a usable torchvision.
    """
    from util.preprocess import load_lm3d

    try:
        lm3d = load_lm3d(bfm_folder)
    except (MissingAssetError, ValueError) as e:  # missing or damaged
        raise SetupError(str(e)) from None
    if spec.decode_on_device:
        from data.image_folder import torchvision_jpeg_decoder

        try:
            torchvision_jpeg_decoder()
        except ImportError as e:
            raise SetupError(str(e)) from None
    return lm3d
