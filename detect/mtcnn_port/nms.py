"""Boxes of the port: overlap, the package's NMS, squaring and refinement, candidate sets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def box_overlap(a: torch.Tensor, b: torch.Tensor, method: str = "union") -> torch.Tensor:
    """Pairwise overlap (len(a), len(b)) of (x1, y1, x2, y2) boxes as the package computes it:
    areas ``(x2 - x1) * (y2 - y1)``, ``inter / union`` or ``inter / min(area)``."""
    if method not in ("union", "min"):
        raise ValueError(f"overlap method must be 'union' or 'min', got {method!r}")
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    iw = torch.minimum(a[:, None, 2], b[None, :, 2]).sub_(torch.maximum(a[:, None, 0], b[None, :, 0]))
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]).sub_(torch.maximum(a[:, None, 1], b[None, :, 1]))
    inter = iw.clamp_(min=0).mul_(ih.clamp_(min=0))
    if method == "union":
        return inter / (area_a + area_b - inter)
    return inter / torch.minimum(area_a, area_b)


def earlier_overlap_nms(
    boxes: torch.Tensor, groups: torch.Tensor, threshold: float, method: str = "union", chunk: int = 512
) -> torch.Tensor:
    """The package's NMS, batched over groups: keep box ``j`` unless an earlier box ``i < j`` of the
    same group overlaps it by more than ``threshold`` (suppressed boxes still suppress).

    boxes: (N, 4) sorted by descending score within each group; groups: (N,) int64, equal values
    contiguous. Returns a (N,) bool keep mask. Boxes ``j`` are taken ``chunk`` at a time against
    the boxes from their group's start to ``j``, so the work is about the sum of squared group
    sizes over two.
    """
    n = boxes.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    if n == 0:
        return keep
    groups = groups.contiguous()
    starts = torch.searchsorted(groups, groups).cpu().numpy()  # first index of each one's group
    index = torch.arange(n, device=boxes.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        lo = int(starts[a])
        ov = box_overlap(boxes[a:b], boxes[lo:b], method)
        earlier = index[lo:b][None, :] < index[a:b, None]
        if starts[b - 1] != lo:  # several groups in this block
            earlier &= groups[lo:b][None, :] == groups[a:b, None]
        keep[a:b] = ~((ov > threshold) & earlier).any(dim=1)
    return keep


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The package's ``resize_to_square``: side ``max(w, h)`` around the same centre, floats."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def refine_boxes(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The package's ``adjust_bboxes``: ``box += offset * (w, h, w, h)`` with ``w = x2 - x1 + 1``."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets.double() * torch.stack([w, h, w, h], dim=1)


def _descending_within_groups(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Permutation sorting each contiguous group by descending score, as the package does
    (``np.argsort(scores)[::-1]``, ties included)."""
    if scores.size == 0:
        return np.zeros(0, np.int64)
    cuts = np.flatnonzero(np.diff(groups)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [scores.size]])
    return np.concatenate([s + np.argsort(scores[s:e])[::-1] for s, e in zip(starts, ends)])


@dataclass
class _Candidates:
    """Boxes of all images of a batch, image ids non-decreasing. boxes (N, 4) float64
    (x1, y1, x2, y2) image pixels; scores (N,) float64; image (N,) int64; landmarks (N, 10) or None."""

    boxes: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor
    landmarks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def take(self, index: torch.Tensor) -> "_Candidates":
        lm = None if self.landmarks is None else self.landmarks[index]
        return _Candidates(self.boxes[index], self.scores[index], self.image[index], lm)

    def sorted_nms(self, threshold: float, method: str) -> "_Candidates":
        """Sort each image's boxes by descending score (on the host, NumPy's tie order), then NMS."""
        perm = _descending_within_groups(self.scores.cpu().numpy(), self.image.cpu().numpy())
        ordered = self.take(torch.from_numpy(perm).to(self.boxes.device))
        return ordered.take(earlier_overlap_nms(ordered.boxes, ordered.image, threshold, method))
