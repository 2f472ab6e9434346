"""The weights of the hybrid loss's terms, with the original's defaults (stated here once).

Kept apart from :mod:`models.losses` and free of torch, so that option parsers
(``options/train_options.py``, the experiments) can take their ``--w_*`` defaults from it without
loading the loss.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossWeights:
    """Weights of the hybrid loss's terms (the original's ``--w_*`` flags and defaults).

    Attributes:
        w_feat: identity (perceptual) term.
        w_color: photometric term.
        w_reg: coefficient regularisation, whose parts are weighted by ``w_id``, ``w_exp``, ``w_tex``.
        w_gamma: lighting (SH near-white) term.
        w_lm: landmark term.
        w_reflc: reflectance (albedo variance) term.
    """

    w_feat: float = 0.2
    w_color: float = 1.92
    w_reg: float = 3.0e-4
    w_id: float = 1.0
    w_exp: float = 0.8
    w_tex: float = 1.7e-2
    w_gamma: float = 10.0
    w_lm: float = 1.6e-3
    w_reflc: float = 5.0
