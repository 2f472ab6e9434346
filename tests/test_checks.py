"""util.checks: the one shape check."""
import numpy as np
import pytest
import torch

from util.checks import check_shape, check_shapes


def test_matching_shapes_pass_and_bind_their_names():
    sizes = check_shape(torch.zeros(2, 3, 5, 7), ("B", 3, "H", "W"), "image")
    assert sizes == {"B": 2, "H": 5, "W": 7}
    assert check_shape(np.zeros((68, 2)), (68, None), "lm") == {}
    assert check_shape(np.zeros((4, 2)), ("*", 2), "lm") == {}


@pytest.mark.parametrize("x, shape, message", [
    (torch.zeros(2, 3), ("B", 3, "H"), r"image must have shape \(B, 3, H\), got \(2, 3\)"),
    (torch.zeros(2, 4, 5), ("B", 3, "H"), r"image must have shape \(B, 3, H\), got \(2, 4, 5\)"),
    ([1, 2, 3], ("N",), r"image must have shape \(N\), got list"),
])
def test_mismatches_name_the_argument_and_both_shapes(x, shape, message):
    with pytest.raises(ValueError, match=message):
        check_shape(x, shape, "image")


def test_a_name_must_have_one_size_across_arguments():
    sizes = check_shapes(pred=(torch.zeros(4, 68, 2), ("B", 68, 2)), weight=(torch.zeros(68), (68,)))
    assert sizes == {"B": 4}
    with pytest.raises(ValueError, match=r"target must have shape \(B, 68, 2\) with B=4, got \(3, 68, 2\)"):
        check_shapes(pred=(torch.zeros(4, 68, 2), ("B", 68, 2)), target=(torch.zeros(3, 68, 2), ("B", 68, 2)))
