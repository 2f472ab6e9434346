"""The layout of the 257 coefficients predicted per face, described once.

Order (as in Deep3DFaceRecon): identity 80, expression 64, texture 80, angle 3 (radians,
x/y/z), gamma 27 (second-order spherical harmonics, 9 bands x RGB), translation 3.
The network predicts translation with two heads (tx ty: 2, tz: 1), hence ``head_sizes``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from util.checks import check_shape


@dataclass(frozen=True)
class CoeffLayout:
    """Sizes of the coefficient groups, in the order they sit in a (B, 257) coefficient vector.

    Attributes:
        id: identity (shape) coefficients, 80.
        exp: expression coefficients, 64.
        tex: texture (albedo) coefficients, 80.
        angle: rotation as Euler angles x, y, z in radians, 3.
        gamma: spherical-harmonics lighting, 9 bands x RGB, 27.
        trans: translation x, y, z in model units (decimetres), 3.
    """

    id: int = 80
    exp: int = 64
    tex: int = 80
    angle: int = 3
    gamma: int = 27
    trans: int = 3

    @property
    def names(self) -> tuple[str, ...]:
        """The group names in order: ``('id', 'exp', 'tex', 'angle', 'gamma', 'trans')``."""
        return tuple(f.name for f in fields(self))

    @property
    def sizes(self) -> tuple[int, ...]:
        """The group sizes in :attr:`names`' order: ``(80, 64, 80, 3, 27, 3)`` by default."""
        return tuple(getattr(self, n) for n in self.names)

    @property
    def total(self) -> int:
        """The number of coefficients per face (257 by default)."""
        return sum(self.sizes)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Output sizes of the original network's 1x1-conv heads (translation split 2 + 1).

        Returns:
            ``sizes`` with the last (translation) replaced by 2 (tx, ty) and 1 (tz):
            ``(80, 64, 80, 3, 27, 2, 1)`` by default.
        """
        return self.sizes[:-1] + (2, 1)

    def slices(self) -> dict[str, slice]:
        """Where each group sits along the coefficient axis.

        Returns:
            ``{name: slice(start, stop)}`` in :attr:`names`' order, e.g. ``'exp': slice(80, 144)``.
        """
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def split(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split coefficients into their groups.

        Args:
            coeffs: (B, 257).

        Returns:
            {'id': (B,80), 'exp': (B,64), 'tex': (B,80), 'angle': (B,3), 'gamma': (B,27),
            'trans': (B,3)}, views of ``coeffs`` (no copy).

        Raises:
            ValueError: ``coeffs`` is not (B, 257).
        """
        check_shape(coeffs, ("B", self.total), "coeffs")
        return {name: coeffs[:, s] for name, s in self.slices().items()}

    def merge(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: concatenate the groups along dimension 1.

        Args:
            parts: ``{name: (B, n_name)}`` for every name of :attr:`names` (extra keys are ignored),
                all on one device and of one dtype.

        Returns:
            (B, 257) a new tensor, groups in :attr:`names`' order.

        Raises:
            KeyError: a group is missing from ``parts``.
            RuntimeError: the groups' batch sizes differ (``torch.cat``).
        """
        return torch.cat([parts[name] for name in self.names], dim=1)


COEFFS = CoeffLayout()
