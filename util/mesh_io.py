"""Mesh output: Wavefront .obj with per-vertex colours, formatted with vectorised numpy.

The content is what trimesh writes for ``Trimesh(..., vertex_colors=uint8, process=False).export``
(the original's writer): ``v x y z r g b`` with 8 decimals and colours as uint8/255, then 1-based
``f a b c``, vertex order preserved. Numbers are right-aligned in fixed-width columns (extra
spaces, which every OBJ reader skips), which lets numpy format a whole mesh at once.

How a file is built: every line has the same width, so a template line (prefix, spaces, '.',
'0's, newline) is copied to all rows, and each column's variable bytes are then stored into it
as little-endian integer words at fixed byte offsets of every row (a strided uint32/uint64
view of the line buffer: one store per row and word, no per-byte loops, no temporary records).
Digits come from a table of "0000".."9999" (4 ASCII bytes per gather); a number's sign and
integer digits from a table of 4-byte words that also hold the constant bytes around them; the
colours (uint8, 256 possible values) from a table of their 8 decimals as one uint64 each; and
the triangle lines, the same for every mesh of a run, are formatted once (:func:`face_lines`)
and passed to :func:`write_obj` (its speed against the alternatives: docs/throughput.md,
"Measurements behind the design").
"""
from __future__ import annotations

import functools

import numpy as np

_SPACE, _MINUS, _DOT, _ZERO = ord(" "), ord("-"), ord("."), ord("0")
# A fixed comment: never a photo's name, which may be any bytes (not UTF-8, a newline that would
# end the comment and start a bogus line); the file's own name already says whose face it is.
OBJ_HEADER = b"# written by Deep3DFaceRecon (modern reproduction)\n"


def colors_to_uint8(color: np.ndarray) -> np.ndarray:
    """Float colours -> bytes as the original: clip(255*c, 0, 255) truncated.

    Args:
        color: floats in 0..1 (any shape; usually (N, 3)); values outside are clipped.

    Returns:
        uint8 of the same shape.
    """
    return np.clip(255.0 * color, 0, 255).astype(np.uint8)


@functools.cache
def _table4() -> np.ndarray:
    """(10000,) uint32: "0000".."9999" as 4 little-endian ASCII bytes each."""
    return np.frombuffer("".join(f"{i:04d}" for i in range(10000)).encode(), dtype="<u4")


def _head_offset(n_int: int) -> int:
    """Where a number's 4-byte head word starts, counted from the separator before its column:
    the word holds the sign slot and the ``n_int`` integer digits, padded with the constant
    bytes around them (the separator ' ', the '.') to 4 bytes."""
    return max(0, n_int - 2)


@functools.cache
def _head_table(n_int: int) -> np.ndarray:
    """(2000,) uint32 for 1 <= n_int <= 3: index ``i + 1000 * negative`` -> the head word of
    i (< 10**n_int) right-aligned in the sign slot and ``n_int`` digits, a '-' just before its
    first digit when negative: ``" " + "-7".rjust(n_int + 1) + "."`` from :func:`_head_offset` on."""
    start = _head_offset(n_int)
    rows = [(" " + (sign + str(i % 10 ** n_int)).rjust(n_int + 1) + ".")[start:start + 4]
            for sign in ("", "-") for i in range(1000)]
    return np.frombuffer("".join(rows).encode(), dtype="<u4")


def _records(a: np.ndarray, offset: int, width: int) -> np.ndarray:
    """(N,) ``V<width>`` items: bytes ``[offset, offset + width)`` of each row of the 2-D array ``a``."""
    a = np.ascontiguousarray(a)
    row = a.strides[0] if a.ndim > 1 else a.itemsize
    return np.ndarray((a.shape[0],), dtype=np.dtype((np.void, width)), buffer=a, offset=offset, strides=(row,))


def _field(buf: np.ndarray, offset: int, dtype) -> np.ndarray:
    """(N,) items of ``dtype`` at byte ``offset`` of each row of the C-contiguous (N, W) uint8
    ``buf``: a writable, possibly unaligned, strided view."""
    return np.ndarray((buf.shape[0],), dtype=dtype, buffer=buf, offset=offset, strides=(buf.strides[0],))


def _write_filled(column, buf: np.ndarray, pos: int) -> None:
    """Format ``column`` (its ``fill`` into an (N, width) block) and copy the block into the line
    buffer ``buf`` after the separator at ``pos``, one record per row."""
    out = np.empty((column.n, column.width), np.uint8)
    column.fill(out)
    _field(buf, pos + 1, (np.void, column.width))[...] = _records(out, 0, column.width)


