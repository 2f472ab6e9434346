"""TorchMTCNN: the three stages of MTCNN on batches of images, as the ``mtcnn`` package runs them
on one (see the package docstring of :mod:`detect.mtcnn_port` for what is reproduced and how)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from detect.mtcnn_port.nms import (_Candidates, _descending_within_groups, earlier_overlap_nms, refine_boxes,
                                   square_boxes)
from detect.mtcnn_port.pyramid import (PNET_STRIDE, PNET_WINDOW, AreaMatrices, _pack, _pool_edge_cells, _Tile,
                                       area_resize, crop_and_resize, level_size, pnet_output_size, pyramid_scales)
from detect.mtcnn_port.weights import load_network
from util.checks import check_shape
from util.precision import ieee_fp32

logger = logging.getLogger(__name__)

# PNet, RNet, ONet face-probability thresholds: those of the pre-1.0 `mtcnn` that
# Deep3DFaceRecon used; mtcnn 1.0.0's detect_faces defaults to (0.6, 0.7, 0.8).
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)

# Fixed parts of mtcnn 1.0.0's pipeline (its detect_faces keyword defaults).
NMS_PNET_LEVEL = 0.5  # union, within one pyramid level
NMS_PNET_ALL = 0.7  # union, over all levels of an image
NMS_RNET = 0.7  # union
NMS_ONET = 0.7  # min
PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0

# Pyramid tiles per PNet canvas (pixels); bounds the memory of one PNet call.
CANVAS_PIXELS = {"cpu": 1_000_000, "cuda": 32_000_000}
# Resize weights kept per detector (bytes): enough for the pyramids of a few hundred image sizes.
AREA_CACHE_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


class TorchMTCNN:
    """Face detector equal to ``mtcnn.MTCNN`` 1.0.0 (float32 round-off aside), in PyTorch.

    Args:
        device: where the networks and image work run ("cpu", "cuda", "cuda:1", torch.device).
        min_face_size: smallest face (pixels) the pyramid looks for; the package's default 20.
        thresholds: face-probability thresholds of PNet, RNet and ONet. The package's own
            ``detect_faces`` defaults are (0.6, 0.7, 0.8); (0.6, 0.7, 0.7) are those of the
            pre-1.0 package that Deep3DFaceRecon used.
        scale_factor: pyramid step.
        weights_dir: folder with pnet.lz4, rnet.lz4, onet.lz4; default: the installed package's.

    Each detection is a dict: ``box`` [x, y, w, h] (floats, image pixels, clipped to the image),
    ``confidence`` (float, ONet face probability), ``keypoints`` (5, 2) float64 array of (x, y)
    image pixels (y down, pixel centres at integers) for left eye, right eye, nose, mouth left,
    mouth right, in the package's order (descending confidence).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        scale_factor: float = 0.709,
        weights_dir: str | None = None,
    ) -> None:
        if len(thresholds) != 3:
            raise ValueError(f"thresholds must be 3 values (PNet, RNet, ONet), got {thresholds!r}")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = scale_factor
        self.pnet, self.rnet, self.onet = (
            load_network(name, weights_dir).to(self.device, memory_format=torch.channels_last)
            for name in ("pnet", "rnet", "onet")
        )
        # How the work is cut, per device; results do not depend on it beyond float round-off.
        self.canvas_pixels = CANVAS_PIXELS.get(self.device.type, CANVAS_PIXELS["cuda"])
        self.area_matrices = AreaMatrices(self.device, max_bytes=AREA_CACHE_BYTES.get(self.device.type, 512 << 20))

    def detect(self, image: np.ndarray) -> list[dict]:
        """Faces in one (H, W, 3) uint8 RGB image; see the class docstring for the dicts and
        :meth:`detect_batch` for the errors."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        """Faces in each of N images.

        Args:
            images: N (H_i, W_i, 3) uint8 RGB arrays (sizes may differ).

        Returns:
            N lists of dicts (see the class docstring); every image's list is what
            :meth:`detect` gives for it alone.

        Raises:
            ValueError: an image is not (H, W, 3) (the message names its index).
            TypeError: an image is not uint8.
        """
        for i, image in enumerate(images):
            check_shape(image, ("H", "W", 3), f"image {i} (RGB)")
            if image.dtype != np.uint8:
                raise TypeError(f"image {i}: expected dtype uint8, got {image.dtype}")
        if not images:
            return []
        with torch.inference_mode(), ieee_fp32(self.device):
            batch = _Batch(images, self.device)
            found = self._stage_pnet(batch)
            found = self._stage_rnet(batch, found)
            found = self._stage_onet(batch, found)
        return _to_dicts(found, len(images))

    # The three stages ----------------------------------------------------------------

    def _stage_pnet(self, batch: "_Batch") -> _Candidates:
        tiles = []
        for b, (h, w) in enumerate(batch.shapes):
            for s in pyramid_scales(h, w, self.min_face_size, self.scale_factor):
                lh, lw = level_size(h, w, s)
                if min(pnet_output_size(lh, lw)) > 0:
                    tiles.append(_Tile(b, float(s), lh, lw))
        if not tiles:
            return batch.empty()
        tiles, shapes = _pack(tiles, self.canvas_pixels)
        logger.debug("PNet: %d levels of %d images on canvases %s", len(tiles), len(batch.shapes), shapes)
        parts = [self._pnet_canvas(batch, tiles, c, shape) for c, shape in enumerate(shapes)]
        tile_id, cell_y, cell_x, reg, score = (torch.cat(p) for p in zip(*parts))
        # The package's order: tile by tile (image, then level), each tile row-major.
        width = max(pnet_output_size(t.height, t.width)[1] for t in tiles)
        height = max(pnet_output_size(t.height, t.width)[0] for t in tiles)
        order = torch.argsort((tile_id * height + cell_y) * width + cell_x)
        tile_id, cell_y, cell_x, reg, score = (v[order] for v in (tile_id, cell_y, cell_x, reg, score))
        dev = self.device
        scale = torch.tensor([t.scale for t in tiles], dtype=torch.float64, device=dev)[tile_id]
        image = torch.tensor([t.image for t in tiles], dtype=torch.int64, device=dev)[tile_id]
        x = (PNET_STRIDE * cell_x + 1).double()
        y = (PNET_STRIDE * cell_y + 1).double()
        size = PNET_WINDOW - 1
        reg = reg.double() * size
        boxes = torch.stack([x + reg[:, 0], y + reg[:, 1], x + size + reg[:, 2], y + size + reg[:, 3]], 1)
        found = _Candidates(boxes / scale[:, None], score.double(), image)
        # Per level: score order, NMS 0.5; levels stay in order.
        perm = _descending_within_groups(found.scores.cpu().numpy(), tile_id.cpu().numpy())
        perm_t = torch.from_numpy(perm).to(dev)
        found, tile_id = found.take(perm_t), tile_id[perm_t]
        found = found.take(earlier_overlap_nms(found.boxes, tile_id, NMS_PNET_LEVEL, "union"))
        found = found.sorted_nms(NMS_PNET_ALL, "union")
        return _Candidates(square_boxes(found.boxes), found.scores, found.image)

    def _pnet_canvas(
        self, batch: "_Batch", tiles: list[_Tile], c: int, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        """Run PNet on canvas ``c``; candidates as (tile, cell y, cell x, reg (n, 4), score)."""
        dev = self.device
        members = [t for t, tile in enumerate(tiles) if tile.canvas == c]
        canvas = torch.zeros(*shape, 3, dtype=torch.float32, device=dev)
        cell_tile = torch.full(pnet_output_size(*shape), -1, dtype=torch.int64, device=dev)
        edges = []
        by_image: dict[int, list[int]] = {}
        for t in members:
            by_image.setdefault(tiles[t].image, []).append(t)
        for b, ts in by_image.items():
            image = batch.image(b)
            transposed = image.permute(1, 0, 2).reshape(image.shape[1], -1)
            for t in ts:
                tile = tiles[t]
                level = area_resize(image, tile.height, tile.width, transposed=transposed,
                                    matrices=self.area_matrices)
                canvas[tile.oy:tile.oy + tile.height, tile.ox:tile.ox + tile.width] = level
                edges.append(_pool_edge_cells(tile))
                oh, ow = pnet_output_size(tile.height, tile.width)
                cell_tile[tile.oy // 2:tile.oy // 2 + oh, tile.ox // 2:tile.ox // 2 + ow] = t
            del transposed
        pool_edges = torch.from_numpy(np.concatenate(edges, axis=1)).to(dev)
        reg, prob = self.pnet(canvas.permute(2, 0, 1)[None].contiguous(), pool_edges)
        hit = (prob[0] > self.thresholds[0]) & (cell_tile >= 0)
        ys, xs = hit.nonzero(as_tuple=True)
        tile_id = cell_tile[ys, xs]
        oy = torch.tensor([tile.oy // 2 for tile in tiles], device=dev)[tile_id]
        ox = torch.tensor([tile.ox // 2 for tile in tiles], device=dev)[tile_id]
        return tile_id, ys - oy, xs - ox, reg[0][:, ys, xs].T, prob[0, ys, xs]

    def _stage_rnet(self, batch: "_Batch", found: _Candidates) -> _Candidates:
        if len(found) == 0:
            return found
        crops = batch.crops(found.boxes, found.image, 24)
        offsets, prob = self.rnet(crops)
        found = _Candidates(refine_boxes(found.boxes, offsets), prob.double(), found.image)
        found = found.take(found.scores > self.thresholds[1]).sorted_nms(NMS_RNET, "union")
        return _Candidates(square_boxes(found.boxes), found.scores, found.image)

    def _stage_onet(self, batch: "_Batch", found: _Candidates) -> _Candidates:
        if len(found) == 0:
            return found
        crops = batch.crops(found.boxes, found.image, 48)
        offsets, marks, prob = self.onet(crops)
        boxes = found.boxes
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        marks = marks.double()
        # The package writes these into a float32 array.
        marks = torch.cat([w * marks[:, :5] + boxes[:, :1] - 1, h * marks[:, 5:] + boxes[:, 1:2] - 1], 1)
        marks = marks.float().double()
        found = _Candidates(refine_boxes(boxes, offsets), prob.double(), found.image, marks)
        found = found.take(found.scores > self.thresholds[2]).sorted_nms(NMS_ONET, "min")
        # fit_to_image: boxes (not landmarks) into [0, W - 1] x [0, H - 1].
        limit = (batch.sizes[found.image] - 1).double()  # (n, 2) as (H - 1, W - 1)
        upper = torch.stack([limit[:, 1], limit[:, 0], limit[:, 1], limit[:, 0]], 1)
        boxes = torch.minimum(found.boxes.clamp(min=0), upper)
        return _Candidates(boxes, found.scores, found.image, found.landmarks)


class _Batch:
    """The images of one ``detect_batch`` call on the device, normalised to ``(p - 127.5) / 128``."""

    def __init__(self, images: Sequence[np.ndarray], device: torch.device) -> None:
        self.device = device
        self.shapes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        counts = np.asarray([h * w for h, w in self.shapes], np.int64)
        flat = np.concatenate([np.ascontiguousarray(im).reshape(-1, 3) for im in images])
        pixels = torch.from_numpy(flat).to(device)
        self.pixels = (pixels.float() - PIXEL_MEAN) / PIXEL_SCALE  # (P, 3), exact in float32
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(device)
        self.sizes = torch.tensor(self.shapes, dtype=torch.int64, device=device)
        self._starts = np.concatenate([[0], np.cumsum(counts)])

    def image(self, b: int) -> torch.Tensor:
        h, w = self.shapes[b]
        return self.pixels[self._starts[b]:self._starts[b + 1]].view(h, w, 3)

    def crops(self, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        return crop_and_resize(self.pixels, self.offsets, self.sizes, boxes, image_ids, size)

    def empty(self) -> _Candidates:
        z = torch.zeros(0, dtype=torch.float64, device=self.device)
        return _Candidates(z.view(0, 4), z, torch.zeros(0, dtype=torch.int64, device=self.device))


def _to_dicts(found: _Candidates, n_images: int) -> list[list[dict]]:
    results: list[list[dict]] = [[] for _ in range(n_images)]
    if len(found) == 0:
        return results
    boxes = found.boxes.cpu().numpy()
    scores = found.scores.cpu().numpy()
    image = found.image.cpu().numpy()
    marks = found.landmarks.cpu().numpy()
    for i in range(len(found)):
        x1, y1, x2, y2 = boxes[i]
        results[image[i]].append({
            "box": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "confidence": float(scores[i]),
            "keypoints": np.stack([marks[i, :5], marks[i, 5:]], axis=1),
        })
    return results
