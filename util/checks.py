"""One shape check for tensors and arrays, used by every module that validates its inputs.

Shapes are written as sequences whose items are an int (that size exactly), a letter or word
(any size, but the same size wherever the same name appears in one call: "B" in two arguments
checked with :func:`check_shapes`), or ``None`` / ``"*"`` (any size). Like kornia's
``KORNIA_CHECK_SHAPE``, a mismatch raises an exception that names the argument and both shapes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Dim = int | str | None


def shape_of(x: Any) -> str:
    """A value's shape for a message.

    Args:
        x: anything.

    Returns:
        ``x``'s shape as text, ``(2, 3)``, or its type's name when it has no ``shape``.
    """
    shape = getattr(x, "shape", None)
    return str(tuple(shape)) if shape is not None else type(x).__name__


def _want(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def check_shape(x: Any, shape: Sequence[Dim], name: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Raise unless ``x`` is a tensor or array of ``shape``.

    Args:
        x: a ``torch.Tensor`` or ``numpy.ndarray`` (anything with ``.shape`` and ``.ndim``).
        shape: the expected shape, e.g. ``("B", 3, "H", "W")``; ints must match exactly, names
            bind to the first size seen, ``None`` or ``"*"`` match any size.
        name: the argument's name, used in the message.
        sizes: sizes already bound to names (shared between several calls); updated in place.

    Returns:
        ``sizes`` with this call's names bound.

    Raises:
        ValueError: ``x`` has no shape, another number of dimensions, or a size that differs.
    """
    sizes = {} if sizes is None else sizes
    got = getattr(x, "shape", None)
    if got is None or len(got) != len(shape):
        raise ValueError(f"{name} must have shape {_want(shape)}, got {shape_of(x)}")
    bound = dict(sizes)
    for want, have in zip(shape, got):
        if want is None or want == "*":
            continue
        if isinstance(want, int):
            if want != have:
                raise ValueError(f"{name} must have shape {_want(shape)}, got {shape_of(x)}")
        elif bound.setdefault(want, int(have)) != have:
            raise ValueError(f"{name} must have shape {_want(shape)} with {want}={bound[want]}, got {shape_of(x)}")
    sizes.update(bound)
    return sizes


def check_shapes(**named: tuple[Any, Sequence[Dim]]) -> dict[str, int]:
    """Check several arguments whose shapes share names, e.g.
    ``check_shapes(pred=(p, ("B", 68, 2)), target=(t, ("B", 68, 2)))``.

    Returns:
        the sizes bound to the names.

    Raises:
        ValueError: the first argument whose shape does not match (named in the message).
    """
    sizes: dict[str, int] = {}
    for name, (x, shape) in named.items():
        check_shape(x, shape, name, sizes)
    return sizes
