"""The load stage: a DataLoader of aligned face crops over a run's entries."""
from __future__ import annotations

import torch

from pipeline.runtime import SetupError
from pipeline.workers import default_batch_size, loader_worker_init, loader_workers
from util.assets import MissingAssetError


def face_loader(opt, entries: list, device: torch.device, world: int = 1, batch_size: int | None = None):
    """The DataLoader of :func:`run_folder` over ``entries`` (this rank's share): aligned uint8
    crops in batches of ``batch_size`` (default: ``--batch_size``, or the device's default), decoded
    in :func:`loader_workers` worker processes, pinned for a CUDA ``device``. Workers start on the
    first ``iter()``."""
    from torch.utils.data import DataLoader

    from data.image_folder import AlignedFaces, collate_faces
    from util.preprocess import load_lm3d

    bs = batch_size or (default_batch_size(device) if opt.batch_size <= 0 else opt.batch_size)
    try:
        lm3d = load_lm3d(opt.bfm_folder)
    except (MissingAssetError, ValueError) as e:  # missing or damaged
        raise SetupError(str(e)) from None
    if opt.decode_on_device:
        from data.image_folder import torchvision_jpeg_decoder

        try:
            torchvision_jpeg_decoder()
        except ImportError as e:
            raise SetupError(str(e)) from None
    dataset = AlignedFaces(entries, lm3d, resample_on_device=opt.resample_on_device,
                           decode_on_device=opt.decode_on_device)
    workers = loader_workers(opt.num_threads, len(entries), bs, world)
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=collate_faces,
                      pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init if workers else None)
