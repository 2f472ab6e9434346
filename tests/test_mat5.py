"""util.mat5 writes what scipy.io.savemat writes (after the header's text), and scipy reads it back."""
from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from util.mat5 import mat5_bytes


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "id": rng.standard_normal((1, 80)).astype(np.float32),  # test.py's groups: names of 2-5 letters
        "exp": rng.standard_normal((1, 64)).astype(np.float32),
        "angle": rng.standard_normal((1, 3)).astype(np.float32),  # 12 bytes: padded to 16
        "gamma": np.asfortranarray(rng.standard_normal((1, 27)).astype(np.float32)),
        "lm68": rng.standard_normal((1, 68, 2)).astype(np.float32),  # 3-D, column-major on disk
        "one": np.array([[2.5]], np.float32),  # 4 bytes of data: the small element form
        "d": rng.standard_normal((3, 5)),  # float64
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[::2, 1::2],  # not contiguous
        "vec": np.arange(5, dtype=np.float64),  # 1-D: one row
        "scalar": np.float32(7.0),
        "a_longer_name": np.ones((2, 2), np.float32),
    }


def test_the_bytes_are_savemats_after_the_header_text():
    arrays = _arrays()
    ref = io.BytesIO()
    savemat(ref, arrays, format="5")
    ours = mat5_bytes(arrays)
    assert len(ours) == len(ref.getvalue())
    assert ours[116:] == ref.getvalue()[116:]
    assert ours[:116].startswith(b"MATLAB 5.0 MAT-file")


def test_scipy_reads_them_back():
    arrays = _arrays()
    back = loadmat(io.BytesIO(mat5_bytes(arrays)))
    for k, v in arrays.items():
        v = np.asarray(v)
        want = v.reshape(1, -1) if v.ndim < 2 else v
        assert back[k].dtype == want.dtype and back[k].shape == want.shape and np.array_equal(back[k], want), k


def test_other_dtypes_are_refused():
    with pytest.raises(TypeError, match="int64"):
        mat5_bytes({"n": np.arange(3)})
    with pytest.raises(TypeError, match="cell arrays of strings"):
        mat5_bytes({"c": np.array(["a", 1], dtype=object)})


def _strings() -> dict:
    """What an image-set run's .mat holds besides floats: a name and a list of photo paths."""
    return {
        "confidence_name": "landmark",  # 8 bytes of UTF-8: the normal element form
        "short": "abc",  # 3 bytes: the small form
        "empty": "",  # 0 x 0
        "accents": "ré/€.jpg",  # characters, not bytes, give the dimensions
        "astral": "a\U0001F600",  # a character outside the 16-bit range: 4 bytes of UTF-8
        "photos": np.array(["a/1.jpg", "b/photo 2.png", "", "ünï.jpg"], dtype=object),  # a cell row
        "grid": np.array([["a", "bc"], ["def", "g"]], dtype=object),  # 2-D: column-major
        "none": np.array([], dtype=object),
        "id": np.ones((1, 3), np.float32),  # mixed with floats
    }


def test_strings_and_cells_are_savemats_bytes_too():
    ref = io.BytesIO()
    savemat(ref, _strings(), format="5")
    assert mat5_bytes(_strings())[116:] == ref.getvalue()[116:]


def test_scipy_reads_strings_and_cells_back():
    back = loadmat(io.BytesIO(mat5_bytes(_strings())))
    assert str(back["confidence_name"][0]) == "landmark" and str(back["accents"][0]) == "ré/€.jpg"
    assert back["empty"].size == 0 and back["none"].size == 0
    assert [str(p[0]) if p.size else "" for p in back["photos"][0]] == ["a/1.jpg", "b/photo 2.png", "", "ünï.jpg"]
    assert str(back["grid"][1, 0][0]) == "def" and str(back["grid"][0, 1][0]) == "bc"
