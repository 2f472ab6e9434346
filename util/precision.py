"""Float32 arithmetic on CUDA: full IEEE precision, or TF32 tensor cores.

PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa inputs), which on
Ampere and later GPUs changes a network's outputs by about 1e-3 of their size, and by how much
depends on the algorithm cuDNN picks (batch size among its inputs). :func:`ieee_fp32` turns that
off for a block of work and restores the process's settings after it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA (cuDNN uses TF32 by default), restored after.
    Nothing changes for other devices. The settings are the process's, not the thread's.

    Args:
        device: the device the work inside runs on; only its type is read.

    Yields:
        None, with the IEEE float32 settings on (for a CUDA device).
    """
    if device.type != "cuda":
        yield
        return
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    new_api = hasattr(conv, "fp32_precision")  # torch >= 2.9; mixing in the legacy flags is an error
    if new_api:
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            conv.fp32_precision, matmul.fp32_precision = saved
        else:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
