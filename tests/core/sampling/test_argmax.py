"""argmax_rows is exactly torch's argmax, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from backplane.core.sampling.argmax import argmax_rows


@pytest.mark.parametrize("width", [5, 128, 1000, 151936, 32000 + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 9])  # up to 8 float32 rows: numpy's argmax
def test_equals_torch_argmax(width, dtype, rows):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


@pytest.mark.parametrize("rows", [6, 9])  # numpy's pass, and the chunked passes
def test_ties_resolve_to_the_first_occurrence(rows):
    x = torch.zeros(rows, 300)
    x[0, [7, 200]] = 5.0  # both in whole chunks
    x[1, [130, 290]] = 5.0  # second in the tail (columns 256..299)
    x[2, [260, 299]] = 5.0  # both in the tail
    x[3] = 1.0  # all equal
    x[4, [3, 140]] = float("nan")
    x[5, 270] = float("nan")  # NaN only in the tail
    want = [7, 130, 260, 0, 3, 270] + [0] * (rows - 6)
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == want


@pytest.mark.parametrize("rows", [4, 12])
def test_a_strided_view_falls_back(rows):
    x = torch.randn(300, rows).t()  # last dimension not contiguous
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
