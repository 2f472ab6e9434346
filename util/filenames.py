"""File names that are not plain text: shown escaped, stored with their raw bytes.

On Linux a file name is any bytes but ``/`` and NUL. Python decodes names that are not valid
UTF-8 (a Latin-1 ``é`` = byte 0xE9 from an old camera or a Windows share) with
``surrogateescape``: each undecodable byte becomes one code point U+DC80..U+DCFF, which
round-trips to the same bytes in every ``os`` call but cannot be encoded as UTF-8 - printing
such a name to a strict UTF-8 terminal, or writing it into a JSON or text file, raises
``UnicodeEncodeError``.

- :func:`printable`: a name for a terminal line, a log or a one-entry-per-line list file:
  undecodable bytes as ``\\xNN``, control characters (newline, tab, ...) as ``\\n``, ``\\t``,
  ``\\xNN``; everything else unchanged.
- :func:`json_text`: a name inside a JSON document (JSON escapes control characters itself):
  undecodable bytes as ``\\xNN``; :func:`raw_hex` / :func:`from_hex`: the exact bytes, for
  fields that must find the file again.
"""
from __future__ import annotations

import os

# one translation table each (str.translate works in C): surrogateescape bytes, control characters
_SURROGATES = {c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)}
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
_JSON_TABLE = str.maketrans(_SURROGATES)
_PRINT_TABLE = str.maketrans(_SURROGATES | _CONTROLS)


def is_plain(name: str) -> bool:
    """Whether ``name`` encodes as UTF-8 (no undecodable bytes, no other lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` (a name, or a message holding names) as one printable line: undecodable bytes
    as ``\\xNN``, control characters as ``\\n``, ``\\r``, ``\\t``, ``\\xNN``; other lone surrogates
    as ``\\udNNN``. Encodes as UTF-8 whatever the name.

    Args:
        text: any str (``os`` names carry undecodable bytes as lone surrogates).

    Returns:
        The escaped text, encodable as UTF-8; ``text`` itself where nothing needs escaping.
    """
    out = text.translate(_PRINT_TABLE)
    return out if is_plain(out) else out.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(text: str) -> str:
    """``text`` for a JSON string: undecodable bytes as ``\\xNN`` (other lone surrogates as
    ``\\udNNN``), everything else as it is."""
    if is_plain(text):
        return text
    out = text.translate(_JSON_TABLE)
    return out if is_plain(out) else out.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_hex(name: str) -> str:
    """The bytes of ``name`` on disk, as hexadecimal digits."""
    return os.fsencode(name).hex()


def from_hex(digits: str) -> str:
    """The inverse of :func:`raw_hex`.

    Args:
        digits: hexadecimal digits, two per byte.

    Returns:
        The ``os`` name of those bytes (``os.fsdecode``).

    Raises:
        ValueError: ``digits`` is not an even number of hexadecimal digits.
    """
    return os.fsdecode(bytes.fromhex(digits))
