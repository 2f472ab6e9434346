"""Reconstruction from image sets: one identity (and albedo) per person from several photos.

Deng et al. 2019 (Sec. 4, "shape aggregation") reconstruct each photo of a person with the
single-image network and aggregate the identity coefficients with per-photo confidences ``c_j``
(vectors over the identity coefficients, from their C-Net):
``alpha_set = sum_j (c_j * alpha_j) / sum_j c_j`` (element-wise). Here every photo is
reconstructed as test.py always does (its own files are written), and per group:

* the confidences come from :mod:`pipeline.confidence` (default ``fit``: from each photo's
  landmark and photometric residuals; or ``uniform``; or a trained TorchScript network);
* identity = ``sum_j c_j * id_j / sum_j c_j`` (per coefficient when ``c_j`` is a vector) and
  albedo likewise with each photo's scalar confidence (a vector's mean): the paper aggregates
  shape only;
* ``<results>/image_sets/<person>.obj`` (``.ply``, ``.glb``: ``mesh_format``): the aggregated
  identity with a neutral expression, in model space (as the per-photo .obj files' world space,
  without pose), coloured by the aggregated albedo (no lighting); ``<person>.mat``: ``id`` (1, 80),
  ``tex`` (1, 80), ``photos`` (the photos' paths relative to the folder), ``weights`` (1, N) the photos' shares
  (``c_j / sum c``, scalar confidences), ``confidence`` (N, 1) or (N, 80),
  ``landmark_residual`` and ``photo_residual`` (1, N), ``confidence_name``.

Groups (:class:`GroupRule`): ``folder`` = one sub-folder per person (``<img_folder>/<person>/...``;
photos at the top level belong to no group), or a CSV file with the columns ``photo,person``
(``photo`` relative to the image folder, '/'-separated as listed; a header row is optional).
Only each photo's first face (``detections/<stem>.txt``) joins its photo's group.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from models.coeffs import COEFFS
from pipeline.confidence import Confidence, fit_residuals, load_confidence
from util.checks import check_shape

log = logging.getLogger(__name__)
SETS_DIR = "image_sets"


@dataclass(frozen=True)
class ImageSetSettings:
    """group_by: ``folder`` or the path of a ``photo,person`` CSV file. confidence: ``fit`` |
    ``uniform`` | path of a TorchScript network (:func:`pipeline.confidence.load_confidence`).
    mesh_format: the people's mesh files, ``obj`` | ``ply`` | ``glb`` (test.py's --mesh_format)."""

    group_by: str
    confidence: str = "fit"
    mesh_format: str = "obj"


class GroupRule:
    """Which person a photo (its path relative to the image folder, '/'-separated) belongs to."""

    def __init__(self, by_folder: bool, table: dict[str, str] | None = None):
        self.by_folder, self.table = by_folder, table or {}

    @classmethod
    def parse(cls, group_by: str) -> "GroupRule":
        """``folder`` or a CSV path; raises ValueError naming the problem."""
        if group_by == "folder":
            return cls(by_folder=True)
        if not os.path.isfile(group_by):
            raise ValueError(f"--group_by {group_by!r}: give 'folder' (a sub-folder per person) or the path of a "
                             "CSV file with the columns photo,person")
        table: dict[str, str] = {}
        with open(group_by, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                row = [c.strip() for c in row]
                if not row or not any(row) or (i == 0 and [c.lower() for c in row[:2]] == ["photo", "person"]):
                    continue
                if len(row) < 2 or not row[0] or not row[1]:
                    raise ValueError(f"{group_by}, line {i + 1}: expected 'photo,person', got {','.join(row)!r}")
                table[row[0].replace("\\", "/")] = row[1]
        if not table:
            raise ValueError(f"{group_by}: no 'photo,person' rows")
        return cls(by_folder=False, table=table)

    def person(self, rel_path: str) -> str | None:
        if self.by_folder:
            head, sep, _ = rel_path.partition("/")
            return head if sep else None
        return self.table.get(rel_path)


def safe_name(person: str) -> str:
    """A file name for ``person``: path separators and other awkward characters become '_'."""
    name = re.sub(r"[^\w.\-]+", "_", person).strip("._")
    return name or "person"


@dataclass
class PhotoRecord:
    """One photo of a group: its path, (257,) coefficients, confidence (() or (80,)) and residuals."""

    rel_path: str
    coeffs: np.ndarray
    confidence: np.ndarray
    landmark_residual: float
    photo_residual: float


@dataclass(frozen=True)
class Aggregate:
    """A group's aggregation: id (80,), tex (80,), weights (N,) the photos' shares of the albedo
    (and of the identity where confidences are scalars), summing to 1."""

    id: torch.Tensor
    tex: torch.Tensor
    weights: torch.Tensor


def aggregate(coeffs: torch.Tensor, confidence: torch.Tensor) -> Aggregate:
    """Confidence-weighted identity and albedo of N photos of one person.

    coeffs: (N, 257). confidence: (N,) or (N, 80) positive; a vector weighs each identity
    coefficient separately (the paper's C-Net) and its mean weighs the albedo.
    """
    n = coeffs.shape[0]
    if n == 0:
        raise ValueError("aggregate needs at least one photo")
    check_shape(coeffs, ("N", COEFFS.total), "coeffs")
    if confidence.shape not in ((n,), (n, COEFFS.id)):
        raise ValueError(f"confidence must have shape ({n},) or ({n}, {COEFFS.id}), got {tuple(confidence.shape)}")
    if bool((confidence <= 0).any()) or not bool(torch.isfinite(confidence).all()):
        raise ValueError("confidences must be positive and finite")
    parts = COEFFS.split(coeffs)
    c = confidence.to(coeffs.dtype)
    scalar = c if c.ndim == 1 else c.mean(dim=1)
    cid = c if c.ndim == 2 else c[:, None]
    weights = scalar / scalar.sum()
    return Aggregate(id=(cid * parts["id"]).sum(0) / cid.sum(0), tex=(weights[:, None] * parts["tex"]).sum(0),
                     weights=weights)


@dataclass
class SetsSummary:
    """What an image-set run wrote: person -> number of photos; photos in no group."""

    groups: dict[str, int] = field(default_factory=dict)
    ungrouped: list[str] = field(default_factory=list)
    out_dir: str = ""

    def report(self) -> str:
        lines = [f"image sets: {len(self.groups)} group(s) aggregated in {self.out_dir}"
                 + "".join(f"\n  {p}: {n} photo(s)" for p, n in sorted(self.groups.items()))]
        if self.ungrouped:
            lines.append(f"{len(self.ungrouped)} photo(s) in no group (reconstructed alone), e.g. {self.ungrouped[0]}")
        return "\n".join(lines)


class SetCollector:
    """The ``on_batch`` hook of :func:`pipeline.run.run_folder`: keeps each grouped photo's
    coefficients, residuals and confidence; :meth:`write` then aggregates and writes the groups."""

    def __init__(self, settings: ImageSetSettings, img_folder: str, rule: GroupRule | None = None,
                 confidence: Confidence | None = None):
        self.settings, self.img_folder = settings, img_folder
        self.rule = rule or GroupRule.parse(settings.group_by)
        self.confidence = confidence
        self.records: dict[str, list[PhotoRecord]] = {}
        self.ungrouped: list[str] = []
        self.face_model = None

    def rel_path(self, image_path: str) -> str:
        return os.path.relpath(image_path, self.img_folder).replace(os.sep, "/")

    def __call__(self, model, images: torch.Tensor, coeffs: torch.Tensor, batch) -> None:
        """See one batch: ``images`` (B, 3, 224, 224) float crops, ``coeffs`` (B, 257), ``batch`` its
        :class:`data.image_folder.FaceBatch`."""
        if self.confidence is None:
            self.confidence = load_confidence(self.settings.confidence, coeffs.device)
        self.face_model = model.face_model
        keep, people = [], []
        for i, m in enumerate(batch.meta):
            rel = self.rel_path(m.image_path)
            person = self.rule.person(rel)
            if person is None or m.name != os.path.splitext(os.path.basename(rel))[0]:
                if person is None:
                    self.ungrouped.append(rel)
                continue  # a second face of a photo stays out of its group
            keep.append(i)
            people.append((person, rel))
        if not keep:
            return
        idx = torch.tensor(keep, device=coeffs.device)
        lm = batch.lm.to(coeffs.device)[idx]
        if batch.lm68 is not None and bool(batch.has_lm68[keep].all()):
            lm = batch.lm68.to(coeffs.device)[idx]
        imgs, cs = images[idx], coeffs[idx]
        res = fit_residuals(model, imgs, cs, lm)
        conf = self.confidence(imgs, cs, res).float().cpu().numpy()
        cs, rl, rp = cs.float().cpu().numpy(), res.landmark.float().cpu().numpy(), res.photo.float().cpu().numpy()
        for k, (person, rel) in enumerate(people):
            self.records.setdefault(person, []).append(PhotoRecord(rel, cs[k], conf[k], float(rl[k]), float(rp[k])))

    def write(self, out_dir: str) -> SetsSummary:
        """Aggregate every group and write ``<out_dir>/image_sets/<person>.{obj|ply|glb,mat}``."""
        summary = SetsSummary(ungrouped=sorted(self.ungrouped), out_dir=os.path.join(out_dir, SETS_DIR))
        if not self.records:
            return summary
        os.makedirs(summary.out_dir, exist_ok=True)
        used: set[str] = set()
        for person in sorted(self.records):
            name = safe_name(person)
            while name in used:  # two people whose names differ only in awkward characters
                name += "_"
            used.add(name)
            write_group(os.path.join(summary.out_dir, name), self.face_model, sorted(self.records[person],
                        key=lambda r: r.rel_path), self.settings.confidence, self.settings.mesh_format)
            summary.groups[person] = len(self.records[person])
        return summary


@torch.no_grad()
def group_mesh(face_model, agg: Aggregate) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) float32 model-space vertices of the aggregated identity (neutral expression) and
    (V, 3) uint8 albedo colours."""
    from pipeline.render import colors_to_uint8

    dev = face_model.mean_shape.device
    idc = agg.id.to(dev, torch.float32)[None]
    shape = face_model.compute_shape(idc, torch.zeros(1, COEFFS.exp, device=dev))
    albedo = face_model.compute_texture(agg.tex.to(dev, torch.float32)[None])
    return shape[0].cpu().numpy(), colors_to_uint8(albedo[0]).cpu().numpy()


def write_group(base: str, face_model, records: list[PhotoRecord], confidence_name: str,
                mesh_format: str = "obj") -> Aggregate:
    """Aggregate ``records`` and write ``base``.<mesh_format> (``obj`` | ``ply`` | ``glb``,
    :mod:`util.mesh_formats`; per-vertex colours, no texture) and ``base``.mat (module docstring),
    both or neither (:func:`util.atomic_files.write_files_atomic`).

    Raises:
        ValueError: an unknown ``mesh_format``. OSError: a file could not be written (none is then).
    """
    from util.atomic_files import write_files_atomic
    from util.mat5 import mat5_bytes
    from util.mesh_formats import mesh_files, mesh_settings
    from util.mesh_io import obj_chunks

    coeffs = torch.from_numpy(np.stack([r.coeffs for r in records])).double()
    conf = torch.from_numpy(np.stack([r.confidence for r in records])).double()
    agg = aggregate(coeffs, conf)
    vertex, color = group_mesh(face_model, agg)
    faces = face_model.face_buf.cpu().numpy()
    if mesh_format == "obj":  # the original's .obj, as each photo's
        files = [(base + ".obj", obj_chunks(vertex, faces, color))]
    else:
        files = [(base + sfx, c) for sfx, c in mesh_files(mesh_settings(mesh_format, faces), os.path.basename(base),
                                                           vertex, color)]
    content = {"id": agg.id.float().numpy()[None], "tex": agg.tex.float().numpy()[None],
               "photos": np.array([r.rel_path for r in records], dtype=object),
               "weights": agg.weights.float().numpy()[None],
               "confidence": conf.float().numpy().reshape(len(records), -1),
               "landmark_residual": np.array([[r.landmark_residual for r in records]], np.float32),
               "photo_residual": np.array([[r.photo_residual for r in records]], np.float32),
               "confidence_name": confidence_name}
    write_files_atomic(files + [(base + ".mat", [mat5_bytes(content)])])
    return agg