def _put_digits(out: np.ndarray, v: np.ndarray) -> None:
    """Write (N,) non-negative int64 as zero-padded ASCII digits into ``out`` (N, width)."""
    width = out.shape[1]
    chunks = -(-width // 4)
    words = np.empty((len(v), chunks), dtype="<u4")
    for k in range(chunks - 1, -1, -1):
        words[:, k] = _table4()[v % 10000]
        v = v // 10000
    out[:] = words.view(np.uint8)[:, 4 * chunks - width:]


def _n_digits(v: np.ndarray) -> np.ndarray:
    return np.maximum(1, np.floor(np.log10(np.maximum(v, 1))).astype(np.int64) + 1)


class _FixedColumn:
    """A column of ``'%.8f'`` numbers, right-aligned in a fixed width:
    sign slot, integer digits, '.', decimals (a '-' sits just before the first digit)."""

    def __init__(self, x: np.ndarray, decimals: int = 8):
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot write non-finite coordinates to an .obj")
        q = np.rint(np.abs(x) * 10.0 ** decimals).astype(np.int64)
        self.ip = q // 10 ** decimals
        self.fp, self.decimals = q - self.ip * 10 ** decimals, decimals
        self.neg = (x < 0) & (q > 0)
        self.n_int = len(str(int(self.ip.max(initial=0))))
        self.width = 1 + self.n_int + 1 + decimals  # sign, integer digits, '.', decimals
        self.n = len(x)

    def fill(self, out: np.ndarray) -> None:
        """Write the column into ``out`` (N, width) uint8 (the general path, any magnitude)."""
        n_int = self.n_int
        nd = _n_digits(self.ip)
        out[:] = _SPACE
        _put_digits(out[:, 1:1 + n_int], self.ip)
        blank = np.arange(1, 1 + n_int)[None, :] <= (n_int - nd)[:, None]  # leading zeros
        out[:, 1:1 + n_int][blank] = _SPACE
        rows = np.nonzero(self.neg)[0]
        out[rows, (n_int - nd)[rows]] = _MINUS
        out[:, 1 + n_int] = _DOT
        _put_digits(out[:, 2 + n_int:], self.fp)

    def template(self) -> bytes:
        return b" " * (1 + self.n_int) + b"." + b"0" * self.decimals

    def write(self, buf: np.ndarray, pos: int) -> None:
        """Store the column into the line buffer ``buf`` (N, line width) holding the template;
        ``pos``: the byte of the separator before the column."""
        n_int = self.n_int
        if n_int > 3 or self.decimals != 8:  # the general path
            _write_filled(self, buf, pos)
            return
        _field(buf, pos + _head_offset(n_int), "<u4")[...] = _head_table(n_int)[self.ip + 1000 * self.neg]
        hi = self.fp // 10000
        dec = pos + n_int + 3  # separator, sign slot, integer digits, '.'
        _field(buf, dec, "<u4")[...] = _table4()[hi]
        _field(buf, dec + 4, "<u4")[...] = _table4()[self.fp - 10000 * hi]


class _IntColumn:
    """A column of non-negative integers, right-aligned."""

    def __init__(self, v: np.ndarray):
        self.v = np.asarray(v, dtype=np.int64)
        self.width = len(str(int(self.v.max(initial=0))))
        self.n = len(self.v)

    def fill(self, out: np.ndarray) -> None:
        _put_digits(out, self.v)
        blank = np.arange(self.width)[None, :] < (self.width - _n_digits(self.v))[:, None]
        out[blank] = _SPACE

    def template(self) -> bytes:
        return b" " * self.width

    def write(self, buf: np.ndarray, pos: int) -> None:
        _write_filled(self, buf, pos)


class _ColorColumn:
    """A column of uint8 colours written as ``'%.8f' % (c / 255)``: the template holds
    ``" 0."``, the 8 decimals come from a table of the 256 values (one uint64 each), and the
    one value with integer digit 1 (255 -> 1.00000000) gets its '1' stored on its own."""

    width = 11  # sign slot, one integer digit, '.', 8 decimals: what _FixedColumn gives for 0..1

    def __init__(self, codes: np.ndarray):
        self.codes = np.asarray(codes, dtype=np.uint8)
        self.n = len(self.codes)

    @staticmethod
    @functools.cache
    def table() -> np.ndarray:
        """(256,) uint64: the 8 decimals of each value, formatted by :class:`_FixedColumn` itself
        (so the bytes are the same); the integer digit is '0' for every value but 255."""
        text = format_fixed(np.arange(256) / 255.0)
        if text.shape[1] != _ColorColumn.width or not (text[:255, :3] == np.frombuffer(b" 0.", np.uint8)).all() \
                or bytes(text[255, :3]) != b" 1.":
            raise RuntimeError("unexpected colour formatting")  # cannot happen for '%.8f' of k / 255
        return np.ascontiguousarray(text[:, 3:]).view("<u8").ravel()

    def template(self) -> bytes:
        return b" 0." + b"0" * 8

    def write(self, buf: np.ndarray, pos: int) -> None:
        _field(buf, pos + 4, "<u8")[...] = self.table()[self.codes]
        buf[np.flatnonzero(self.codes == 255), pos + 2] = ord("1")


def _lines_array(prefix: bytes, columns: list) -> np.ndarray:
    """Rows ``prefix col1 col2 ...\\n`` as an (N, line width) uint8 array."""
    template = prefix + b"".join(b" " + c.template() for c in columns) + b"\n"
    n, total = columns[0].n, len(template)
    buf = np.empty((n, total), np.uint8)
    _records(buf, 0, total)[...] = np.frombuffer(template, dtype=np.dtype((np.void, total)))[0]
    pos = len(prefix)
    for c in columns:
        c.write(buf, pos)
        pos += c.width + 1
    return buf


def _lines(prefix: bytes, columns: list) -> bytes:
    return _lines_array(prefix, columns).tobytes()


def format_fixed(x: np.ndarray, decimals: int = 8) -> np.ndarray:
    """Format numbers as ``'%.{decimals}f'`` would, right-aligned with spaces.

    Args:
        x: (N,) finite floats.
        decimals: digits after the point.

    Returns:
        (N, W) uint8 ASCII bytes, one row per number, W the widest number's width.

    Raises:
        ValueError: a value is not finite.
    """
    col = _FixedColumn(x, decimals)
    out = np.empty((col.n, col.width), np.uint8)
    col.fill(out)
    return out


def face_lines(faces: np.ndarray) -> bytes:
    """The ``f a b c`` lines of an .obj: the same for every mesh of a run.

    Args:
        faces: (F, 3) integer vertex indices, 0-based (anything reshaping to it).

    Returns:
        The lines as ASCII bytes, indices 1-based as .obj counts them.
    """
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3) + 1
    return _lines(b"f", [_IntColumn(f[:, k]) for k in range(3)])


