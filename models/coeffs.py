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
    id: int = 80
    exp: int = 64
    tex: int = 80
    angle: int = 3
    gamma: int = 27
    trans: int = 3

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in self.names)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Output sizes of the original network's 1x1-conv heads (translation split 2 + 1)."""
        return self.sizes[:-1] + (2, 1)

    def slices(self) -> dict[str, slice]:
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
        """Inverse of :meth:`split`: dict of (B, n) tensors -> (B, 257)."""
        return torch.cat([parts[name] for name in self.names], dim=1)


COEFFS = CoeffLayout()
