"""MTCNN face detection in PyTorch that reproduces the ``mtcnn`` package, version 1.0.0.

Modules: :mod:`networks` (PNet, RNet, ONet), :mod:`weights` (the package's weight files),
:mod:`pyramid` (image pyramid, ``ResizeArea``, ``crop_and_resize``, PNet canvases), :mod:`nms`
(boxes and the package's NMS), :mod:`detector` (:class:`~detector.TorchMTCNN`, the three stages).
Importing this package loads nothing (no torch).

The three networks (PNet, RNet, ONet) load the package's own weight files
(``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``: joblib lists of float32 Keras arrays), and the
pipeline around them follows the package step by step, so that boxes, scores and the five
landmarks agree with ``mtcnn.MTCNN().detect_faces(..., output_type="numpy")`` up to float32
round-off. TensorFlow is never imported; the package does not even need to be importable, only
its weight folder (pass ``weights_dir`` to use a copy elsewhere).

What the package does, and what is reproduced here (``mtcnn/stages``, ``mtcnn/utils``):

* Normalisation ``(pixel - 127.5) / 128``, then an image pyramid with scales
  ``(12 / min_face_size) * scale_factor ** k`` for
  ``k < round(log(min(H, W) / 12) / -log(scale_factor) - 1)``; level ``k`` has size
  ``int(H * s) x int(W * s)`` (truncated) and is made with ``tf.image.resize(method=AREA)``,
  i.e. TensorFlow's ``ResizeArea`` kernel: every output pixel is the exact average of the source
  rectangle ``[y * H / h, (y + 1) * H / h) x [x * W / w, (x + 1) * W / w)`` with fractional
  border weights. :func:`area_resize` applies the kernel's weights as two matrix products
  (sparse on the CPU, dense on CUDA).
  (Torch's ``interpolate(mode="area")`` is adaptive average pooling with whole-pixel bins: with it
  the landmarks on tests/data/faces move by 3.1 px on average, 15.5 px at worst, and one photo
  gets a different number of faces; antialiased bilinear is worse. Hence the exact weights.)
* PNet on every level; a cell is a candidate when its face probability is ``> thresholds[0]``;
  its box is ``(2x + 1, 2y + 1, 2x + 12, 2y + 12) + 11 * regression``, divided by the scale
  (regression is applied at once, and nothing is rounded, unlike the original MTCNN).
* The package's NMS is not the greedy one: a box is dropped when *any* earlier box in score
  order overlaps it by more than the threshold, even a box that was itself dropped
  (:func:`earlier_overlap_nms`). Overlap is ``inter / union`` or ``inter / min`` with areas
  ``(x2 - x1) * (y2 - y1)`` (no ``+ 1``). PNet: 0.5 per level, then 0.7 over all levels;
  RNet: 0.7; ONet: 0.7 with ``min``. Score order is ``np.argsort(scores)[::-1]``, done here
  with NumPy on the same arrays so that ties (saturated scores of exactly 1.0) break the same way.
* Boxes are made square around their centre (floats, no rounding, no padding step); crops
  for RNet (24 x 24) and ONet (48 x 48) use ``tf.image.crop_and_resize`` semantics
  (:func:`crop_and_resize`: bilinear, box corners sampled exactly, samples outside the image are 0).
* RNet/ONet replace the score, keep ``score > threshold`` and refine the box with
  ``box += offset * (w, h, w, h)``, ``w = x2 - x1 + 1``. ONet landmarks are
  ``x = w * lx + x1 - 1`` (``y`` likewise) on the box *before* refinement, in the column layout
  ``x1..x5, y1..y5`` (the package's ``to_json`` docstring says interleaved; its code is not).
* Finally boxes (not landmarks) are clipped to ``[0, W - 1] x [0, H - 1]``.

The per-image result order is the package's: descending ONet score.

Two deliberate differences: :meth:`TorchMTCNN.detect_batch` treats every image as if it were
alone (the package pads a batch to its largest image, which changes the results, and its
``fix_bboxes_offsets`` shifts an image's boxes by another image's padding when an earlier image
has no face), and pyramid levels smaller than PNet's window are skipped (the package then raises
inside TensorFlow and returns no face at all; with the default ``min_face_size=20`` every level is
at least 12 px).

Batching: all pyramid levels of all images of a batch are packed into one (or a few) canvases and
PNet runs once per canvas; RNet and ONet run once on all crops of all images. Tiles start at even
offsets and, where a tile's ``conv1`` output has an odd height or width, the ``conv1`` cells just
past it are set to ``-inf`` before the 2 x 2 max pool, which reproduces TensorFlow's ``same``
pooling there, so every valid PNet output cell equals the one computed on the level alone.

The weight files are pickles (joblib): load only the package's own, or copies you trust.
"""
