"""Writing MATLAB 5 .mat files of real float arrays, strings and cell arrays of strings, without scipy.

test.py's coefficient files (:func:`util.results_io.mat_files`) hold a few small float32 arrays.
``scipy.io.savemat`` writes them too, but importing ``scipy.io`` costs a fresh process 0.2-0.5 s
(it imports ``scipy.sparse``), which is on the critical path of a one-photo run (the file is its
last). This writes the same bytes as ``savemat(f, arrays, format="5")`` after the 116-byte text
of the header, which here names this project instead of a time (tests/test_mat5.py compares
them byte for byte, and reads the files back with scipy).

The format (MathWorks, "MAT-File Format", version 5): a 128-byte header (text, 8 bytes of
subsystem offset, version 0x0100, the characters 'IM' for little-endian), then one miMATRIX data
element per variable: array flags (class), dimensions, name and the real part, column-major. Each
element is a tag (type, byte count) and its data padded to 8 bytes; an element of at most 4 bytes
is written in the tag's "small data" form. A string is a char array (1 x characters, UTF-8 data;
an empty one 0 x 0); an object array of strings is a cell array whose elements are unnamed
char arrays, column-major (image-set runs' list of photos, :mod:`pipeline.image_sets`).
"""
from __future__ import annotations

import struct

import numpy as np

HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by Deep3DFaceRecon (util/mat5.py)"
MI_INT8, MI_INT32, MI_UINT32, MI_SINGLE, MI_DOUBLE, MI_MATRIX, MI_UTF8 = 1, 5, 6, 7, 9, 14, 16
MX_CELL_CLASS, MX_CHAR_CLASS = 1, 4
CLASSES = {np.dtype("<f4"): (7, MI_SINGLE), np.dtype("<f8"): (6, MI_DOUBLE)}  # mxSINGLE_CLASS, mxDOUBLE_CLASS


def _element(mi_type: int, data: bytes) -> bytes:
    """A data element: the small form for up to 4 bytes, else a tag and data padded to 8 bytes."""
    n = len(data)
    if n <= 4:
        return struct.pack("<HH", mi_type, n) + data + b"\0" * (4 - n)
    return struct.pack("<II", mi_type, n) + data + b"\0" * (-n % 8)


def _header(mx_class: int, shape: tuple[int, ...], name: str) -> bytes:
    """Array flags, dimensions and name: the start of every miMATRIX body."""
    return (_element(MI_UINT32, struct.pack("<II", mx_class, 0))
            + _element(MI_INT32, struct.pack(f"<{len(shape)}i", *shape))
            + _element(MI_INT8, name.encode("ascii")))


def _row_shape(n: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """savemat's dimensions: a scalar or vector is one row, an empty one 0 x 0."""
    if n == 0:
        return (0, 0)
    return (1, n) if len(shape) < 2 else shape


def _char_body(name: str, text: str) -> bytes:
    return _header(MX_CHAR_CLASS, _row_shape(len(text), ()), name) + _element(MI_UTF8, text.encode("utf-8"))


def _cell_body(name: str, a: np.ndarray) -> bytes:
    if not all(isinstance(v, str) for v in a.flat):
        raise TypeError(f"{name}: object arrays are written here only as cell arrays of strings")
    items = a.ravel(order="F")
    return _header(MX_CELL_CLASS, _row_shape(items.size, a.shape), name) + b"".join(_matrix("", v) for v in items)


def _float_body(name: str, a: np.ndarray) -> bytes:
    dtype = a.dtype.newbyteorder("<")
    if dtype not in CLASSES:
        raise TypeError(f"{name}: {a.dtype} arrays are not written here (float32 or float64, strings and "
                        "object arrays of strings only)")
    if a.ndim < 2:  # as savemat's oned_as='row': a scalar is 1x1, a vector one row
        a = a.reshape(1, -1)
    mx_class, mi_type = CLASSES[dtype]
    return _header(mx_class, a.shape, name) + _element(mi_type, np.asarray(a, dtype=dtype).tobytes(order="F"))


def _matrix(name: str, value) -> bytes:
    """One variable as a miMATRIX element: a string, an object array of strings or a float array."""
    if isinstance(value, str):
        body = _char_body(name, value)
    else:
        a = np.asarray(value)
        body = _cell_body(name, a) if a.dtype == object else _float_body(name, a)
    return struct.pack("<II", MI_MATRIX, len(body)) + body


def mat5_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of a version 5 .mat file holding ``arrays``.

    Args:
        arrays: variable name (ASCII, as MATLAB names go) -> real float32 or float64 array of any
            shape (1-D arrays and scalars are stored as one row, as ``savemat`` does), a string
            (a char array), or an object array of strings (a cell array).

    Returns:
        the file's bytes, uncompressed.

    Raises:
        TypeError: an array of another dtype, or an object array holding something else than strings.
    """
    header = HEADER_TEXT.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    return header + b"".join(_matrix(k, v) for k, v in arrays.items())
