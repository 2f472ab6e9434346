"""Synthetic faces with known coefficients: the training data of the recovery experiment.

Random coefficients of a face model (identity, expression, albedo, pose, SH lighting) are rendered
with the project's renderer over random smooth backgrounds, on whatever device the face model
lives (on the fly, nothing written to disk). Each batch carries its ground truth: the 257
coefficients and the 68 projected landmarks.

    gen = SyntheticFaces(face_model, renderer)
    batch = gen.sample(32, generator=torch.Generator(device).manual_seed(0))
    batch.images  # (32, 3, 224, 224) in 0..1

Pose ranges are uniform (degrees); identity, expression and albedo coefficients are normal with
the given standard deviations (the bases are already scaled by the model's standard deviations, so
1.0 means "as varied as the model says faces are").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.bfm import ParametricFaceModel
from models.coeffs import COEFFS


@dataclass(frozen=True)
class SyntheticConfig:
    """Distribution of the synthetic faces (defaults: moderate, frontal-ish portraits).

    Attributes:
        id_std, exp_std, tex_std: standard deviations of the identity/expression/albedo coefficients.
        yaw, pitch, roll: half-ranges in degrees (uniform) of the rotations about y, x and z.
        trans_xy: half-range of the x/y translation in model units (decimetres; 0.1 ~ 10 px at 224).
        trans_z: half-range of the z translation.
        light_ambient: half-range of the ambient band around the model's 0.8.
        light_dir: standard deviation of the first-order (directional) SH bands.
        light_high: the second-order bands' standard deviation.
        tint: the per-channel deviation (the gamma loss prefers white light).
        noise: standard deviation of Gaussian pixel noise.
        in_range: keep every face reproducible by the face model: a face whose lit vertex colours
            would leave 0..1 (so its render would be clipped, which the photometric loss, comparing
            unclipped renders, cannot match) has its lighting moved toward the neutral ambient light
            (x0.75 per round) until they do not. With the default ranges about 3/4 of the faces would
            need it. Off by default (the documented recovery figures are without it).
    """

    id_std: float = 1.0
    exp_std: float = 1.0
    tex_std: float = 1.0
    yaw: float = 30.0
    pitch: float = 15.0
    roll: float = 10.0
    trans_xy: float = 0.1
    trans_z: float = 0.5
    light_ambient: float = 0.3
    light_dir: float = 0.25
    light_high: float = 0.08
    tint: float = 0.03
    noise: float = 0.01
    in_range: bool = False


@dataclass(frozen=True)
class SyntheticBatch:
    """B synthetic faces (H = W = the renderer's image size), on the face model's device.

    Attributes:
        images: (B, 3, H, W) RGB 0..1 (render over a random background, plus noise, clipped).
        coeffs: (B, 257) the ground truth.
        lm68: (B, 68, 2) projected landmarks, crop pixels, y up.
        mask: (B, 1, H, W) face coverage, {0, 1}.
    """

    images: torch.Tensor
    coeffs: torch.Tensor
    lm68: torch.Tensor
    mask: torch.Tensor


def _uniform(n: int, half: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * half


def random_backgrounds(n: int, size: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """Smooth random colour fields with some texture.

    Args:
        n: number of images.
        size: their side in pixels.
        generator: the random source, on ``device``.
        device: where to make them (None: the default device).

    Returns:
        (n, 3, size, size) float32 in 0..1.
    """
    g = generator
    coarse = torch.rand(n, 3, 3, 3, generator=g, device=device)
    base = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    cells = max(2, size // 16)
    detail = torch.randn(n, 3, cells, cells, generator=g, device=device)
    amp = torch.rand(n, 1, 1, 1, generator=g, device=device) * 0.15
    base = base + amp * F.interpolate(detail, size=(size, size), mode="bilinear", align_corners=False)
    return base.clamp(0.0, 1.0)


class SyntheticFaces:
    """Render random faces of ``face_model`` with ``renderer`` (see module docstring).

    Args:
        face_model: the face model; its device is where everything is drawn and rendered.
        renderer: a :class:`models.renderer.MeshRenderer` able to render on that device.
        config: the distribution.
    """

    def __init__(self, face_model: ParametricFaceModel, renderer, config: SyntheticConfig = SyntheticConfig()):
        self.face_model, self.renderer, self.config = face_model, renderer, config

    @property
    def device(self) -> torch.device:
        """The face model's device."""
        return self.face_model.mean_shape.device

    def sample_coeffs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw random coefficients from :attr:`config`.

        Args:
            n: number of faces.
            generator: the random source, on the face model's device.

        Returns:
            (n, 257) float32 on the face model's device (angles (pitch, yaw, roll) in radians).
        """
        c, g, dev, lay = self.config, generator, self.device, COEFFS
        deg = math.pi / 180.0
        parts = {
            "id": torch.randn(n, lay.id, generator=g, device=dev) * c.id_std,
            "exp": torch.randn(n, lay.exp, generator=g, device=dev) * c.exp_std,
            "tex": torch.randn(n, lay.tex, generator=g, device=dev) * c.tex_std,
            "angle": torch.stack([_uniform(n, c.pitch * deg, g, dev), _uniform(n, c.yaw * deg, g, dev),
                                  _uniform(n, c.roll * deg, g, dev)], dim=1),
        }
        mono = torch.cat([_uniform(n, c.light_ambient, g, dev)[:, None],
                          torch.randn(n, 3, generator=g, device=dev) * c.light_dir,
                          torch.randn(n, 5, generator=g, device=dev) * c.light_high], dim=1)  # (n, 9)
        tint = torch.randn(n, 3, 9, generator=g, device=dev) * c.tint
        parts["gamma"] = (mono[:, None, :] + tint).reshape(n, 27)
        parts["trans"] = torch.stack([_uniform(n, c.trans_xy, g, dev), _uniform(n, c.trans_xy, g, dev),
                                      _uniform(n, c.trans_z, g, dev)], dim=1)
        if c.in_range:
            parts["gamma"] = self.light_in_range(parts)
        return lay.merge(parts)

    @torch.no_grad()
    def light_in_range(self, parts: dict, shrink: float = 0.75, rounds: int = 16) -> torch.Tensor:
        """Lighting moved toward the neutral ambient light (gamma 0: colours of the albedo times a
        uniform light, well inside 0..1) until each face's vertex colours lie in 0..1.

        Args:
            parts: split coefficients (:meth:`CoeffLayout.split <models.coeffs.CoeffLayout.split>`)
                of n faces; not changed.
            shrink: each round multiplies an out-of-range face's gamma by it.
            rounds: after that many rounds, faces still out of range get gamma 0.

        Returns:
            (n, 27) the new gamma (a new tensor, no gradient).
        """
        fm = self.face_model
        rot = fm.compute_rotation(parts["angle"])
        normal = fm.compute_norm(fm.compute_shape(parts["id"], parts["exp"])) @ rot
        texture = fm.compute_texture(parts["tex"])
        gamma = parts["gamma"].clone()

        def out_of_range() -> torch.Tensor:  # (n,) bool: a colour of the face leaves 0..1
            color = fm.compute_color(texture, normal, gamma)
            return ((color < 0) | (color > 1)).flatten(1).any(dim=1)

        for _ in range(rounds):
            out = out_of_range()
            if not bool(out.any()):
                return gamma
            gamma[out] *= shrink
        gamma[out_of_range()] = 0.0
        return gamma

    @torch.no_grad()
    def render(self, coeffs: torch.Tensor, generator: torch.Generator) -> SyntheticBatch:
        """Render given coefficients over random backgrounds (no gradient).

        Args:
            coeffs: (B, 257) on the face model's device.
            generator: the random source of backgrounds and noise, on that device.

        Returns:
            :class:`SyntheticBatch` whose ``coeffs`` is ``coeffs`` itself.
        """
        fm = self.face_model
        face = fm(coeffs)
        out = self.renderer(face.vertex, fm.face_buf, feat=face.color)
        size = out.image.shape[-1]
        bg = random_backgrounds(coeffs.shape[0], size, generator, self.device)
        img = out.image.clamp(0.0, 1.0) * out.mask + bg * (1.0 - out.mask)
        if self.config.noise > 0:
            img = img + self.config.noise * torch.randn(img.shape, generator=generator, device=self.device)
        return SyntheticBatch(images=img.clamp(0.0, 1.0), coeffs=coeffs, lm68=face.landmark, mask=out.mask)

    def sample(self, n: int, generator: torch.Generator) -> SyntheticBatch:
        """Draw and render ``n`` faces.

        Args:
            n: number of faces.
            generator: a ``torch.Generator`` on the face model's device (the draw is reproducible).

        Returns:
            :class:`SyntheticBatch` of ``n`` faces at the renderer's image size.
        """
        return self.render(self.sample_coeffs(n, generator), generator)

    def batches(self, n: int, generator: torch.Generator, chunk: int = 1):
        """Endless batches of ``n`` fresh faces, drawn and rendered ``chunk`` batches at a time
        (one render of ``chunk * n`` faces: fewer, larger kernel launches; the same distribution).

        Args:
            n: faces per batch.
            generator: the random source, on the face model's device.
            chunk: batches per draw (>= 1).

        Yields:
            :class:`SyntheticBatch` of ``n`` faces (views into the chunk's tensors).

        Raises:
            ValueError: ``chunk`` < 1.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        while True:
            big = self.sample(n * chunk, generator)
            for i in range(chunk):
                part = slice(i * n, (i + 1) * n)
                yield SyntheticBatch(images=big.images[part], coeffs=big.coeffs[part], lm68=big.lm68[part],
                                     mask=big.mask[part])
