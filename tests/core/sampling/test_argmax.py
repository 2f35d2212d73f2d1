"""argmax_rows is exactly torch's argmax, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from backplane.core.sampling.argmax import argmax_rows


@pytest.mark.parametrize("width", [5, 128, 1000, 151936, 32000 + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torch_argmax(width, dtype):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(9, width, generator=gen).to(dtype)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_ties_resolve_to_the_first_occurrence():
    x = torch.zeros(6, 300)
    x[0, [7, 200]] = 5.0  # both in whole chunks
    x[1, [130, 290]] = 5.0  # second in the tail (columns 256..299)
    x[2, [260, 299]] = 5.0  # both in the tail
    x[3] = 1.0  # all equal
    x[4, [3, 140]] = float("nan")
    x[5, 270] = float("nan")  # NaN only in the tail
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [7, 130, 260, 0, 3, 270]


def test_a_strided_view_falls_back():
    x = torch.randn(300, 4).t()  # last dimension not contiguous
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