def _vertex_columns(vertices: np.ndarray, colors_u8: np.ndarray | None) -> list:
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    cols: list = [_FixedColumn(v[:, k]) for k in range(3)]
    if colors_u8 is not None:
        c = np.asarray(colors_u8).reshape(-1, 3)
        if c.dtype == np.uint8:
            cols += [_ColorColumn(c[:, k]) for k in range(3)]
        else:  # integer-valued colours of another dtype
            cols += [_FixedColumn(c[:, k].astype(np.float64) / 255.0) for k in range(3)]
    return cols


def vertex_lines(vertices: np.ndarray, colors_u8: np.ndarray | None = None) -> bytes:
    """The ``v x y z [r g b]`` lines of an .obj.

    Args:
        vertices: (N, 3) finite floats, written with 8 decimals.
        colors_u8: (N, 3) uint8 colours (written as c / 255 with 8 decimals) or None.

    Returns:
        The lines as ASCII bytes.

    Raises:
        ValueError: a coordinate is not finite.
    """
    return _lines(b"v", _vertex_columns(vertices, colors_u8))


def obj_chunks(vertices: np.ndarray, faces: np.ndarray | bytes, colors_u8: np.ndarray | None = None) -> list:
    """The .obj file content (header, vertex lines, face lines) as bytes-like chunks to write in
    order (the vertex lines are a view of their buffer, not copied into a bytes object).

    Args:
        vertices: (N, 3) finite floats.
        faces: (F, 3) integer vertex indices, 0-based, or their :func:`face_lines`.
        colors_u8: (N, 3) uint8 colours or None.

    Returns:
        [header bytes, memoryview of the vertex lines, face lines bytes].

    Raises:
        ValueError: a coordinate is not finite.
    """
    f = faces if isinstance(faces, bytes) else face_lines(faces)
    v = _lines_array(b"v", _vertex_columns(vertices, colors_u8))
    return [OBJ_HEADER, memoryview(v).cast("B"), f]


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray | bytes,
              colors_u8: np.ndarray | None = None) -> None:
    """Write an .obj (see :func:`obj_chunks`) to a temporary name of this process, then rename
    (:func:`util.atomic_files.write_bytes_atomic`): no half files, and two runs writing into one
    folder never share a temporary name.

    Args:
        path: the .obj to write (its folder must exist).
        vertices, faces, colors_u8: as :func:`obj_chunks` (``faces`` may be the run's precomputed
            :func:`face_lines`).

    Raises:
        ValueError: a coordinate is not finite (nothing is written).
        OSError: the file cannot be written.
    """
    from util.atomic_files import write_bytes_atomic

    write_bytes_atomic(path, obj_chunks(vertices, faces, colors_u8))
