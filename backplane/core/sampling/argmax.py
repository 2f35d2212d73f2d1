"""Row-wise argmax over a large vocabulary, in two passes that torch vectorises well.

torch's CPU argmax tracks an index per element and runs ~7x slower than a
plain max reduction: measured on [64, 151936] float32 logits, 4.7 ms against
0.7 ms for this. So: the max of each chunk of ``_CHUNK`` columns (a fast
reduction), the argmax over those few maxima, then the argmax inside the
winning chunk. The result is exactly ``x.argmax(-1)``: the first chunk holding
the row's maximum holds its first occurrence. Columns past the last whole
chunk are compared separately.

A few float32 rows in CPU memory (a small decode batch) go to numpy's argmax
instead: one SIMD pass with first-occurrence ties and NaN as largest, like
torch's. Each torch op above costs a few microseconds, more when a decode step
has just streamed the weights through the caches: a [1, 151936] row took
30 us warm / 198 us cold against 12 / 50 for numpy, 8 rows 142 / 362 against
97 / 238; from 32 rows the chunked passes (two threads) are faster.
"""

from __future__ import annotations

import torch

_CHUNK = 128
_NUMPY_ROWS = 8


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a 2-D tensor, first occurrence on ties, NaN as largest."""
    rows, width = x.shape
    if rows <= _NUMPY_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    main = width - width % _CHUNK
    if main == 0 or x.stride(-1) != 1:
        return x.argmax(dim=-1)
    chunks = x[:, :main].view(rows, main // _CHUNK, _CHUNK)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)
    arange = torch.arange(rows, device=x.device)
    index = best_chunk * _CHUNK + chunks[arange, best_chunk].argmax(dim=-1)
    if main == width:
        return index
    tail_value, tail_index = x[:, main:].max(dim=-1)
    value = x[arange, index]
    # The tail wins only when strictly larger, or NaN where the main part is not.
    tail_wins = (tail_value > value) | (tail_value.isnan() & ~value.isnan())
    return torch.where(tail_wins, tail_index + main, index)
