"""PNG encoding of (H, W, 3) uint8 pictures, as byte chunks for the writer processes.

Every row is 'Up'-filtered with one numpy subtraction, then one zlib stream: the pixels PIL
would write, faster (Pillow tries all five filters per row; figures in docs/throughput.md).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from util.checks import check_shape

PNG_COMPRESS_LEVEL = 1  # lossless; the fastest deflate level that still compresses (~110 KB a picture)


def _png_chunk(tag: bytes, data) -> list:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return [struct.pack(">I", len(data)) + tag, data, struct.pack(">I", crc)]


def png_chunks(rgb: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> list:
    """A PNG file of an RGB picture, as byte strings to write in order.

    Args:
        rgb: (H, W, 3) uint8.
        level: zlib level, 0-9 (lossless at every level).

    Returns:
        the file's chunks: 8-bit RGB, not interlaced, every row 'Up'-filtered (the row above
        subtracted byte-wise mod 256; the first row as it is), one zlib stream.

    Raises:
        ValueError: ``rgb`` is not (H, W, 3) uint8.
    """
    rgb = np.asarray(rgb)
    check_shape(rgb, ("H", "W", 3), "rgb")
    if rgb.dtype != np.uint8:
        raise ValueError(f"png_chunks needs an (H, W, 3) uint8 picture, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, 3 * w)
    filtered = np.empty((h, 1 + 3 * w), np.uint8)
    filtered[:, 0] = 2  # filter type 'Up'
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, filtering, no interlace
    return [b"\x89PNG\r\n\x1a\n", *_png_chunk(b"IHDR", header),
            *_png_chunk(b"IDAT", zlib.compress(filtered, level)), *_png_chunk(b"IEND", b"")]
