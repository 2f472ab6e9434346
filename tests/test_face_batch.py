"""The typed, immutable batch of aligned faces (data.image_folder.FaceBatch): collate, drop, crops."""
import dataclasses

import numpy as np
import pytest
import torch

from data.image_folder import FaceBatch, FaceMeta, batch_crops, collate_faces, drop_faces


def _item(i: int, error: str | None = None, lm68: bool = False) -> dict:
    rng = np.random.default_rng(i)
    return dict(index=i, name=f"f{i}", rel_dir="", image_path=f"/p/f{i}.jpg", transform=None, error=error,
                image=rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
                lm=np.full((5, 2), float(i), np.float32), lm68=np.full((68, 2), float(i), np.float32) if lm68 else None)


def test_collate_gives_a_frozen_batch_with_shapes_and_failures():
    batch = collate_faces([_item(0), _item(1, error="bad photo"), _item(2, lm68=True)])
    assert isinstance(batch, FaceBatch) and len(batch) == 2
    assert [m.name for m in batch.meta] == ["f0", "f2"] and batch.failed == (("f1", "bad photo"),)
    assert batch.image.shape == (2, 3, 224, 224) and batch.image.dtype == torch.uint8
    assert batch.lm.shape == (2, 5, 2) and batch.lm68.shape == (2, 68, 2)
    assert batch.has_lm68.tolist() == [False, True] and batch.lm68[0].abs().sum() == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.failed = ()
    empty = collate_faces([_item(3, error="x")])
    assert len(empty) == 0 and empty.lm is None and empty.failed == (("f3", "x"),)


def test_drop_faces_returns_a_new_batch_and_leaves_the_old_one_whole():
    batch = collate_faces([_item(0), _item(1, lm68=True), _item(2)])
    kept, keep = drop_faces(batch, {1: "corrupt"})
    assert keep.tolist() == [True, False, True]
    assert [m.name for m in kept.meta] == ["f0", "f2"] and kept.failed == (("f1", "/p/f1.jpg: corrupt"),)
    assert kept.lm[:, 0, 0].tolist() == [0.0, 2.0] and kept.lm68.shape == (2, 68, 2)
    assert len(batch) == 3 and batch.failed == () and batch.lm.shape == (3, 5, 2)  # unchanged


def test_batch_crops_of_ready_crops_is_the_same_batch():
    batch = collate_faces([_item(0), _item(1)])
    same, crops = batch_crops(batch, torch.device("cpu"))
    assert same is batch and torch.equal(crops, batch.image)


def test_a_batch_checks_its_fields_shapes():
    meta = (FaceMeta(0, "a", "", "/a.jpg"),)
    with pytest.raises(ValueError, match=r"lm must have shape \(B, 5, 2\) with B=1, got \(2, 5, 2\)"):
        FaceBatch(meta=meta, lm=torch.zeros(2, 5, 2))
